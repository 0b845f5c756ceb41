"""Checkpoints (aenet_dist.checkpoint): a failed write keeps the previous checkpoint and leaves
no temporary file, ``load`` refuses pickled Python objects (weights_only), keep-last-k with
``best.pt`` apart, the step-in-epoch names in order, the fallback past a damaged newest file,
the weight-mismatch message, and the RNG state surviving a save and load.

The end-to-end fallback through ``--resume`` is in test_bad_inputs.py; ``atomic_write``'s
permissions and symlinks are in test_bad_inputs.py too.
"""

import pickle

import pytest
import torch

from aenet_dist import checkpoint as ckpt
from aenet_dist.files import TMP_SUFFIX


def _state(epoch: int) -> dict:
    """A checkpoint-like dict of the kinds the trainer stores (tensors, numbers, strings, lists, dicts)."""
    return {"epoch": epoch, "model": {"nets.Cu.0.weight": torch.full((2, 3), float(epoch))},
            "config": {"name": "x", "hidden": [6, 6]}, "best_loss": 0.5 / epoch}


class Opaque:
    """A class instance: what weights_only loading must refuse to unpickle."""

    def __init__(self):
        self.value = 1


def test_failed_write_keeps_the_previous_checkpoint_and_leaves_no_temporary(tmp_path, monkeypatch):
    saver = ckpt.Checkpointer(tmp_path, keep_last=1)
    good = saver.save(_state(1), epoch=1, is_best=True)
    before = good.read_bytes()

    # A state that cannot be pickled fails inside torch.save, after part of the file is written.
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        saver.save({**_state(2), "hook": lambda: None}, epoch=2, is_best=True)
    assert saver.all() == [good], "the failed epoch must not prune the last good checkpoint"

    # A write cut short (disk full, a signal) after some bytes went out.
    real_save = torch.save

    def save_then_fail(obj, fh):
        real_save(obj, fh)
        fh.write(b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        ckpt.atomic_save(_state(3), good)  # over the existing file: it must stay as it was
    monkeypatch.undo()

    assert good.read_bytes() == before
    assert torch.equal(ckpt.load(good)["model"]["nets.Cu.0.weight"], torch.full((2, 3), 1.0))
    assert ckpt.load(saver.dir / "best.pt")["epoch"] == 1
    assert sorted(p.name for p in saver.dir.iterdir()) == ["best.pt", "checkpoint_000001.pt"]
    assert not list(saver.dir.glob(f"*{TMP_SUFFIX}"))


def test_load_refuses_pickled_python_objects(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"epoch": 1, "payload": Opaque()}, path)  # plain torch.save pickles the instance
    with pytest.raises(ValueError, match=r"foreign\.pt: not a readable aenet_dist checkpoint") as err:
        ckpt.load(path)
    assert "Opaque" in str(err.value)  # torch's reason (the refused global) is kept in the message
    plain = tmp_path / "plain.pt"
    ckpt.atomic_save(_state(4), plain)
    assert ckpt.load(plain)["config"] == {"name": "x", "hidden": [6, 6]}


def test_load_names_a_missing_or_non_torch_file(tmp_path):
    (tmp_path / "text.pt").write_text("not a checkpoint")
    for path in (tmp_path / "text.pt", tmp_path / "absent.pt"):
        with pytest.raises(ValueError, match=rf"{path.name}: not a readable aenet_dist checkpoint"):
            ckpt.load(path)


def test_keep_last_keeps_the_newest_k_and_best_apart(tmp_path):
    saver = ckpt.Checkpointer(tmp_path, keep_last=2)
    assert saver.all() == [] and saver.latest() is None and saver.describe() is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "notes.txt").write_text("not ours")
    (tmp_path / "checkpoints" / "checkpoint_7.pt").write_text("not our name pattern")
    for epoch in range(1, 6):
        saver.save(_state(epoch), epoch=epoch, is_best=epoch == 2)
        assert len(saver.all()) == min(epoch, 2)
    assert [p.name for p in saver.all()] == ["checkpoint_000004.pt", "checkpoint_000005.pt"]
    assert ckpt.load(saver.dir / "best.pt")["epoch"] == 2  # best of an epoch long pruned
    assert (saver.dir / "notes.txt").exists() and (saver.dir / "checkpoint_7.pt").exists()  # foreign files untouched
    assert saver.describe() == "2 checkpoint(s), newest checkpoint_000005.pt"
    saver.save_best(_state(6))
    assert ckpt.load(saver.dir / "best.pt")["epoch"] == 6 and len(saver.all()) == 2


