"""Training: ``python -m aenet_dist.train train.toml`` or ``torchrun ... -m aenet_dist.train train.toml``.

One code path for one process and for torchrun. Each rank reads its contiguous shard of
the store (:mod:`aenet_dist.loader`), builds species-grouped batches, and takes the lean step
(:mod:`aenet_dist.step`): energies, forces (−dE/dG · dG/dR over the stored rows), the loss of
the global batch (:mod:`aenet_dist.loss`) and every parameter gradient, by hand. Under torchrun
the step is wrapped in ``DistributedDataParallel``, which sums the gradients over ranks.

Rank 0 prints one line per epoch, appends metrics to ``run_dir/metrics.jsonl``, writes
checkpoints (latest k and best) and a summary table at the end.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import math
import os
import shutil
import signal
import sys
import time
import weakref
from pathlib import Path

if __name__ == "__main__":  # `python -m aenet_dist.train` (torchrun): loading torch below takes a second or
    # more, and a Ctrl-C meanwhile printed an import traceback on every rank; one line instead
    def _interrupted_while_loading(signum, frame):
        if os.environ.get("RANK", "0") == "0":
            print("interrupted while starting; nothing was trained", file=sys.stderr)
        sys.exit(130)

    signal.signal(signal.SIGINT, _interrupted_while_loading)

import numpy as np
import torch
import torch.distributed as tdist

from . import checkpoint as ckpt
from .allocator import keep_freed_memory
from .batching import Batch
from .batch_file import BatchFile, BatchFileWriter
from .block_loading import WorkerDied
from .config import TrainConfig, load_train_config, save_resolved_config
from .formats.train_in import read_train_in
from .graphs import GraphedStep, use_cuda_graphs
from .dist import DistInfo, FusedStepState, all_reduce_sum, barrier, broadcast_object, cleanup, host_sum_for, init_distributed, wrap_ddp
from .files import LOCK_NAME, describe_os_error, first_missing, lock_directory, remove_stale_temporaries, remove_unused_directory, unlock
from .cores import local_ranks, usable_cores
from .loader import PREFETCH_DEPTH, STREAM_PREFETCH_DEPTH, Prefetcher, epoch_plan, fixed_batch_order, make_training_data
from .log import get_logger, setup_logging
from .report import RunReport, force_rmse_text
from . import step as lean
from .loss import ANGLE_BINS, error_sums, force_angle_histogram, histogram_quantile, loss_of_totals
from .model import AtomicModel, model_from_facts
from .store import StoreReader

log = get_logger(__name__)
DTYPES = {"float32": torch.float32, "float64": torch.float64}


EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after a checkpoint; rerun with --resume
# On a GPU, ranks look at the step's stop flag (a signal asked some rank to stop) every this many steps:
# reading it waits for the collective, and the CPU could not queue the next steps meanwhile.
# 16 steps are milliseconds; a preemption grace period is seconds.
STOP_POLL_STEPS = 16
# The interpreter's thread switch interval in training (Python's default is 5 ms). Each of the step's
# operators releases the interpreter lock; the gathering (or reading) thread takes it and the training
# thread waits for it back, up to the switch interval if that thread is still busy in Python.
# The train command, TiO2 paper settings, 25 epochs, interleaved pairs (2-vCPU box): float32 1 rank
# 45.3-47.6 ms an epoch against 46.2-49.4 with 5 ms, 2 ranks 53.8-55.9 against 55.9-57.5, float64
# 64.6-67.7 against 67.7-70.4 (never slower in a pair); stream and memory at 5000 synthetic
# structures no different. AENET_DIST_SWITCH_INTERVAL (seconds) overrides it.
SWITCH_INTERVAL_S = 1e-4


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss and the like); the message says where."""


class Interrupted(Exception):
    """A signal asked the run to stop; a checkpoint of the exact position has been written."""


def build_model(reader: StoreReader, config: TrainConfig, dtype: torch.dtype) -> AtomicModel:
    """Fresh per-element networks with aenet's normalization from the store's statistics (:func:`model_from_facts`)."""
    return model_from_facts(reader.facts(), config.model.network_for, dtype)


OPTIMIZER_CLASSES = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "adagrad": "Adagrad", "adamax": "Adamax", "nadam": "NAdam",
                     "radam": "RAdam", "rmsprop": "RMSprop", "adadelta": "Adadelta", "asgd": "ASGD", "rprop": "Rprop"}


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The torch.optim optimizer ``optim.method`` names, fused where torch has a fused kernel for it.

    fused: one kernel for all parameters (5x faster than the default for these many tiny
    tensors), and it takes ``found_inf``, which skips a non-finite step on the device without a
    host sync (:func:`skips_on_device`); the others are checked on the host before each step.
    """
    o = config.optim
    cls = getattr(torch.optim, OPTIMIZER_CLASSES[o.method])
    accepted = inspect.signature(cls).parameters
    kwargs: dict = {"lr": o.lr}
    if "weight_decay" in accepted:
        kwargs["weight_decay"] = o.weight_decay
    elif o.weight_decay:
        raise ValueError(f"optim.method={o.method!r} has no weight decay; set optim.weight_decay=0 (or use loss.l2)")
    if "betas" in accepted:
        kwargs["betas"] = tuple(o.betas)
    if o.method == "sgd":
        kwargs["momentum"] = o.momentum
    if "fused" in accepted:
        try:
            return cls(model.parameters(), **kwargs, fused=True)
        except RuntimeError:  # no fused kernel for this device (e.g. adagrad on a GPU)
            pass
    return cls(model.parameters(), **kwargs)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer reads ``found_inf`` (fused kernels) to skip a non-finite step itself."""
    return bool(optimizer.defaults.get("fused"))


def make_scheduler(optimizer, config: TrainConfig):
    s = config.schedule
    if s.kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.run.epochs, eta_min=s.min_lr)
    if s.kind == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=s.step_size, gamma=s.gamma)
    if s.kind == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=s.factor, patience=s.patience, min_lr=s.min_lr)
    return None


def _unchanged(sums: torch.Tensor) -> torch.Tensor:
    """The reduction of one rank: its sums are the global ones."""
    return sums


