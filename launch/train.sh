#!/usr/bin/env bash
# Train with torchrun on one machine or, inside a multi-node SLURM allocation, on all its nodes.
#
#   bash launch/train.sh CONFIG [section.key=value ...]
#   NPROC=4 bash launch/train.sh launch/emt_demo.toml run.epochs=50
#   sbatch slurm/train.sbatch launch/emt_demo.toml               # see slurm/train.sbatch
#
# Ranks per node: NPROC when set; else one per GPU (CUDA_VISIBLE_DEVICES, `nvidia-smi -L`, or
# torch.cuda.device_count()); else one CPU rank, or SLURM_NTASKS_PER_NODE inside SLURM. CPU ranks
# get OMP_NUM_THREADS = cores / ranks (cores: SLURM_CPUS_ON_NODE in SLURM, else all).
#   - one node (no SLURM, or SLURM_NNODES = 1): torchrun --standalone in this shell;
#   - SLURM_NNODES > 1: `srun` starts this script once per node (AENET_DIST_NODE_AGENT=1), and each
#     runs torchrun --nnodes=$SLURM_NNODES --rdzv_backend=c10d --rdzv_id=$SLURM_JOB_ID
#     --rdzv_endpoint=<first node>:${AENET_DIST_RDZV_PORT:-29500}.
#     AENET_DIST_LAUNCH=multi forces this path on one node (tests), =single the other one.
# --resume is always passed: a run continues from its latest checkpoint, or starts from scratch.
#
# Signals: SIGUSR1 or SIGTERM to this script make every training worker finish its
# step; rank 0 writes a checkpoint of the exact position, and the script exits 75
# (EXIT_INTERRUPTED) — rerun it, or let slurm/train.sbatch requeue the job, to continue.
# torchrun itself runs with SIGUSR1 ignored (its default action would kill it); this script
# forwards SIGUSR1 to torchrun's children (the workers) once they have installed their
# handler, and waits for them. In the multi-node path the signal goes to srun, which forwards
# it to the per-node copies of this script. Exit status otherwise: that of torchrun (or srun).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="$ROOT/launch/train.sh"
VENV="${AENET_DIST_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
TORCHRUN="$VENV/bin/torchrun"
EXIT_INTERRUPTED=75
TAG="train.sh[$(hostname -s)]"

say() { echo "$TAG: $*" >&2; }