def test_step_checkpoints_sort_between_their_epochs(tmp_path):
    """checkpoint_E.S.pt (step S of epoch E+1) comes after checkpoint_E.pt and before checkpoint_(E+1).pt,
    numerically (step 10 after step 9)."""
    saver = ckpt.Checkpointer(tmp_path, keep_last=10)
    for epoch, step in [(3, 0), (2, 10), (2, 9), (2, 0), (1, 0)]:
        saver.save(_state(epoch + 1), epoch=epoch, is_best=False, step_in_epoch=step)
    assert [p.name for p in saver.all()] == ["checkpoint_000001.pt", "checkpoint_000002.pt", "checkpoint_000002.000009.pt",
                                            "checkpoint_000002.000010.pt", "checkpoint_000003.pt"]
    assert saver.latest().name == "checkpoint_000003.pt"
    saver.keep_last = 2
    saver.save(_state(5), epoch=3, is_best=False, step_in_epoch=1)
    assert [p.name for p in saver.all()] == ["checkpoint_000003.pt", "checkpoint_000003.000001.pt"]


def test_latest_readable_skips_damaged_newer_checkpoints(tmp_path, caplog):
    saver = ckpt.Checkpointer(tmp_path, keep_last=3)
    for epoch in (1, 2, 3):
        saver.save(_state(epoch), epoch=epoch, is_best=False)
    newest = saver.dir / "checkpoint_000003.pt"
    newest.write_bytes(newest.read_bytes()[:200])  # cut short
    (saver.dir / "checkpoint_000002.pt").write_bytes(b"")  # emptied
    path, state = saver.latest_readable()
    assert path.name == "checkpoint_000001.pt" and state["epoch"] == 1
    assert "checkpoint_000003.pt" in caplog.text and "checkpoint_000002.pt" in caplog.text
    (saver.dir / "checkpoint_000001.pt").write_bytes(b"PK\x03\x04")
    assert saver.latest_readable() is None


def test_weights_mismatch_names_elements_and_shapes():
    ours = {f"nets.{el}.{k}.weight": torch.zeros(4, 3) for el in ("Cu", "Au") for k in range(3)}
    assert ckpt.weights_mismatch(ours, {k: v.clone() for k, v in ours.items()}) is None

    theirs = {k: v for k, v in ours.items() if ".Au." not in k}  # no Au net
    theirs["nets.Ni.0.weight"] = torch.zeros(4, 3)  # an element the model lacks
    theirs["nets.Cu.1.weight"] = torch.zeros(5, 3)
    message = ckpt.weights_mismatch(ours, theirs)
    assert message == ("elements without weights in the checkpoint: Au; elements only in the checkpoint: Ni; "
                       "shapes differ: nets.Cu.1.weight (5, 3) here (4, 3)")

    many = {k: torch.zeros(2, 2) for k in ours}
    message = ckpt.weights_mismatch(ours, many)
    assert message.startswith("shapes differ: ") and message.endswith(" and 2 more") and message.count("here (4, 3)") == 4


def test_rng_state_survives_save_and_load(tmp_path):
    torch.manual_seed(123)
    torch.rand(5)
    path = tmp_path / "rng.pt"
    ckpt.atomic_save({"rng": ckpt.rng_state()}, path)
    expected = (torch.rand(7), torch.randn(3, dtype=torch.float64), torch.randperm(20))
    torch.manual_seed(999)  # anything else in between
    ckpt.set_rng_state(ckpt.load(path)["rng"])
    again = (torch.rand(7), torch.randn(3, dtype=torch.float64), torch.randperm(20))
    assert all(torch.equal(a, b) for a, b in zip(expected, again))


def test_a_cpu_run_keeps_no_cuda_state_and_resumes_from_older_cuda_states(tmp_path):
    """A process that never used CUDA saves no CUDA state (asking would start a context on a GPU node),
    and a state written by an earlier version (one per device rank 0 saw) still loads."""
    assert "cuda" not in ckpt.rng_state() or torch.cuda.is_initialized()
    older = {"torch": torch.get_rng_state(), "cuda": [torch.zeros(16, dtype=torch.uint8)] * 8}
    path = tmp_path / "older.pt"
    ckpt.atomic_save({"rng": older}, path)
    ckpt.set_rng_state(ckpt.load(path)["rng"])  # no CUDA in use here: only the CPU state is set


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_rng_state_is_this_devices_and_older_states_for_more_devices_load(tmp_path):
    torch.zeros(1, device="cuda")  # CUDA in use
    torch.cuda.manual_seed(5)
    state = ckpt.rng_state()
    assert isinstance(state["cuda"], torch.Tensor)
    expected = torch.rand(4, device="cuda")
    ckpt.set_rng_state(state)
    assert torch.equal(torch.rand(4, device="cuda"), expected)
    # an older checkpoint's list, from a node with more GPUs than this process sees
    older = dict(state, cuda=[state["cuda"]] * (torch.cuda.device_count() + 3))
    ckpt.set_rng_state(older)
    assert torch.equal(torch.rand(4, device="cuda"), expected)
