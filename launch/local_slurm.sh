#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, from Debian's packages, for the tests
# (tests/test_slurm.py) and for trying slurm/*.sbatch without a real cluster.
#
#   bash launch/local_slurm.sh            # install if needed, configure, start; waits until the node is idle
#   bash launch/local_slurm.sh --status   # exit 0 when the cluster answers and the node is usable
#   bash launch/local_slurm.sh --stop     # stop slurmd, slurmctld and munged
#
# Needs root and apt access to Debian's repositories (bookworm: SLURM 22.05). Installs
# slurmctld, slurmd, slurm-client and munge (--no-install-recommends, 8 packages), writes
# /etc/slurm/slurm.conf for one node "localhost" with all CPUs of this machine and its memory
# less a margin, in partition "debug" (the default), creates the munge key, and starts munged,
# slurmctld and slurmd as plain daemons (systemctl when systemd runs). No accounting database:
# sacct does not work; use `scontrol show job` (finished jobs stay listed for MinJobAge=600 s).
# Process tracking is proctrack/linuxproc and task/none, so no cgroups are needed.
#
# Idempotent: when the node already answers as idle/mixed/allocated it only says so. A
# slurm.conf that this script did not write is never overwritten (set LOCAL_SLURM_FORCE=1).
# Timeout for the node to become idle: LOCAL_SLURM_TIMEOUT seconds (default 60).
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARK="# written by aenet_dist launch/local_slurm.sh"
PKGS=(slurmctld slurmd slurm-client munge)
TIMEOUT="${LOCAL_SLURM_TIMEOUT:-60}"
START=$SECONDS

say() { echo "local_slurm: $*" >&2; }
die() { say "error: $*"; exit 1; }

node_state() { timeout 5 sinfo -h -n localhost -o %T 2>/dev/null | head -n1; }

usable() {
    local state
    state="$(node_state)" || return 1
    case "$state" in idle* | mixed* | allocated* | completing*) return 0 ;; *) return 1 ;; esac
}

have_systemd() { [ -d /run/systemd/system ] && command -v systemctl >/dev/null; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }

stop_all() {
    if have_systemd; then
        systemctl stop slurmd slurmctld munge 2>/dev/null || true
    fi
    local f
    for f in /run/slurm/slurmd.pid /run/slurm/slurmctld.pid /run/munge/munged.pid; do
        if pid_alive "$f"; then
            kill "$(cat "$f")"
            for _ in $(seq 50); do pid_alive "$f" || break; sleep 0.1; done
        fi
    done
    say "stopped"
}

case "${1:-}" in
    --status)
        if usable; then say "running: node localhost is $(node_state)"; exit 0; fi
        say "not running (sinfo: $(node_state || true))"
        exit 1
        ;;
    --stop) stop_all; exit 0 ;;
    "") ;;
    *) die "unknown argument '$1' (use --status, --stop or nothing)" ;;
esac

CPUS="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"
MEM_MB=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024))
MARGIN=$((MEM_MB / 20 > 512 ? MEM_MB / 20 : 512))
REAL_MB=$((MEM_MB - MARGIN))
HOST="$(hostname -s)"
desired_conf() {
    cat <<EOF
$MARK
# One node (this machine) in partition "debug"; see the script's header.
ClusterName=aenet-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
# No cgroups here: track processes through /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
JobRequeue=1
ReturnToService=2
MinJobAge=600
# A requeued job may start again only after the credential lifetime (default 120 s), and
# pending jobs are looked at every sched_interval (default 60 s): short values here, so that
# a requeued job comes back within seconds on this test cluster.
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2,bf_interval=2
KillWait=30
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REAL_MB State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

# (The pid file test spares a sinfo that would wait for a controller which is not there.)
if command -v sinfo >/dev/null && { pid_alive /run/slurm/slurmctld.pid || have_systemd; } &&
    usable && [ "$(cat "$CONF" 2>/dev/null)" = "$(desired_conf)" ]; then
    say "already running: node localhost is $(node_state) ($(sinfo --version))"
    exit 0
fi

[ "$(id -u)" = 0 ] || die "must run as root (installs packages, writes /etc/slurm, starts daemons)"

# ---------------------------------------------------------------- packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sinfo >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "${PKGS[@]}" >/tmp/local_slurm_apt.log 2>&1; then
        say "apt-get install failed; running apt-get update and retrying"
        apt-get update -q >>/tmp/local_slurm_apt.log 2>&1
        apt-get install -y -q --no-install-recommends "${PKGS[@]}" >>/tmp/local_slurm_apt.log 2>&1 ||
            { tail -n 20 /tmp/local_slurm_apt.log >&2; die "could not install ${PKGS[*]} (log: /tmp/local_slurm_apt.log)"; }
    fi
    say "installed $(dpkg-query -W -f '${Package} ${Version}, ' "${PKGS[@]}")in $((SECONDS - START)) s"
fi

# ---------------------------------------------------------------- munge
id munge >/dev/null 2>&1 || die "the munge package did not create the user 'munge'"
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
chown munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    if command -v mungekey >/dev/null; then
        runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    say "created /etc/munge/munge.key"
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key

# ---------------------------------------------------------------- slurm.conf
if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF" && [ "${LOCAL_SLURM_FORCE:-0}" != 1 ]; then
    die "$CONF exists and was not written by this script; set LOCAL_SLURM_FORCE=1 to replace it"
fi
mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
desired_conf >"$CONF.tmp"
mv "$CONF.tmp" "$CONF"
chmod 0644 "$CONF"

# ---------------------------------------------------------------- daemons
if have_systemd; then
    systemctl restart munge
    systemctl restart slurmctld slurmd
else
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged
        for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    fi
    munge -n | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
    # Restart the SLURM daemons so that they read the configuration just written.
    for f in /run/slurm/slurmd.pid /run/slurm/slurmctld.pid; do
        if pid_alive "$f"; then kill "$(cat "$f")"; for _ in $(seq 100); do pid_alive "$f" || break; sleep 0.1; done; fi
    done
    /usr/sbin/slurmctld || die "slurmctld did not start (see /var/log/slurm/slurmctld.log)"
    /usr/sbin/slurmd -N localhost || die "slurmd did not start (see /var/log/slurm/slurmd.log)"
fi

deadline=$((SECONDS + TIMEOUT))
until usable; do
    if [ "$SECONDS" -ge "$deadline" ]; then
        tail -n 5 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
        die "node localhost is not idle after ${TIMEOUT} s (sinfo: $(node_state || true))"
    fi
    sleep 0.5
done
say "running: node localhost ($CPUS CPUs, ${REAL_MB} MB) is $(node_state) in partition debug; ready after $((SECONDS - START)) s"