# Settings a resumed run may change: they decide how long and on what it runs, not what it computes.
RESUME_MAY_CHANGE = {
    ("run", "epochs"),
    ("data", "cache"),
    ("data", "memory_budget_gb"),
    ("data", "readers"),
    ("data", "workers"),
    ("data", "dense_buckets"),  # changes the results only by rounding
    ("data", "batch_dir"),  # where kept batches are written (rewritten at every start)
    ("run", "cpu_threads"),
    ("run", "cuda_graphs"),  # changes the results only by rounding (the order of atomic adds)
    ("run", "shared_memory_sum"),  # how the ranks' sums travel (the same sum)
    ("run", "log_every"),
    ("run", "collective_timeout_s"),
    ("run", "keep_last"),
    ("run", "checkpoint_every"),  # how often files are written (older checkpoints recorded 1, then the default)
    ("run", "checkpoint_interval_s"),
    ("run", "run_dir"),  # a run directory moved (or mounted elsewhere) resumes from its new place
    ("run", "angle_min_force"),  # a metric's threshold
    ("run", "print_every"),
    ("run", "tensorboard"),
}


PROBE, OWN_SUMS = 4, 5  # columns of Trainer.step_checks after the 4 global totals


class Trainer:
    """Owns the data, model, optimizer and checkpoints of one run on one rank."""

    def __init__(self, config: TrainConfig, info: DistInfo, resume: bool = False, finetune: str | None = None):
        self.config = config
        self.info = info
        self.dtype = DTYPES[config.run.dtype]
        self.reader = StoreReader(config.data.store)
        self.store_facts = self.reader.facts()
        unknown = sorted(set(config.model.networks) - set(self.reader.species))
        if unknown:
            raise ValueError(f"model.networks names {unknown}, which the store {config.data.store} does not have (it has {self.reader.species})")
        self.run_dir = Path(config.run.run_dir)
        self.checkpointer = ckpt.Checkpointer(self.run_dir, config.run.keep_last)
        self.last_checkpoint_time = time.monotonic()  # run.checkpoint_interval_s counts from here
        self.pending_best: dict | None = None  # an improvement not yet in best.pt (run.checkpoint_interval_s)

        t0 = time.perf_counter()
        # The data side (split, cache mode, memory budget, prefetch, sources) is decided in one place.
        # CUDA graphs replay sparse derivative rows only (aenet_dist.graphs), so the shards are laid out so.
        self.cuda_graphs = use_cuda_graphs(config.run.cuda_graphs, info.device)
        data = make_training_data(self.reader, config.data, config.run.batch_size, config.run.seed, self.dtype, info,
                                  dense_blocks=not self.cuda_graphs)
        self.data, self.cache_mode, self.prefetch, self.steps = data.rank_data, data.cache_mode, data.prefetch, data.steps
        self.eval_plan, self.source, self.eval_source = data.eval_plan, data.source, data.eval_source
        self.keep_eval_batches = data.keep_eval_batches
        self.eval_batches: list | None = None  # kept after the first evaluation when keep_eval_batches
        self._close_data = weakref.finalize(self, data.close)  # data.workers processes end with the trainer at the latest
        # data.batches='fixed': the first epoch's batches, gathered once (on the training device for
        # the gpu cache) and taken in a new order each epoch (fixed_batch_order); gathered below,
        # once a checkpoint to resume from has been accepted.
        self.kept_batches: list[Batch] | None = None
        self.kept_file: BatchFile | None = None  # with stream: the batches kept on disk instead
        self.report = RunReport(config.run, info, self.run_dir, self.steps, self.prefetch)
        load_seconds = time.perf_counter() - t0

        torch.manual_seed(config.run.seed)  # same initial weights on every rank
        self.model = model_from_facts(self.store_facts, config.model.network_for, self.dtype).to(info.device)
        lean.share_group_storage(self.model)  # the step reads each network group's parameters as one stack
        self.optimizer = make_optimizer(self.model, config)
        self.skip_on_device = skips_on_device(self.optimizer)
        self.scheduler = make_scheduler(self.optimizer, config)
        # One rank: every parameter's .grad is a view into the buffer the lean step writes, so
        # nothing is copied. Several: DDP wraps the lean step and all-reduces (sums) what it hands over.
        self.grads = None if info.distributed else lean.GradientBuffer(self.model)
        self.ddp = None
        self.fused = None  # several ranks: what the step's one collective carries and brings back
        alpha = config.loss.force_weight
        self.loss_weights = torch.tensor([1.0 - alpha, alpha], dtype=self.dtype, device=info.device)
        self.train_forces = alpha > 0 and config.data.force_percent > 0
        self.step_records: list = []  # this epoch's steps: (step number in epoch, structure indices)
        # per step: 4 global totals, then PROBE (finite iff the totals and every gradient are) and, with
        # several ranks, OWN_SUMS (this rank's own error sums, summed)
        self.step_checks = torch.zeros(self.steps, OWN_SUMS + 1, dtype=self.dtype, device=info.device)
        self.epoch = 0  # completed epochs
        self.step = 0  # optimizer steps in total
        self.step_in_epoch = 0  # steps of epoch self.epoch + 1 already taken (mid-epoch resume)
        self.partial_totals = torch.zeros(4, dtype=self.dtype)  # their summed errors
        self.stop_requested = False  # set by SIGTERM/SIGUSR1 on this rank
        self.stop_agreed = False  # some rank asked to stop (known to all after each step)
        self.local_seconds = 0.0  # forward time this epoch, before any collective (straggler check)
        self.step_events: list = []  # on a GPU: (start, end) CUDA events of this epoch's steps' own work
        self.next_epoch_batches = None  # (epoch, batches) gathered ahead during the end of the epoch before
        self.best_loss = math.inf
        self.best_epoch = -1
        self.bad_epochs = 0
        # --resume with --finetune (launch/train.sh passes --resume on every start of a job): the
        # run's own checkpoint wins once there is one; the first start takes the --finetune weights.
        resumed = self._resume(starting_from=finetune) if resume else False
        if finetune and not resumed:
            self._load_weights(finetune)
        t0 = time.perf_counter()
        if data.fixed_batches and self.cache_mode == "stream":
            self.kept_file = self._write_kept_batches()
            weakref.finalize(self, self.kept_file.close)
        elif data.fixed_batches:
            self.kept_batches = self._gather_kept_batches()
        self.load_seconds = load_seconds + time.perf_counter() - t0
        if info.distributed:
            step_module = lean.LeanStep(self.model)
            self.fused = FusedStepState(step_module, self.loss_weights, 2 * config.loss.l2)
            self.ddp = wrap_ddp(step_module, info, self.fused)
            # Every rank on the CPUs of one host: the step's one sum goes through shared memory, not gloo.
            capacity = 2 * sum(p.numel() for p in self.model.parameters()) + 5  # [G_E, G_F, error sums, stop flag]
            self.fused.host_sum = host_sum_for(info, capacity, config.run.collective_timeout_s, config.run.shared_memory_sum)
            if self.fused.host_sum is not None:
                weakref.finalize(self, self.fused.host_sum.close)
            if info.is_main:
                log.info("gradients: DistributedDataParallel over %d ranks (%s), summed%s", info.world_size, tdist.get_backend(),
                         " through shared memory (all ranks on this host's CPUs)" if self.fused.host_sum is not None else "")
        self.graphed = self._graphed_step(step_module if info.distributed else None) if self.cuda_graphs else None

    def _graphed_step(self, step_module: lean.LeanStep | None) -> GraphedStep:
        """The step's local part replayed from CUDA graphs (``run.cuda_graphs``): the whole gradient on
        one rank; under DDP this rank's G_E, G_F and error sums, before the step's one collective."""
        alpha = self.config.loss.force_weight if self.train_forces else 0.0
        strict = self.config.run.cuda_graphs == "on"
        groups = getattr(self.model, "lean_groups", {}).values()

        def parameters_in_place() -> bool:  # the graphs read the parameters' stacks where they were at capture
            return all(stacks.intact() for stacks in groups)

        if step_module is not None:
            step_module.replay = GraphedStep(lambda batch: step_module.local_step(batch, alpha),
                                             [step_module.gradients.flat, step_module.force_gradients.flat], strict,
                                             still_valid=parameters_in_place)
            step_module.replay_force_weight = alpha
            return step_module.replay
        weight_decay = 2 * self.config.loss.l2
        return GraphedStep(lambda batch: lean.compute_gradients(self.model, batch, alpha, self.loss_weights, weight_decay,
                                                                _unchanged, self.grads), [self.grads.flat], strict,
                           still_valid=parameters_in_place)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "epoch": self.epoch,
            "step": self.step,
            "step_in_epoch": self.step_in_epoch,
            "partial_totals": self.partial_totals.detach().cpu(),
            "best_loss": self.best_loss,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "rng": ckpt.rng_state(),
            "config": self.config.to_dict(),
            "store_fingerprint": self.reader.fingerprint,
            "store_facts": self.store_facts,  # export and plot rebuild the model from these, without the store
            "split_digest": self.data.split_digest,
            "world_size": self.info.world_size,
        }

    def _check_compatible(self, state: dict, path: Path) -> None:
        if state.get("store_fingerprint") != self.reader.fingerprint:
            raise ValueError(
                f"{path}: checkpoint was trained on a different store (fingerprint {str(state.get('store_fingerprint'))[:12]} "
                f"!= {self.reader.fingerprint[:12]} of {self.config.data.store}); use --finetune to start from its weights"
            )
        if state.get("split_digest") != self.data.split_digest:
            raise ValueError(
                f"{path}: the train/test split differs from the one this checkpoint was trained with (or the checkpoint, "
                "from an older version, does not record it), so test structures would be trained on; use --finetune to start from its weights"
            )
        old, new = state.get("config", {}), self.config.to_dict()
        # A resumed run may be given more epochs and moved to other hardware (cache mode, memory,
        # threads, timeouts: none changes the result); everything else must match. A setting that
        # the checkpoint's version did not have yet had its default's effect.
        defaults = {section: {f.name: f.default for f in dataclasses.fields(getattr(self.config, section))} for section in new}
        differ = [
            f"{section}.{key}"
            for section in new
            for key in new[section]
            if (section, key) not in RESUME_MAY_CHANGE
            and old.get(section, {}).get(key, defaults[section].get(key)) != new[section][key]
        ]
        if differ:
            raise ValueError(f"{path}: configuration differs from the checkpoint's in {differ}; use --finetune to start from its weights")

    def _resume(self, starting_from: str | None = None) -> bool:
        """Load the newest readable checkpoint of the run; False if the run has none yet."""
        found = self.checkpointer.latest_readable()
        if found is None:
            if self.checkpointer.all():
                raise ValueError(f"--resume: no checkpoint in {self.checkpointer.dir} is readable (see the warnings above)")
            log.info("--resume: no checkpoint in %s yet, starting %s", self.checkpointer.dir,
                     f"from the weights of {starting_from} (--finetune)" if starting_from else "from scratch")
            return False
        path, state = found
        if path != self.checkpointer.latest():
            log.warning("resuming from %s, the newest readable checkpoint", path.name)
        self._check_compatible(state, path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.step_in_epoch = int(state.get("step_in_epoch", 0))
        self.partial_totals = state.get("partial_totals", torch.zeros(4)).to(self.dtype)
        self.best_loss, self.best_epoch, self.bad_epochs = float(state["best_loss"]), int(state["best_epoch"]), int(state["bad_epochs"])
        ckpt.set_rng_state(state["rng"])
        where = f"epoch {self.epoch + 1}, after step {self.step_in_epoch}" if self.step_in_epoch else f"after epoch {self.epoch}"
        log.info("resumed from %s (%s)", path, where)
        return True

    def _load_weights(self, path: str) -> None:
        state = ckpt.load(Path(path))
        if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
            raise ValueError(f"{path}: not an aenet_dist training checkpoint (no model weights in it)")
        mismatch = ckpt.weights_mismatch(self.model.state_dict(), state["model"])
        if mismatch:
            raise ValueError(f"{path}: its weights do not fit this model's networks ({mismatch}); "
                             "fine-tuning needs the same model.hidden, activations and elements")
        self.model.load_state_dict(state["model"])
        log.info("fine-tuning from the weights of %s", path)

    # ------------------------------------------------------------------ steps

    def _reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(tensor, self.info)

    def _gather_kept_batches(self) -> list[Batch]:
        """The batches of the first epoch's plan (``data.batches='fixed'``), gathered now, in this
        thread; the test batches too (:attr:`eval_batches`), so that every read of the store happens
        here, at the start, and none in the first evaluation."""
        config = self.config
        plan = epoch_plan(self.data, config.run.seed, 0, self.steps, config.data.shuffle_window_blocks)
        place = (lambda batch: batch.to(self.info.device)) if self.cache_mode == "gpu" else (lambda batch: batch)
        kept = [_kept(place(batch)) for batch in self.source.iterate(plan, config.loss.force_weight > 0)]
        if self.data.num_test_global:  # kept where evaluate() keeps them: on the device for gpu, else on the host
            self.eval_batches = [_kept(place(batch)) for batch in self.eval_source.iterate(self.eval_plan, True)]
        return kept

    def _write_kept_batches(self) -> BatchFile:
        """``data.batches='fixed'`` with ``stream``: the first epoch's batches, then the test batches,
        streamed from the store once and written to an unnamed file of this rank in ``data.batch_dir``
        (default: the run directory). Unnamed: no other run can touch it, and its space is freed when
        the process ends, however it ends."""
        config, t0 = self.config, time.perf_counter()
        plan = epoch_plan(self.data, config.run.seed, 0, self.steps, config.data.shuffle_window_blocks)
        folder = Path(config.data.batch_dir or self.run_dir)  # (expanded and resolved by the config)
        folder.mkdir(parents=True, exist_ok=True)
        sources = [self.source] + ([self.eval_source] if self.eval_source is not self.source else [])
        need, free = sum(float(source.block_bytes.sum()) for source in sources), shutil.disk_usage(folder).free
        sharing = local_ranks()  # this node's ranks write beside each other (their shares are balanced)
        if need * 1.05 * sharing > free:  # the rank's data, plus headers and alignment
            raise ValueError(f"data.batches='fixed' with stream keeps each rank's batches on disk in {folder} (data.batch_dir): "
                             f"about {need / 1e9:.2f} GB for each of this node's {sharing} rank(s), and {free / 1e9:.2f} GB are "
                             "free there; free space, point data.batch_dir elsewhere, or use data.batches='reshuffle'")
        with BatchFileWriter(folder, anonymous=True) as writer:
            for batch in self.source.iterate(plan, config.loss.force_weight > 0):
                writer.append(batch)
            # then the test batches (batches steps.. of the file): each evaluation reads them back too
            for batch in self.eval_source.iterate(self.eval_plan, True) if self.data.num_test_global else ():
                writer.append(batch)
            written = writer.bytes
            kept = writer.finish()
        if len(kept) != self.steps + (len(self.eval_plan) if self.data.num_test_global else 0):  # evaluate() relies on the layout
            raise RuntimeError(f"internal: {len(kept)} kept batches written for {self.steps} steps and {len(self.eval_plan)} test batches")
        if self.info.is_main:
            log.info("data.batches=fixed with stream: %d training and %d test batches (%.2f GB) written to an unnamed file in %s "
                     "in %.1f s; each epoch reads them back", len(plan), len(self.eval_plan), written / 1e9, folder, time.perf_counter() - t0)
        return kept

    def _batches(self, source, plan: list[np.ndarray], with_forces: bool, moved: bool = True):
        """Batches of ``plan`` on the training device (``moved=False``: where they were gathered, the
        caller moves them); gathered ahead in a thread unless on-device."""
        if not self.prefetch:  # gathered in this thread (on the device for the gpu cache; data.batches='fixed': on the host)
            return source.iterate(plan, with_forces)
        prefetcher = Prefetcher(source, plan, with_forces, depth=STREAM_PREFETCH_DEPTH if self.cache_mode == "stream" else PREFETCH_DEPTH)
        return _OnDevice(prefetcher, self.info.device) if moved else prefetcher

    def train_step(self, batch: Batch) -> torch.Tensor:
        """One optimizer step on this rank's part of the global batch. Returns the global sums (4,).

        The lean step (:mod:`aenet_dist.step`): hand-derived forward, force contraction and
        parameter gradients, no autograd graph and no host sync on one rank. A step whose loss
        or gradient is not finite is skipped on the device (the fused optimizer's ``found_inf``);
        :meth:`_check_steps` stops the run with its epoch, step and structures.
        """
        alpha = self.config.loss.force_weight if self.train_forces else 0.0  # (the loss weights keep 1 − α on energies)
        started = self._local_start()

        if self.ddp is None:  # one rank: the sums are already global; no collective, no read of a device value
            def reduce(sums: torch.Tensor) -> torch.Tensor:
                self._local_done(started)
                self.stop_agreed = self.stop_requested
                return sums

            if self.graphed is not None:
                totals = reduce(self.graphed(batch))
            else:
                totals = lean.compute_gradients(self.model, batch, alpha, self.loss_weights, 2 * self.config.loss.l2, reduce, self.grads)
            grad_probe = self.grads.flat.sum()
        else:
            self.optimizer.zero_grad(set_to_none=True)  # DDP fills .grad with the combined gradients
            self.fused.stop_requested, self.fused.grad_probe = self.stop_requested, None
            handle = self.ddp(batch, alpha)
            self._local_done(started)  # this rank's own work before the step's one collective
            handle.backward()  # the collective: [G_E, G_F, error sums, stop flag] summed, then combined
            totals, grad_probe = self.fused.totals, self.fused.grad_probe
            # Reading the flag waits for the step's collective, which on a GPU (nccl) is still running:
            # there, only every STOP_POLL_STEPS steps and at an epoch's last step. Every rank reads the
            # same steps' flags (a requesting rank keeps raising it), so all stop after the same step.
            if self.info.device.type == "cpu" or (self.step + 1) % STOP_POLL_STEPS == 0 or self.step_in_epoch + 1 >= self.steps:
                self.stop_agreed = bool(self.fused.stop_flag > 0)
        if self.config.optim.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.clip_grad_norm)
        probes = [totals, (grad_probe + totals.sum()).view(1)]
        if self.ddp is not None:  # whether this rank's own structures gave the non-finite value, for the message
            probes.append(self.ddp.module.local_sums.sum().view(1))
        check = torch.cat(probes)
        if self.skip_on_device:
            nonfinite = torch.isfinite(check[PROBE]).logical_not_()
            self.optimizer.found_inf = nonfinite.float()  # read by the fused optimizers: skip, on the device
            self.optimizer.step()
        elif bool(torch.isfinite(check[PROBE])):  # optimizers without a fused kernel: one host read per step
            self.optimizer.step()
        if len(self.step_records) == self.step_checks.shape[0]:  # only when steps are taken outside fit()
            self.step_checks = torch.cat([self.step_checks, torch.zeros_like(self.step_checks)])
        self.step_checks[len(self.step_records), : check.numel()].copy_(check)
        self.step_records.append((self.step_in_epoch, batch.structure_index))
        self.step += 1
        return totals

    def _local_start(self):
        """Where this step's own work starts, for the straggler check: the host clock on the CPU; on a
        GPU an event in the stream, since the host only queues the kernels (its clock would time the
        launches, not the work)."""
        if self.info.device.type != "cuda":
            return time.perf_counter()
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        return start

    def _local_done(self, started) -> None:
        """This step's own work ends (before any collective): add it to :attr:`local_seconds` (on a GPU
        once the epoch is over, see :meth:`_local_seconds_of_epoch`)."""
        if isinstance(started, float):
            self.local_seconds += time.perf_counter() - started
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.step_events.append((started, end))

    def _local_seconds_of_epoch(self) -> float:
        """This epoch's own work in seconds; on a GPU the events' times, read once the last has happened."""
        if self.step_events:
            self.step_events[-1][1].synchronize()
            self.local_seconds += sum(start.elapsed_time(end) for start, end in self.step_events) / 1000.0
            self.step_events = []
        return self.local_seconds

    def _check_steps(self) -> None:
        """Stop if a step of this epoch had a non-finite loss or gradient (one host read per call)."""
        if not self.step_records:
            return
        records = self.step_records
        checks = self.step_checks[: len(records)].cpu()
        self.step_records = []
        bad = torch.nonzero(~torch.isfinite(checks[:, PROBE])).flatten()
        if bad.numel() == 0:
            return
        k = int(bad[0])
        step_in_epoch, index = records[k]
        names = self.reader.names()
        involved = [names[i] for i in index.tolist()[:10]]
        loss = float(loss_of_totals(checks[k, :4].double(), self.config.loss.force_weight))
        what = f"loss is {loss}" if not math.isfinite(loss) else "a gradient is not finite"
        whose = f"structures on rank {self.info.rank} include {involved}"
        # With a non-finite loss the ranks whose own error sums are finite are not where it came from; a
        # non-finite gradient with a finite loss cannot be traced to a rank's sums, so every rank names its own.
        if self.ddp is not None and not math.isfinite(loss) and math.isfinite(float(checks[k, OWN_SUMS])):
            whose = (f"rank {self.info.rank}'s own structures of the step gave finite errors (another rank names its "
                     f"structures); they include {involved}")
        raise TrainingError(
            f"{what} at epoch {self.epoch + 1}, step {step_in_epoch + 1}; {whose}. "
            "The step was not taken and no checkpoint was written for this epoch."
        )

    @torch.no_grad()
    def evaluate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Global (sse_E, n_E, sse_F, n_F) over the test structures of every rank, and the
        histogram of the angle between predicted and reference forces (:func:`force_angle_histogram`)."""
        self.model.eval()
        totals = torch.zeros(4 + ANGLE_BINS, dtype=self.dtype, device=self.info.device)
        with_forces = True  # test force errors are reported whatever α is
        kept = None  # the batches of this evaluation, when they are to be kept
        if self.eval_batches is not None:
            batches = iter(self.eval_batches)  # kept: no thread to stop
        elif self.kept_file is not None:  # on disk after the training batches
            batches = self._batches(self.kept_file, list(range(self.steps, self.steps + len(self.eval_plan))), with_forces)
        else:
            kept = [] if self.keep_eval_batches else None
            # kept batches are kept as gathered (on the host for memory), and moved below for each use
            batches = self._batches(self.eval_source, self.eval_plan, with_forces, moved=kept is None)
        # Test batches kept on the host (data.batches='fixed' with memory or pinned: pinned exists for
        # data that does not fit on the device) are moved for each evaluation. Batches kept here are
        # kept where they were gathered: on the host for memory and pinned, whose data the device
        # was not meant to hold (the gpu cache gathers on the device).
        try:
            for gathered in batches:
                if kept is not None:
                    kept.append(_kept(gathered))
                batch = _on_device(gathered, self.info.device)
                fwd = lean.forward(self.model, batch, with_forces=with_forces, for_training=False)
                totals[:4] += error_sums(batch, fwd.energy, fwd.forces).detached()
                if batch.force_atoms is not None:
                    totals[4:] += force_angle_histogram(fwd.forces, batch.forces, batch.force_atoms, self.config.run.angle_min_force)
        finally:
            getattr(batches, "close", lambda: None)()  # stops the prefetch thread at once if an error ends the loop
        if kept is not None:  # every batch was seen
            self.eval_batches = kept
        totals = self._reduce(totals)  # one collective for the sums and the histogram
        return totals[:4], totals[4:]

    # ------------------------------------------------------------------ loop

    def _metrics(self, totals: torch.Tensor) -> tuple[float, float]:
        sse_e, n_e, sse_f, n_f = totals.tolist()
        return math.sqrt(sse_e / max(n_e, 1)), (math.sqrt(sse_f / n_f) if n_f else float("nan"))

    def _loss_of(self, rmse_e: float, rmse_f: float) -> float:
        alpha = self.config.loss.force_weight
        return (1 - alpha) * rmse_e + (alpha * rmse_f if not math.isnan(rmse_f) else 0.0)

    def close(self) -> None:
        """Stop the data worker processes (``data.workers``) and close the kept-batch file (unnamed:
        its space is freed), if any; the trainer cannot train afterwards."""
        self._close_data()
        if self.kept_file is not None:
            self.kept_file.close()

    def fit(self) -> dict:
        """Train until ``run.epochs`` (or an early stop, or a signal); returns the last epoch's metrics.

        What the user sees while it runs (progress bar, log lines, metrics files) is :attr:`report`'s job.
        """
        try:
            with self.report.open(self.epoch):
                return self._fit()
        finally:
            self._drop_next_epoch_batches()
            if self.info.is_main and self.pending_best is not None:  # the run failed: keep its best epoch
                try:
                    self._write_pending_best()
                except OSError as err:
                    log.warning("could not write best.pt: %s", err)

    def _fit(self) -> dict:
        config, info = self.config, self.info
        last = {}
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_resolved_config(config, self.run_dir)
            last = self.report.start(self.epoch)  # a resumed, finished run reports its last epoch
            log.info(
                "training %d structures (%d test) on %d rank(s), %s, %s; %d steps/epoch; data loaded in %.1f s",
                self.data.num_train_global,
                self.data.num_test_global,
                info.world_size,
                info.device,
                config.run.dtype,
                self.steps,
                self.load_seconds,
            )
            if config.run.batch_size > self.data.num_train_global:
                log.info("run.batch_size=%d is more than the %d training structures: every step takes all of them "
                         "(one step an epoch)", config.run.batch_size, self.data.num_train_global)
        start_epoch = self.epoch
        run_start = time.perf_counter()
        while self.epoch < config.run.epochs:
            epoch_start = time.perf_counter()
            totals, data_seconds = self._train_epoch()
            train_seconds = time.perf_counter() - epoch_start
            last, improved = self._end_epoch(totals, epoch_start, train_seconds, data_seconds, run_start)
            stop_early = config.run.early_stop_patience is not None and self.bad_epochs >= config.run.early_stop_patience
            self.report.warn_about_waiting(data_seconds, self._local_seconds_of_epoch(), train_seconds)
            if info.is_main:
                self.report.epoch_done(last, self.epoch - start_epoch, time.perf_counter() - run_start, due=stop_early or self.stop_agreed)
                # Checkpoint on schedule, at the end, and before stopping; the best model whenever it
                # improves, or (on the time schedule) kept in memory until the next checkpoint.
                if self._checkpoint_due() or self.epoch == config.run.epochs or stop_early or self.stop_agreed:
                    self._write_pending_best(improved)
                    self.checkpointer.save(self.state_dict(), self.epoch, improved)
                    self.last_checkpoint_time = time.monotonic()
                elif improved and config.run.checkpoint_every is not None:
                    self.checkpointer.save_best(self.state_dict())
                elif improved:
                    self.pending_best = copy.deepcopy(self.state_dict())
            barrier(info)
            if self.stop_agreed and self.epoch < config.run.epochs:
                raise Interrupted(f"stopped by a signal after epoch {self.epoch}; checkpoint written, rerun with --resume")
            if stop_early:
                if info.is_main:
                    log.info("early stop: test loss has not improved for %d epochs", self.bad_epochs)
                break
        return last

    def _train_epoch(self) -> tuple[torch.Tensor, float]:
        """The optimizer steps of the current epoch from ``step_in_epoch`` on: (global loss sums, seconds waiting for data).

        On an agreed stop request the position inside the epoch is checkpointed (:meth:`_save_interrupted`).
        """
        config, info = self.config, self.info
        self.local_seconds, self.step_events = 0.0, []
        totals = self.partial_totals.to(info.device).clone()
        data_seconds = 0.0
        with_forces = config.loss.force_weight > 0
        ahead = self.next_epoch_batches
        if self.kept_batches is not None or self.kept_file is not None:  # data.batches='fixed'
            order = fixed_batch_order(config.run.seed, self.epoch, self.steps)[self.step_in_epoch :]
            if self.kept_batches is not None:
                batches = _OnDevice(iter([self.kept_batches[k] for k in order]), info.device)
            else:  # on disk: read back in a thread, as stream reads blocks
                batches = self._batches(self.kept_file, list(order), with_forces)
        elif ahead is not None and ahead[0] == self.epoch and self.step_in_epoch == 0:
            self.next_epoch_batches, batches = None, ahead[1]
        else:
            plan = epoch_plan(self.data, config.run.seed, self.epoch, self.steps, config.data.shuffle_window_blocks)
            self.source.check_budget(plan[self.step_in_epoch :], f"epoch {self.epoch + 1}", first_step=self.step_in_epoch, strict=False)
            self._drop_next_epoch_batches()
            batches = self._batches(self.source, plan[self.step_in_epoch :], with_forces)
        try:
            for k in range(self.step_in_epoch, self.steps):
                t0 = time.perf_counter()
                batch = next(batches)  # waits only if the prefetch thread is behind
                data_seconds += time.perf_counter() - t0
                if k == self.steps - 1:
                    self._gather_next_epoch_ahead(with_forces)
                step_totals = self.train_step(batch)
                totals += step_totals
                self.step_in_epoch = k + 1
                if config.run.log_every and self.step % config.run.log_every == 0:
                    self._check_steps()  # on every rank: the probe is global, so all stop together
                if config.run.log_every and self.step % config.run.log_every == 0 and info.is_main:
                    e, f = self._metrics(step_totals)
                    log.info("epoch %d step %d/%d | batch E %.2f meV/atom F %s", self.epoch + 1, k + 1, self.steps, 1000 * e,
                             force_rmse_text(f))
                if self.stop_agreed and self.step_in_epoch < self.steps:
                    self._check_steps()
                    self.partial_totals = totals.detach().cpu()
                    self._save_interrupted()
        finally:
            batches.close()
        self._check_steps()
        self.step_in_epoch = 0
        self.partial_totals = torch.zeros(4, dtype=self.dtype)
        return totals, data_seconds

    def _gather_next_epoch_ahead(self, with_forces: bool) -> None:
        """Start gathering the next epoch's first batches now, so they are ready when its first step comes.

        Only for a resident cache with a gathering thread: its batches are gathered from memory that
        nothing else changes, so gathering beside the last step and the evaluation is safe, and the
        plan of the next epoch is already fixed (seeded). Otherwise each epoch began by waiting for
        its first batch (TiO2: ~4 of the 5.6 ms an epoch waited for data).
        """
        if not self.prefetch or self.cache_mode not in ("memory", "pinned") or self.epoch + 1 >= self.config.run.epochs:
            return
        config = self.config
        plan = epoch_plan(self.data, config.run.seed, self.epoch + 1, self.steps, config.data.shuffle_window_blocks)
        self.next_epoch_batches = (self.epoch + 1, self._batches(self.source, plan, with_forces))

    def _drop_next_epoch_batches(self) -> None:
        """Stop gathering ahead (the run ends or stops before the next epoch, or resumes elsewhere in it)."""
        ahead, self.next_epoch_batches = self.next_epoch_batches, None
        if ahead is not None:
            ahead[1].close()

    def _end_epoch(self, totals: torch.Tensor, epoch_start: float, train_seconds: float, data_seconds: float,
                   run_start: float) -> tuple[dict, bool]:
        """Evaluate (every ``run.eval_every`` epochs and at the last), count the epoch, track the best
        loss, step the schedule; (the epoch's metrics, improved)."""
        run = self.config.run
        epoch = self.epoch + 1
        has_test = bool(self.data.num_test_global)
        evaluated = has_test and (epoch % run.eval_every == 0 or epoch >= run.epochs)
        test_totals, angles = self.evaluate() if evaluated else (None, None)
        angles = angles.cpu().numpy() if angles is not None else None
        self.epoch = epoch
        train_e, train_f = self._metrics(totals)
        test_e, test_f = self._metrics(test_totals) if test_totals is not None else (float("nan"), float("nan"))
        plateau = isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        if has_test and not evaluated:  # nothing to compare: best, patience and a plateau schedule wait
            monitored, improved = float("nan"), False
        else:
            monitored = self._loss_of(test_e, test_f) if has_test else self._loss_of(train_e, train_f)
            improved = monitored < self.best_loss
            if improved:
                self.best_loss, self.best_epoch, self.bad_epochs = monitored, self.epoch, 0
            else:
                self.bad_epochs += 1
            if plateau:
                self.scheduler.step(monitored)
        if self.scheduler is not None and not plateau:
            self.scheduler.step()
        metrics = {
            "epoch": self.epoch,
            "step": self.step,
            "train_rmse_energy_meV_atom": 1000 * train_e,
            "train_rmse_forces_eV_A": train_f,
            "test_rmse_energy_meV_atom": 1000 * test_e,
            "test_rmse_forces_eV_A": test_f,
            "test_force_angle_median_deg": histogram_quantile(angles, 0.5) if angles is not None else float("nan"),
            "test_force_angle_p90_deg": histogram_quantile(angles, 0.9) if angles is not None else float("nan"),
            "loss": monitored,
            "lr": self.optimizer.param_groups[0]["lr"],
            "epoch_seconds": time.perf_counter() - epoch_start,
            "train_seconds": train_seconds,
            "data_seconds": data_seconds,
            "structures_per_second": self.data.num_train_global / max(train_seconds, 1e-9),
            "wall_seconds": time.perf_counter() - run_start,
        }
        if self.graphed is not None:  # run.cuda_graphs: graphs captured so far, steps run without one
            metrics["cuda_graphs"] = len(self.graphed.graphs)
            metrics["eager_steps"] = self.graphed.eager_steps
        return metrics, improved

    def _checkpoint_due(self) -> bool:
        """Whether the epoch just ended is a scheduled checkpoint: every ``run.checkpoint_every``
        epochs, or (unset) the first epoch ``run.checkpoint_interval_s`` after the last checkpoint."""
        run = self.config.run
        if run.checkpoint_every is not None:
            return self.epoch % run.checkpoint_every == 0
        return time.monotonic() - self.last_checkpoint_time >= run.checkpoint_interval_s

    def _write_pending_best(self, superseded: bool = False) -> None:
        """Write the improvement kept in memory to best.pt, unless a newer best is about to be written."""
        pending, self.pending_best = self.pending_best, None
        if pending is not None and not superseded:
            self.checkpointer.save_best(pending)

    def _save_interrupted(self) -> None:
        """Checkpoint the exact position inside the epoch (rank 0), then stop every rank."""
        if self.info.is_main:
            self._write_pending_best()
            path = self.checkpointer.save(self.state_dict(), self.epoch, False, self.step_in_epoch)
            # (the file is named by the epochs complete and the step: checkpoint_EEEEEE.SSSSSS.pt)
            log.warning("signal received: stopped after step %d of epoch %d (%d epochs complete); checkpoint %s",
                        self.step_in_epoch, self.epoch + 1, self.epoch, path)
        barrier(self.info)
        raise Interrupted(f"stopped by a signal after step {self.step_in_epoch} of epoch {self.epoch + 1}; checkpoint written, "
                          "rerun with --resume")

    def request_stop(self, signum=None, frame=None) -> None:
        """Signal handler: finish the current step everywhere, checkpoint, exit for requeue.

        Ctrl-C (SIGINT) does the same; a second Ctrl-C stops at once (KeyboardInterrupt).
        """
        self.stop_requested = True
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if self.info.is_main:
                print("Ctrl-C: finishing this step and writing a checkpoint (Ctrl-C again to stop at once)", file=sys.stderr)


def _kept(batch: Batch) -> Batch:
    """``batch``, marked as kept for later epochs: the step may keep what it derives from it (its
    padded rows, :attr:`Batch.step_cache`; TiO2, float32: 0.1-0.25 ms of a 3.4 ms step)."""
    batch.step_cache = {}
    return batch


class _OnDevice:
    """Batches (a :class:`Prefetcher`'s, kept ones, or ones gathered in this thread) moved to the
    training device as they are taken; ``close`` closes what they come from (stops a prefetch thread).

    Not a generator: closing a generator that never started runs none of its code, and batches
    gathered ahead for an epoch that never comes are closed before their first one is taken.
    """

    def __init__(self, batches, device: torch.device):
        self.batches, self.device = batches, device

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        return _on_device(next(self.batches), self.device)

    def close(self) -> None:
        getattr(self.batches, "close", lambda: None)()


def _on_device(batch: Batch, device: torch.device) -> Batch:
    """``batch`` on ``device``; a CPU batch, or one already there, stays as it is (moving it is some
    forty no-op calls)."""
    return batch if device.type == "cpu" or batch.num_atoms.device == device else batch.to(device, non_blocking=True)


def summary_table(last: dict, trainer: Trainer, wall: float) -> str:
    rows = [
        ("epochs", f"{last.get('epoch', trainer.epoch)}"),
        ("best epoch (test loss)", f"{trainer.best_epoch}"),
        ("train RMSE energy", f"{last.get('train_rmse_energy_meV_atom', float('nan')):.2f} meV/atom"),
        ("train RMSE forces", force_rmse_text(last.get('train_rmse_forces_eV_A', float('nan')))),
        ("test RMSE energy", f"{last.get('test_rmse_energy_meV_atom', float('nan')):.2f} meV/atom"),
        ("test RMSE forces", force_rmse_text(last.get('test_rmse_forces_eV_A', float('nan')))),
        ("ranks", f"{trainer.info.world_size} ({trainer.info.device}, {trainer.config.run.dtype})"),
        ("wall time", f"{wall:.1f} s"),
        ("run directory", str(trainer.run_dir)),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


DESCRIPTION = ("Train per-element networks on a featurized store (energies and forces); "
               "one process, or one rank per GPU/CPU slot under torchrun.")
EPILOG = ("examples:\n"
          "  aenet-dist train train.toml\n"
          "  aenet-dist train train.toml optim.lr=1e-3 run.epochs=50\n"
          "  torchrun --nproc_per_node=4 -m aenet_dist.train train.toml --resume\n"
          "every configuration key is documented in aenet_dist/config.py and the README")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``aenet-dist train``."""
    parser.add_argument("config", help="train.toml (or aenet-PyTorch's train.in)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=1e-3 run.epochs=50")
    parser.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="KEY=VALUE", help="same as a positional override")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in run_dir")
    parser.add_argument("--finetune", metavar="CHECKPOINT", help="start from the weights of a checkpoint (new optimizer, epoch 0)")


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The train command line, intermixed so that overrides may follow ``--resume``.

    An empty command line gets a hint instead of argparse's "arguments are required: config".
    """
    if not argv:
        parser.print_usage(sys.stderr)
        parser.exit(2, "error: give a configuration file (train.toml, or aenet-PyTorch's train.in); see --help\n")
    return parser.parse_intermixed_args(argv)


def load_config(path: str, overrides: list[str]) -> TrainConfig:
    """The config of ``path`` (train.toml, or aenet-PyTorch's train.in) with command-line ``overrides``.

    Both formats apply overrides through :func:`aenet_dist.config.build_train_config`, so keys,
    values and error messages are the same.
    """
    if path.endswith(".in"):
        return read_train_in(path, overrides)
    return load_train_config(path, overrides)


def _claim_run_dir(run_dir: Path, resume: bool, info: DistInfo) -> tuple[str | None, int | None]:
    """(what stops this run, the lock's descriptor): rank 0 locks ``run_dir`` and checks its history.

    A new run (no ``--resume``) into a directory that holds checkpoints or metrics would prune
    and overwrite them, so it is refused; so is a directory another training holds. Every rank
    learns the verdict, so none goes on to wait for rank 0 in a collective. The lock is returned
    even with a verdict: :func:`run` removes a directory this start created before it unlocks.
    """
    problem, lock = None, None
    if info.is_main:
        try:
            if run_dir.exists() and not run_dir.is_dir():
                raise ValueError(f"run.run_dir {run_dir} exists and is not a directory; choose another run.run_dir")
            lock = lock_directory(run_dir, "run directory")
            for stale in remove_stale_temporaries(run_dir) + remove_stale_temporaries(run_dir / "checkpoints"):
                log.info("removed %s, left by a run that was killed while writing it", stale)
            history = ckpt.Checkpointer(run_dir).describe()
            metrics = run_dir / "metrics.jsonl"
            if metrics.exists() and metrics.stat().st_size:
                history = ", ".join(filter(None, [history, "metrics.jsonl"]))
            if history and not resume:
                problem = (f"run directory {run_dir} already holds a run ({history}); rerun with --resume to continue it, "
                           "or set run.run_dir to a new directory")
        except (ValueError, OSError) as err:  # DirectoryInUse is a ValueError
            problem = str(err)
    problem = broadcast_object(problem, info)
    return problem, lock


def _is_peer_failure(err: RuntimeError) -> bool:
    """A backend error that means another rank is gone or silent (not this rank's own failure)."""
    text = str(err).lower()
    return any(word in text for word in ("gloo", "nccl", "timed out", "timeout", "connection", "connect", "peer"))


def switch_interval() -> float:
    """The thread switch interval training sets (:data:`SWITCH_INTERVAL_S`, or ``AENET_DIST_SWITCH_INTERVAL`` seconds).

    Raises:
        ValueError: the variable is not a positive number.
    """
    text = os.environ.get("AENET_DIST_SWITCH_INTERVAL", "").strip()
    if not text:
        return SWITCH_INTERVAL_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"AENET_DIST_SWITCH_INTERVAL must be a positive number of seconds, got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    """Train as ``args`` say; the exit code: 0 done, 2 bad input, 75 interrupted (resumable), 130 a second
    Ctrl-C, 1 an I/O error or a lost peer.

    A bad configuration raises ``ValueError``/``OSError`` for the command line's error handler (exit 2).
    """
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank)
    keep_freed_memory()  # steps reuse their freed temporaries instead of faulting fresh pages in
    interval = switch_interval()
    config = load_config(args.config, list(args.overrides) + list(args.set_overrides))
    info = init_distributed(config.run.device, timeout_s=config.run.collective_timeout_s)
    if info.device.type == "cpu":
        torch.set_num_threads(config.run.cpu_threads or max(1, usable_cores() // local_ranks()))
    start = time.perf_counter()
    previous_handlers = {}
    lock, trainer, finished = None, None, False
    run_dir = Path(config.run.run_dir)
    created = first_missing(run_dir) if info.is_main else None  # removed again if this start fails before using it
    previous_interval = sys.getswitchinterval()
    sys.setswitchinterval(interval)
    try:
        problem, lock = _claim_run_dir(run_dir, args.resume, info)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        trainer = Trainer(config, info, resume=args.resume, finetune=args.finetune)
        # SLURM sends SIGUSR1 (sbatch --signal) or SIGTERM (preemption, scancel) before killing; Ctrl-C is SIGINT.
        for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            previous_handlers[signum] = signal.signal(signum, trainer.request_stop)
        last = trainer.fit()
        if info.is_main:
            print(summary_table(last, trainer, time.perf_counter() - start))
        finished = True
        return 0
    except Interrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        # The first Ctrl-C of a started run only asks it to stop (request_stop); before that (loading
        # data, resuming) Ctrl-C still stops at once, and nothing was trained yet.
        if trainer is not None and trainer.stop_requested:
            print(f"interrupted: stopped at once by a second Ctrl-C; {_how_to_continue(config.run.run_dir)}", file=sys.stderr)
        else:
            print("interrupted: Ctrl-C while the run was starting (loading data), before its first step; rerun the same "
                  "command to start it again", file=sys.stderr)
        return 130
    except (ValueError, TrainingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, a directory that became read-only, a store on a lost mount
        print(f"error: {describe_os_error(err)}; nothing half-written was kept. "
              f"When it is fixed, {_how_to_continue(config.run.run_dir)}",
              file=sys.stderr)
        return 1
    except WorkerDied as err:
        print(f"error: {err} (checkpoints: {config.run.run_dir}/checkpoints)", file=sys.stderr)
        return 1
    except (tdist.DistError, RuntimeError) as err:
        if not info.distributed or not (isinstance(err, tdist.DistError) or _is_peer_failure(err)):
            raise
        # A peer died, hangs, or its connection broke: say so instead of a bare backend trace.
        text = str(err).strip().splitlines()[0][:300]
        if "exited" in text or "closed" in text or "reset by peer" in text:
            cause = "another rank has exited"
        elif "timed out" in text.lower() or "timeout" in text.lower():
            cause = f"another rank stopped responding for run.collective_timeout_s={config.run.collective_timeout_s:g} s"
        else:
            cause = "another rank has probably died or stopped responding"
        print(f"error: rank {info.rank}: a collective with the other ranks failed ({text}): {cause}; see its log, then "
              f"{_how_to_continue(config.run.run_dir)}", file=sys.stderr)
        return 1
    finally:
        if trainer is not None:
            trainer.close()
        trainer = None  # the DDP wrapper holds the process group: let it go before the group is destroyed
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        sys.setswitchinterval(previous_interval)
        if not finished:  # a failed start leaves no run directory holding only its lock (and config.toml)
            remove_unused_directory(run_dir, created, lock, (LOCK_NAME, "config.toml"))
        unlock(lock)
        cleanup(info)


def _how_to_continue(run_dir) -> str:
    """What to rerun after a failure: ``--resume`` where a checkpoint was written, else the same command."""
    if ckpt.Checkpointer(run_dir).latest() is not None:
        return f"rerun with --resume to continue from the last checkpoint in {run_dir}/checkpoints"
    return f"no checkpoint was written yet ({run_dir}/checkpoints), so rerun the same command to start again"


def main(argv: list[str] | None = None) -> int:
    """``python -m aenet_dist.train ...``, the same as ``aenet-dist train ...``."""
    from .cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy: one Trainer class per process.
    from aenet_dist.cli import exit_process
    from aenet_dist.train import main as _main

    signal.signal(signal.SIGINT, signal.default_int_handler)  # loaded: Ctrl-C is the command's again
    exit_process(_main())
