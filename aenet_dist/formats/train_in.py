"""aenet-PyTorch's training input ``train.in``, translated into a :class:`~aenet_dist.config.TrainConfig`.

Format of atomisticnet/aenet-PyTorch (src/read_input.py, doc/aenet-PyTorch-doc.md,
example/02-train/train.in): one keyword per line, case-insensitive, '!' or '#' comments.
Values on the same line, except METHOD and FORCES (key=value parameters on the next line)
and NETWORKS (one line per element: symbol, .nn file, number of hidden layers, nodes:activation...).
Every error is a :class:`ValueError` naming the file and line.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable
from pathlib import Path

from ..config import OPTIM_METHODS, TRAIN_SECTIONS, OptimConfig, TrainConfig, build_train_config, did_you_mean
from ..log import get_logger
from .text import content_lines, fortran_real, read_lines

_log = get_logger(__name__)

_TIN_MAPPED = ("trainingset", "testpercent", "iterations", "iterwrite", "batchsize", "npseed", "phseed",
               "regularization", "memory_mode", "forces", "method", "networks")
_TIN_IGNORED = {  # known keyword -> why it does not change our config
    "mode": "only MODE train exists here",
    "maxenergy": "all structures of the store are used",
    "maxforces": "all structures of the store are used",
    "save_energies": "predictions are written by 'aenet-dist predict'",
    "save_energy": "predictions are written by 'aenet-dist predict'",
    "save_forces": "predictions are written by 'aenet-dist predict'",
    "verbose": "logging is set up by the CLI",
    "save_batches": "batches come from the Zarr store",
    "load_batches": "batches come from the Zarr store",
    "timing": "not implemented",
    "debug": "not implemented",
}
_TIN_KEYWORDS = (*_TIN_MAPPED, *_TIN_IGNORED)
# train.in keywords that take one number: the train.toml key each sets, and the number's type.
_TIN_NUMBERS = {
    "testpercent": ("data.test_percent", float),
    "iterations": ("run.epochs", int),
    "iterwrite": ("run.eval_every", int),
    "batchsize": ("run.batch_size", int),
    "npseed": ("data.split_seed", int),
    "phseed": ("run.seed", int),
    "regularization": ("optim.weight_decay", float),
}
_TIN_MEMORY_MODES = {"cpu": "memory", "gpu": "gpu", "disk": "stream"}
_TIN_METHOD_PARAMS = ("method", "lr", "mu", "momentum", "b1", "b2")


def _tin_number(text: str, convert, label: str, where: str):
    """``text`` as int or float (Fortran ``1.0d-3`` accepted); ValueError names ``label`` and the line."""
    try:
        return fortran_real(text) if convert is float else convert(text)
    except ValueError:
        kind = "an integer" if convert is int else "a number"
        raise ValueError(f"{where}: {label} expects {kind}, got {text!r}") from None


def _tin_one(args: list[str], kw: str, where: str) -> str:
    if len(args) != 1:
        raise ValueError(f"{where}: {kw.upper()} expects one value, got {len(args)}: {' '.join(args) or '(none)'}")
    return args[0]


def _tin_params(args: list[str], kw: str, where: str, known: tuple[str, ...]) -> dict[str, str]:
    """``key=value`` parameters (a leading bare word is the ``method``) of METHOD or FORCES."""
    params = {}
    for i, token in enumerate(args):
        key, sep, value = token.partition("=")
        if not sep:
            if i == 0 and kw == "method":
                key, value = "method", token
            else:
                raise ValueError(f"{where}: {kw.upper()}: expected key=value, got {token!r}")
        key = key.lower()
        if key not in known:
            raise ValueError(f"{where}: {kw.upper()}: unknown parameter {key!r}{did_you_mean(key, known)} (known: {', '.join(known)})")
        params[key] = value
    return params


def read_train_in(path: str | os.PathLike, overrides: Iterable[str] = ()) -> TrainConfig:
    """Translate aenet-PyTorch's ``train.in`` into a :class:`TrainConfig`, then apply ``overrides``.

    ``overrides`` are the command line's ``section.key=value`` strings, applied exactly as for a
    train.toml (:func:`aenet_dist.config.load_train_config`); see :func:`parse_train_in` for the
    keywords.

    Raises:
        ValueError: ``"{path}:{line}: ..."`` for a problem with the file's values,
            ``"override '...': ..."`` for one with an override.
    """
    raw, origins = parse_train_in(path)
    return build_train_config(raw, origins, str(path), overrides)


def parse_train_in(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """The config sections that aenet-PyTorch's ``train.in`` sets, and the line that set each key.

    Mapping: TRAININGSET -> data.store (kept as written: pass the Zarr store there), TESTPERCENT ->
    data.test_percent, ITERATIONS -> run.epochs, ITERWRITE (how often aenet-PyTorch evaluates the
    test set) -> run.eval_every, BATCHSIZE -> run.batch_size, NPSEED (the split's
    numpy seed) -> data.split_seed, PHSEED (torch seed) -> run.seed, METHOD ``method=X lr=Y`` ->
    optim.method / optim.lr, REGULARIZATION -> optim.weight_decay, FORCES ``alpha=A`` ->
    loss.force_weight (0 when FORCES is absent: energies only, as aenet-PyTorch), MEMORY_MODE
    cpu/gpu/disk -> data.cache memory/gpu/stream, NETWORKS -> model.networks; and data.batches =
    fixed, since aenet-PyTorch forms its batches once (an override may say reshuffle). Other
    aenet-PyTorch keywords (MAXENERGY, SAVE_ENERGIES, ...) are logged as warnings and ignored.

    Returns:
        ``(raw, origins)``: the nested sections, as :func:`aenet_dist.config.build_train_config`
        takes them, and ``"{path}:{line}"`` for each dotted key (``model.networks.<element>`` for
        a NETWORKS line), so that a value's error names its line.

    Raises:
        ValueError: ``"{path}:{line}: ..."`` for unknown keywords and bad numbers.
    """
    path = Path(path)
    entries = [(i + 1, text.split()) for i, text in content_lines(read_lines(path, "train.in"))]  # comments removed

    raw: dict[str, dict] = {name: {} for name in TRAIN_SECTIONS}
    origins: dict[str, str] = {}
    seen: dict[str, int] = {}

    def put(dotted: str, value, where: str):
        section, key = dotted.split(".", 1)
        raw[section][key] = value
        origins[dotted] = where

    i = 0
    while i < len(entries):
        n, tokens = entries[i]
        i += 1
        kw, args, where = tokens[0].lower(), tokens[1:], f"{path}:{n}"
        if kw not in _TIN_KEYWORDS:
            close = difflib.get_close_matches(kw, _TIN_KEYWORDS, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0].upper()}?)" if close else ""
            raise ValueError(f"{where}: unknown keyword {tokens[0]!r}{hint}")
        if kw in seen:
            raise ValueError(f"{where}: {kw.upper()} given twice (first on line {seen[kw]})")
        seen[kw] = n
        if kw in ("method", "forces") and not args and i < len(entries) and entries[i][1][0].lower() not in _TIN_KEYWORDS:
            n, args = entries[i]  # parameters on the next line
            i += 1
            where = f"{path}:{n}"

        if kw == "trainingset":
            put("data.store", _tin_one(args, kw, where), where)
        elif kw in _TIN_NUMBERS:
            key, kind = _TIN_NUMBERS[kw]
            put(key, _tin_number(_tin_one(args, kw, where), kind, kw.upper(), where), where)
        elif kw == "memory_mode":
            mode = _tin_one(args, kw, where).lower()
            if mode not in _TIN_MEMORY_MODES:
                raise ValueError(f"{where}: MEMORY_MODE must be cpu, gpu or disk, got {args[0]!r}")
            put("data.cache", _TIN_MEMORY_MODES[mode], where)
        elif kw == "forces":
            params = _tin_params(args, kw, where, ("alpha",))
            if "alpha" not in params:
                raise ValueError(f"{where}: FORCES needs alpha=<force weight> (on the line after FORCES)")
            put("loss.force_weight", _tin_number(params["alpha"], float, "FORCES alpha", where), where)
        elif kw == "method":
            params = _tin_params(args, kw, where, _TIN_METHOD_PARAMS)
            method = params.get("method", "").lower()
            if not method:
                raise ValueError(f"{where}: METHOD needs a method name, e.g. 'method=adamw lr=0.0001'")
            if method not in OPTIM_METHODS:
                raise ValueError(f"{where}: METHOD {method!r} is not supported; use one of {', '.join(OPTIM_METHODS)}")
            put("optim.method", method, where)
            if "lr" in params and "mu" in params:
                raise ValueError(f"{where}: METHOD: give lr or mu (aenet's name), not both")
            for name, dotted in (("lr", "optim.lr"), ("mu", "optim.lr"), ("momentum", "optim.momentum")):
                if name in params:
                    put(dotted, _tin_number(params[name], float, f"METHOD {name}", where), where)
            if "b1" in params or "b2" in params:
                betas = OptimConfig().betas
                put("optim.betas", [_tin_number(params.get("b1", str(betas[0])), float, "METHOD b1", where),
                                    _tin_number(params.get("b2", str(betas[1])), float, "METHOD b2", where)], where)
        elif kw == "networks":
            if args:
                raise ValueError(f"{where}: NETWORKS takes no value on its line; one line per element follows")
            count = None
            if i < len(entries) and len(entries[i][1]) == 1 and entries[i][1][0].isdigit():
                count = int(entries[i][1][0])  # optional count line
                i += 1
            networks: dict[str, dict] = {}
            while i < len(entries) and entries[i][1][0].lower() not in _TIN_KEYWORDS:
                n, t = entries[i]
                i += 1
                w = f"{path}:{n}"
                if len(t) < 3:
                    raise ValueError(f"{w}: NETWORKS line must read '<element> <file.nn> <layers> <nodes:activation>...', got {' '.join(t)!r}")
                element, num_layers = t[0], _tin_number(t[2], int, f"NETWORKS: {t[0]} number of hidden layers", w)
                if len(t) - 3 != num_layers:
                    raise ValueError(f"{w}: NETWORKS: {element} declares {num_layers} hidden layers but lists {len(t) - 3}")
                if element in networks:
                    raise ValueError(f"{w}: NETWORKS: {element} given twice")
                hidden, activations = [], []
                for layer in t[3:]:
                    nodes, sep, act = layer.partition(":")
                    if not sep or not act:
                        raise ValueError(f"{w}: NETWORKS: expected nodes:activation, got {layer!r}")
                    hidden.append(_tin_number(nodes, int, f"NETWORKS: {element} number of nodes", w))
                    activations.append(act.lower())
                networks[element] = {"hidden": hidden, "activations": activations}
                origins[f"model.networks.{element}"] = w
                _log.debug("%s: network file %s of %s is not used (see 'aenet-dist export')", w, t[1], element)
            if not networks:
                raise ValueError(f"{where}: NETWORKS lists no element")
            if count is not None and count != len(networks):
                raise ValueError(f"{where}: NETWORKS announces {count} elements but lists {len(networks)}")
            raw["model"]["networks"] = networks
        else:
            value = " ".join(args).lower()
            if (kw, value) != ("mode", "train"):  # this one matches what we do
                _log.warning("%s: %s is not supported by aenet_dist and is ignored (%s)", where, kw.upper(), _TIN_IGNORED[kw])

    if "trainingset" not in seen:
        raise ValueError(f"{path}: TRAININGSET is missing (give the Zarr store written by 'aenet-dist featurize')")
    if "forces" not in seen:
        raw["loss"]["force_weight"] = 0.0  # aenet-PyTorch fits energies only without FORCES
    put("data.batches", "fixed", f"{path} (aenet-PyTorch forms its batches once)")
    return raw, origins
