"""Test-only fault injection for the subprocesses that tests launch (training, featurize).

Put this directory on ``PYTHONPATH`` (``helpers.fault_env``) and Python imports it at start-up.
It patches the product from outside, when the patched module is first imported, so the
product carries no test hooks:

* ``AENET_DIST_FAULT_STEP_DELAY=s``: sleep ``s`` seconds before every training step (room to
  send a signal mid-epoch);
* ``AENET_DIST_FAULT_BLOCK_DELAY=s``: sleep ``s`` seconds after featurize writes each block
  (room to kill a run mid-way);
* ``AENET_DIST_FAULT_NAN=rank:step``: on that rank, the training step with that number (from 0)
  gets a NaN in one descriptor of its batch (a copy: kept batches stay clean).

``python -m aenet_dist.train`` runs the ``main`` of the imported module (not of ``__main__``),
so the patched class is the one that runs.
"""

import importlib.abc
import importlib.machinery
import os
import sys
import time

_STEP_DELAY = float(os.environ.get("AENET_DIST_FAULT_STEP_DELAY", "0") or 0)
_BLOCK_DELAY = float(os.environ.get("AENET_DIST_FAULT_BLOCK_DELAY", "0") or 0)
_NAN = tuple(int(v) for v in os.environ["AENET_DIST_FAULT_NAN"].split(":")) if os.environ.get("AENET_DIST_FAULT_NAN") else None


def _patch_train(module) -> None:
    train_step = module.Trainer.train_step

    def faulty_train_step(self, batch):
        time.sleep(_STEP_DELAY)
        if _NAN == (self.info.rank, self.step):
            import copy

            batch = copy.copy(batch)
            batch.G = dict(batch.G)
            element = next(el for el, g in batch.G.items() if g.shape[0])
            batch.G[element] = batch.G[element].clone()
            batch.G[element][0, 0] = float("nan")
            batch.step_cache = None
        return train_step(self, batch)

    module.Trainer.train_step = faulty_train_step


def _patch_store(module) -> None:
    write_block = module.write_block

    def slow_write_block(*args, **kwargs):
        write_block(*args, **kwargs)
        time.sleep(_BLOCK_DELAY)

    module.write_block = slow_write_block


_PATCHES = {name: patch for name, patch, delay in (("aenet_dist.train", _patch_train, _STEP_DELAY or _NAN),
                                                   ("aenet_dist.store", _patch_store, _BLOCK_DELAY)) if delay}


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds the patched modules with the normal machinery and patches them once executed."""

    def find_spec(self, name, path, target=None):
        if name not in _PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            if module.__name__ == name:  # not when run as __main__
                _PATCHES[name](module)

        spec.loader.exec_module = exec_and_patch
        return spec


if _PATCHES:
    sys.meta_path.insert(0, _PatchAfterImport())