if [ $# -lt 1 ]; then
    echo "usage: $0 CONFIG [section.key=value ...]   (train options such as --finetune may follow)" >&2
    exit 2
fi
[ -x "$TORCHRUN" ] || { say "no torchrun at $TORCHRUN (run scripts/setup_env.sh or set AENET_DIST_VENV)"; exit 2; }

# ---------------------------------------------------------------- signals
SIGNALLED=""
on_signal() {
    if [ -z "$SIGNALLED" ]; then
        SIGNALLED="$1"
        say "SIG$1 received: asking the workers to checkpoint and stop"
    fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

children_of() {
    if command -v pgrep >/dev/null; then
        pgrep -P "$1" || true
    else
        local stat
        for stat in /proc/[0-9]*/stat; do
            awk -v p="$1" '{ sub(/^.*\) /, ""); if ($2 == p) { split(FILENAME, a, "/"); print a[3] } }' "$stat" 2>/dev/null
        done
    fi
}

catches_usr1() {  # has process $1 installed a handler for SIGUSR1 (signal 10, bit 9 of SigCgt)?
    local mask
    mask="$(awk '/^SigCgt:/ {print $2}' "/proc/$1/status" 2>/dev/null)" || return 1
    [ -n "$mask" ] && (((16#$mask >> 9) & 1))
}

alive() { kill -0 "$1" 2>/dev/null; }

# Run "$@" in the background and wait for it; while a signal is pending, forward it:
#   FORWARD=workers  SIGUSR1 to each child of the background process (torchrun's workers), as
#                    soon as it catches SIGUSR1 (until then it ignores it: no worker is lost
#                    during start-up), then wait for those workers to exit too;
#   FORWARD=self     SIGUSR1 to the background process itself (srun forwards it to its tasks).
# Sets CHILD_RC.
supervise() {
    local forward="$1" sent=" " kids w pid
    shift
    if [ "$forward" = workers ]; then
        (trap '' USR1; exec "$@") &
    else
        "$@" &
    fi
    pid=$!
    while alive "$pid"; do
        if [ -n "$SIGNALLED" ]; then
            if [ "$forward" = workers ]; then
                kids="$(children_of "$pid")"
                for w in $kids; do
                    case "$sent" in *" $w "*) continue ;; esac
                    if catches_usr1 "$w"; then
                        kill -USR1 "$w" 2>/dev/null && sent="$sent$w "
                    fi
                done
            elif [ "$sent" = " " ]; then
                kill -USR1 "$pid" 2>/dev/null && sent=" $pid "
            fi
        fi
        sleep 0.5 &
        wait $! 2>/dev/null  # returns at once when a trapped signal arrives
    done
    wait "$pid"
    CHILD_RC=$?
    # Workers that outlive torchrun (it can be killed by a signal sent to the whole job) are
    # still writing their checkpoint: wait for them before reporting.
    for w in $sent; do
        [ "$w" = "$pid" ] && continue
        for _ in $(seq 600); do alive "$w" || break; sleep 0.2; done
    done
}

finish() {  # exit status of this script from the child's
    if [ "$CHILD_RC" = 0 ]; then
        exit 0
    fi
    if [ "$CHILD_RC" = "$EXIT_INTERRUPTED" ] || [ -n "$SIGNALLED" ]; then
        say "interrupted (status $CHILD_RC after SIG${SIGNALLED:-USR1}); the latest checkpoint resumes the run: exit $EXIT_INTERRUPTED"
        exit "$EXIT_INTERRUPTED"
    fi
    exit "$CHILD_RC"
}

# ---------------------------------------------------------------- ranks and threads
gpu_count() {
    if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
        case "$CUDA_VISIBLE_DEVICES" in "" | -1 | NoDevFiles) echo 0 ;; *) awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES" ;; esac
    elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
        nvidia-smi -L | grep -c '^GPU '
    else
        "$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0
    fi
}

local_ranks() {
    if [ -n "${NPROC:-}" ]; then
        echo "$NPROC"
        return
    fi
    local gpus
    gpus="$(gpu_count)"
    if [ "${gpus:-0}" -gt 0 ]; then
        echo "$gpus"
    elif [ -n "${AENET_DIST_TASKS_PER_NODE:-}" ]; then
        echo "$AENET_DIST_TASKS_PER_NODE"
    else
        echo 1
    fi
}

set_threads() {  # $1 = ranks on this node
    if [ -z "${OMP_NUM_THREADS:-}" ]; then
        local cores="${SLURM_CPUS_ON_NODE:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"
        OMP_NUM_THREADS=$((cores / $1 > 0 ? cores / $1 : 1))
        export OMP_NUM_THREADS
    fi
}

TRAIN=(-m aenet_dist.train "$@" --resume)

# ---------------------------------------------------------------- one torchrun per node
if [ "${AENET_DIST_NODE_AGENT:-0}" = 1 ]; then
    TAG="train.sh[$(hostname -s), node ${SLURM_NODEID:-0}]"
    NPN="$(local_ranks)"
    set_threads "$NPN"
    say "node $((${SLURM_NODEID:-0} + 1))/$SLURM_NNODES: torchrun $NPN rank(s), OMP_NUM_THREADS=$OMP_NUM_THREADS, rendezvous $AENET_DIST_RDZV_ENDPOINT"
    supervise workers "$TORCHRUN" --nnodes="$SLURM_NNODES" --nproc_per_node="$NPN" --rdzv_backend=c10d \
        --rdzv_endpoint="$AENET_DIST_RDZV_ENDPOINT" --rdzv_id="$SLURM_JOB_ID" --max-restarts=0 "${TRAIN[@]}"
    finish
fi

MODE="${AENET_DIST_LAUNCH:-auto}"
if [ "$MODE" = auto ]; then
    if [ -n "${SLURM_JOB_ID:-}" ] && [ "${SLURM_NNODES:-1}" -gt 1 ]; then MODE=multi; else MODE=single; fi
fi

if [ "$MODE" = multi ]; then
    [ -n "${SLURM_JOB_ID:-}" ] || { say "AENET_DIST_LAUNCH=multi needs a SLURM allocation"; exit 2; }
    HEAD="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
    export AENET_DIST_RDZV_ENDPOINT="$HEAD:${AENET_DIST_RDZV_PORT:-29500}"
    export AENET_DIST_NODE_AGENT=1
    # The step below has one task per node: keep the job's tasks per node for the CPU rank count.
    export AENET_DIST_TASKS_PER_NODE="${AENET_DIST_TASKS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-}}"
    NN="${SLURM_NNODES:-1}"
    CPN="${SLURM_CPUS_ON_NODE:-1}"
    say "$NN node(s) via srun, rendezvous $AENET_DIST_RDZV_ENDPOINT (job $SLURM_JOB_ID)"
    # One task per node holding all the node's CPUs of the allocation (and, by default, its GPUs).
    supervise self srun --nodes="$NN" --ntasks="$NN" --ntasks-per-node=1 --cpus-per-task="$CPN" \
        --kill-on-bad-exit=0 bash "$SELF" "$@"
    finish
fi

[ -n "${SLURM_JOB_ID:-}" ] && export AENET_DIST_TASKS_PER_NODE="${AENET_DIST_TASKS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-}}"
NPN="$(local_ranks)"
set_threads "$NPN"
say "torchrun --standalone, $NPN rank(s), OMP_NUM_THREADS=$OMP_NUM_THREADS${SLURM_JOB_ID:+ (job $SLURM_JOB_ID)}"
supervise workers "$TORCHRUN" --standalone --nnodes=1 --nproc_per_node="$NPN" "${TRAIN[@]}"
finish
