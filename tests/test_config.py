"""Tests of the training configuration in aenet_dist.config: dataclasses, TOML, overrides, train.in."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import pytest

from aenet_dist.config import (
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    StoreOptions,
    TrainConfig,
    dump_toml,
    load_train_config,
    save_resolved_config,
)
from aenet_dist.formats.train_in import read_train_in
from aenet_dist.model import NetworkConfig

DATA = Path(__file__).resolve().parent / "data"


def _cfg(**sections) -> dict:
    """A minimal valid raw config dict with ``sections`` merged in."""
    return {"data": {"store": "x.zarr"}, **sections}


@pytest.fixture
def config_warnings():
    """Warnings logged by aenet_dist.config and the train.in reader (independent of whether setup_logging ran)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in ("aenet_dist.config", "aenet_dist.train_in")]
    for logger in loggers:
        logger.addHandler(handler)
    yield records
    for logger in loggers:
        logger.removeHandler(handler)


# --------------------------------------------------------------------------- dataclasses


def test_defaults_valid():
    cfg = TrainConfig(data=DataConfig(store="x.zarr"))
    assert cfg.data == DataConfig("x.zarr", 10.0, 0, "auto", None)
    assert cfg.model.hidden == (5, 5) and cfg.model.activations == ("tanh", "tanh") and cfg.model.networks == {}
    assert cfg.optim == OptimConfig("adamw", 1e-4, 0.0, 0.9, (0.9, 0.999), None)
    assert cfg.schedule == ScheduleConfig("none", 100, 0.5, 10, 0.5, 0.0)
    assert cfg.loss == LossConfig(0.1, 0.0)
    assert cfg.run == RunConfig(epochs=100, batch_size=128, dtype="float32", device="auto", seed=0, run_dir="runs/default",
                                checkpoint_every=None, checkpoint_interval_s=60.0, keep_last=2, early_stop_patience=None,
                                log_every=0)
    assert cfg.model.network_for("Ti") == NetworkConfig((5, 5), ("tanh", "tanh"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]


def test_coercion():
    optim = OptimConfig(lr=1, betas=[0, 0.99])
    assert isinstance(optim.lr, float) and optim.betas == (0.0, 0.99)
    assert RunConfig(epochs=3.0).epochs == 3 and isinstance(RunConfig(epochs=3.0).epochs, int)
    model = ModelConfig(hidden=[3], activations=["t"], networks={"Ti": {"hidden": [4, 4], "activations": ["sigmoid", "w"]}})
    assert model.hidden == (3,) and model.activations == ("tanh",)
    assert model.networks == {"Ti": {"hidden": (4, 4), "activations": ("sigmoid", "twist")}}
    assert model.network_for("Ti") == NetworkConfig((4, 4), ("sigmoid", "twist"))
    assert model.network_for("O") == NetworkConfig((3,), ("tanh",))
    # a network entry may give only one key; the other comes from the model-wide value
    assert ModelConfig(networks={"O": {"hidden": [7, 7]}}).network_for("O") == NetworkConfig((7, 7), ("tanh", "tanh"))
    assert ModelConfig(networks={"O": NetworkConfig((2,), ("linear",))}).networks["O"]["hidden"] == (2,)


@pytest.mark.parametrize("make, match", [
    (lambda: DataConfig(""), "data.store"),
    (lambda: DataConfig("x", test_percent=100), r"data.test_percent must be in \[0, 100\), got 100.0"),
    (lambda: DataConfig("x", test_percent=-1), "data.test_percent"),
    (lambda: DataConfig("x", split_seed=-1), "data.split_seed"),
    (lambda: DataConfig("x", cache="disk"), "data.cache must be one of"),
    (lambda: DataConfig("x", num_shards=0), "data.num_shards"),
    (lambda: DataConfig("x", test_percent="10"), r"data.test_percent must be a number, got string '10' \(a quoted number"),
    (lambda: ModelConfig(hidden=(5, 5), activations=("tanh",)), "model.activations has 1 entries but model.hidden has 2"),
    (lambda: ModelConfig(hidden=(0, 5)), "model.hidden layer sizes must be >= 1"),
    (lambda: ModelConfig(activations=("tanh", "relu")), "model.activations: unknown activation 'relu'"),
    (lambda: ModelConfig(hidden=(5, "5")), r"model.hidden\[1\] must be an integer"),
    (lambda: ModelConfig(networks={"Ti": {"hidden": [5], "activations": ["tanh", "tanh"]}}), "model.networks.Ti.activations has 2"),
    (lambda: ModelConfig(networks={"Ti": {"hiden": [5]}}), r"unknown key 'model.networks.Ti.hiden' \(did you mean 'model.networks.Ti.hidden'\?\)"),
    (lambda: ModelConfig(networks={"Ti": [5]}), "model.networks.Ti must be a table"),
    (lambda: ModelConfig(networks={"": {}}), "model.networks keys must be element symbols"),
    (lambda: OptimConfig(method="lbfgs"), "optim.method must be one of 'adam', 'adamw', 'sgd'"),
    (lambda: OptimConfig(method="adamW"), r"did you mean 'adamw'\?"),
    (lambda: OptimConfig(lr=-1), "optim.lr must be > 0, got -1"),
    (lambda: OptimConfig(lr=0), "optim.lr must be > 0"),
    (lambda: OptimConfig(weight_decay=-1e-3), "optim.weight_decay must be >= 0"),
    (lambda: OptimConfig(momentum=1.0), "optim.momentum"),
    (lambda: OptimConfig(betas=(0.9, 1.0)), "optim.betas must both be in"),
    (lambda: OptimConfig(betas=(0.9,)), "optim.betas must be a list of 2 values"),
    (lambda: OptimConfig(clip_grad_norm=0), "optim.clip_grad_norm must be > 0"),
    (lambda: OptimConfig(lr=True), "optim.lr must be a number, got bool"),
    (lambda: ScheduleConfig(kind="exp"), "schedule.kind must be one of"),
    (lambda: ScheduleConfig(step_size=0), "schedule.step_size"),
    (lambda: ScheduleConfig(gamma=0), r"schedule.gamma must be in \(0, 1\]"),
    (lambda: ScheduleConfig(patience=-1), "schedule.patience"),
    (lambda: ScheduleConfig(factor=1.0), r"schedule.factor must be in \(0, 1\)"),
    (lambda: ScheduleConfig(min_lr=-1), "schedule.min_lr"),
    (lambda: LossConfig(force_weight=1.5), r"loss.force_weight must be in \[0, 1\], got 1.5"),
    (lambda: LossConfig(l2=-1), "loss.l2 must be >= 0"),
    (lambda: RunConfig(epochs=0), "run.epochs must be > 0, got 0"),
    (lambda: RunConfig(epochs=2.5), "run.epochs must be an integer, got float 2.5"),
    (lambda: RunConfig(batch_size=0), "run.batch_size must be > 0"),
    (lambda: RunConfig(dtype="float16"), "run.dtype must be one of 'float32', 'float64'"),
    (lambda: RunConfig(device="gpu"), "run.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    (lambda: RunConfig(device="cuda:x"), "run.device"),
    (lambda: RunConfig(seed=-1), "run.seed"),
    (lambda: RunConfig(run_dir=""), "run.run_dir"),
    (lambda: RunConfig(checkpoint_every=0), "run.checkpoint_every"),
    (lambda: RunConfig(keep_last=0), "run.keep_last must be >= 1"),
    (lambda: RunConfig(early_stop_patience=0), "run.early_stop_patience"),
    (lambda: RunConfig(log_every=-1), "run.log_every"),
    (lambda: TrainConfig(data=DataConfig("x", cache="gpu"), run=RunConfig(device="cpu")), "data.cache = 'gpu' needs a CUDA device"),
    (lambda: TrainConfig(data={"store": "x"}), "data must be a DataConfig"),
])
def test_validation_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_valid_edge_values():
    assert DataConfig("x", test_percent=0).test_percent == 0.0
    assert RunConfig(device="cuda:3").device == "cuda:3"
    assert LossConfig(force_weight=1).force_weight == 1.0
    assert ModelConfig(hidden=(), activations=()).network_for("Ti").hidden == ()


# --------------------------------------------------------------------------- dict round trip, unknown keys


def test_to_dict_from_dict_round_trip():
    cfg = TrainConfig(
        data=DataConfig("s.zarr", num_shards=8),
        model=ModelConfig(networks={"Ti": {"hidden": [3], "activations": ["mtanh"]}}),
        optim=OptimConfig(method="sgd", clip_grad_norm=1.0),
        run=RunConfig(early_stop_patience=5),
    )
    d = cfg.to_dict()
    assert d["model"]["hidden"] == [5, 5] and d["optim"]["betas"] == [0.9, 0.999]
    assert d["model"]["networks"] == {"Ti": {"hidden": [3], "activations": ["mtanh"]}}
    assert d["data"]["num_shards"] == 8 and d["run"]["log_every"] == 0 and d["optim"]["clip_grad_norm"] == 1.0
    assert TrainConfig.from_dict(d) == cfg
    assert TrainConfig.from_dict(TrainConfig(DataConfig("x")).to_dict()).data.num_shards is None


@pytest.mark.parametrize("raw, match", [
    (_cfg(optim={"lrr": 1}), r"train.toml: unknown key 'optim.lrr' \(did you mean 'optim.lr'\?\)"),
    (_cfg(optimizer={"lr": 1}), r"train.toml: unknown key 'optimizer' \(did you mean 'optim'\?\)"),
    (_cfg(lr=1e-3), r"train.toml: unknown key 'lr' \(did you mean 'optim.lr'\?\)"),
    (_cfg(optim={"epochs": 5}), r"train.toml: unknown key 'optim.epochs' \(did you mean 'run.epochs'\?\)"),
    (_cfg(run={"keep_lats": 3}), r"did you mean 'run.keep_last'\?"),
    (_cfg(model={"networks": {"Ti": {"activation": ["tanh"]}}}),
     r"train.toml: unknown key 'model.networks.Ti.activation' \(did you mean 'model.networks.Ti.activations'\?\)"),
    (_cfg(zzz=1), r"train.toml: unknown key 'zzz'$"),
    # names other tools use: suggested by name (difflib sees nothing close)
    (_cfg(optim={"learning_rate": 1}), r"train.toml: unknown key 'optim.learning_rate' \(did you mean 'optim.lr'\?\)$"),
    (_cfg(schedule={"type": "cosine"}), r"train.toml: unknown key 'schedule.type' \(did you mean 'schedule.kind'\?\)$"),
    (_cfg(optim={"type": "adam"}), r"train.toml: unknown key 'optim.type' \(did you mean 'optim.method'\?\)$"),
    # nothing close: the section's keys (not a match on the shared "optim." prefix)
    (_cfg(optim={"zzzz": 1}), r"train.toml: unknown key 'optim.zzzz'; \[optim\] has the keys method, lr, weight_decay, "),
    ({"data": {}}, "train.toml: missing required key 'data.store'"),
    ({}, "train.toml: missing required key 'data.store'"),
    (_cfg(optim=3), "train.toml: optim must be a table, got int 3"),
    (_cfg(optim={"lr": "1e-3"}), r"train.toml: optim.lr must be a number, got string '1e-3' \(a quoted number"),
    (_cfg(run={"epochs": "many"}), "train.toml: run.epochs must be an integer, got string 'many'"),
    (_cfg(model={"hidden": 10}), "train.toml: model.hidden must be a list, got int 10"),
    (_cfg(optim={"lr": -1}), "train.toml: optim.lr must be > 0, got -1"),
])
def test_from_dict_errors(raw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(raw, source="train.toml")


# --------------------------------------------------------------------------- TOML files, overrides


def test_load_train_toml():
    cfg = load_train_config(DATA / "train.toml")
    assert cfg.data.store == str(DATA / "tio2.zarr")
    assert cfg.data.test_percent == 20.0 and cfg.data.cache == "memory"
    assert cfg.model.network_for("Ti") == NetworkConfig((10, 10), ("tanh", "tanh"))
    assert cfg.model.network_for("O") == NetworkConfig((8,), ("twist",))
    assert cfg.optim.method == "adam" and cfg.optim.lr == 1e-3 and cfg.optim.clip_grad_norm == 10.0
    assert cfg.schedule.kind == "cosine" and cfg.schedule.min_lr == 1e-6
    assert cfg.loss.force_weight == 0.2
    assert cfg.run.epochs == 5 and cfg.run.dtype == "float64" and cfg.run.run_dir == str(DATA / "runs" / "test")


def test_relative_paths(tmp_path, monkeypatch):
    sub = tmp_path / "configs"
    sub.mkdir()
    toml = sub / "train.toml"
    toml.write_text('[data]\nstore = "../stores/tio2.zarr"\n')
    cfg = load_train_config(toml)
    assert cfg.data.store == str(tmp_path / "stores" / "tio2.zarr")
    assert cfg.run.run_dir == str(sub / "runs" / "default")  # the default, too, sits next to the file
    toml.write_text(f'[data]\nstore = "{tmp_path / "abs.zarr"}"\n[run]\nrun_dir = "~/runs/x"\n')
    cfg = load_train_config(toml)
    assert cfg.data.store == str(tmp_path / "abs.zarr")
    assert cfg.run.run_dir == os.path.join(os.path.expanduser("~"), "runs", "x")
    toml.write_text('[data]\nstore = "s3://bucket/tio2.zarr"\n')
    assert load_train_config(toml).data.store == "s3://bucket/tio2.zarr"
    # data.batch_dir: relative to the file, a job's $TMPDIR expanded
    monkeypatch.setenv("JOB_SCRATCH", str(tmp_path / "scratch"))
    toml.write_text('[data]\nstore = "a.zarr"\nbatch_dir = "$JOB_SCRATCH/kept"\n')
    assert load_train_config(toml).data.batch_dir == str(tmp_path / "scratch" / "kept")
    toml.write_text('[data]\nstore = "a.zarr"\nbatch_dir = "kept"\n')
    assert load_train_config(toml).data.batch_dir == str(sub / "kept")
    monkeypatch.delenv("JOB_SCRATCH")
    toml.write_text('[data]\nstore = "a.zarr"\nbatch_dir = "$JOB_SCRATCH/kept"\n')
    with pytest.raises(ValueError, match="environment variable that is not set"):
        load_train_config(toml)
    toml.write_text('[data]\nstore = "s3://bucket/tio2.zarr"\n')
    # paths typed as overrides are relative to the current directory
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cfg = load_train_config(toml, ["data.store=x.zarr", "run.run_dir=2024"])
    assert cfg.data.store == str(work / "x.zarr") and cfg.run.run_dir == str(work / "2024")


def test_overrides():
    cfg = load_train_config(DATA / "train.toml", [
        "optim.lr=1e-2",
        "optim.method=adamw",
        "model.hidden=[20, 20, 20]",
        "model.activations=[sigmoid, tanh, linear]",
        "run.dtype=float32",
        "run.epochs = 7",
        "run.early_stop_patience=3",
        "optim.clip_grad_norm=none",
        "optim.betas=[0.8, 0.9]",
        "loss.l2=.5",
        "data.num_shards=4",
        "model.networks.Ti.hidden=[3]",
        "model.networks.Ti.activations=['tanh']",
        "model.networks.O={hidden = [2, 2], activations = ['mtanh', 'linear']}",
        'data.split_seed=1_000',
    ])
    assert cfg.optim.lr == 1e-2 and cfg.optim.method == "adamw" and cfg.optim.betas == (0.8, 0.9)
    assert cfg.model.hidden == (20, 20, 20) and cfg.model.activations == ("sigmoid", "tanh", "linear")
    assert cfg.run.dtype == "float32" and cfg.run.epochs == 7 and cfg.run.early_stop_patience == 3
    assert cfg.optim.clip_grad_norm is None and cfg.loss.l2 == 0.5 and cfg.data.num_shards == 4
    assert cfg.data.split_seed == 1000
    assert cfg.model.network_for("Ti") == NetworkConfig((3,), ("tanh",))
    assert cfg.model.network_for("O") == NetworkConfig((2, 2), ("mtanh", "linear"))
    assert cfg.model.network_for("Zr") == NetworkConfig((20, 20, 20), ("sigmoid", "tanh", "linear"))
    # later overrides win; the file is untouched
    assert load_train_config(DATA / "train.toml", ["run.epochs=1", "run.epochs=2"]).run.epochs == 2
    assert load_train_config(DATA / "train.toml").run.epochs == 5


@pytest.mark.parametrize("override, match", [
    ("optim.lrr=1e-3", r"^override 'optim.lrr=1e-3': unknown key 'optim.lrr' \(did you mean 'optim.lr'\?\)"),
    ("optimizer.lr=1", r"^override 'optimizer.lr=1': unknown key 'optimizer.lr' \(did you mean 'optim.lr'\?\)"),
    ("model.networks.Ti.hiden=[3]", r"unknown key 'model.networks.Ti.hiden' \(did you mean 'model.networks.Ti.hidden'\?\)"),
    ("run.epochs.x=1", "unknown key 'run.epochs.x'"),
    ("optim.lr", "expected section.key=value"),
    ("=3", "expected section.key=value"),
    ("optim..lr=3", "expected section.key=value"),
    ("optim=3", "'optim' is a whole section"),
    ("optim.lr=abc", r"^override 'optim.lr=abc': optim.lr must be a number, got string 'abc'"),
    ("model.hidden=[a, b]", r"model.hidden\[0\] must be an integer"),
    ("optim.lr=-1", r"^override 'optim.lr=-1': optim.lr must be > 0, got -1"),
    ("run.device=gpu", r"^override 'run.device=gpu': run.device must be"),
    ("model.hidden=[1,2,3]", r"^override 'model.hidden=\[1,2,3\]': model.activations has 2 entries but model.hidden has 3"),
])
def test_override_errors(override, match):
    with pytest.raises(ValueError, match=match):
        load_train_config(DATA / "train.toml", [override])


def test_toml_file_errors(tmp_path):
    bad = tmp_path / "train.toml"
    bad.write_text('[data]\nstore = "x.zarr"\n[optim]\nlrr = 1e-3\n')
    with pytest.raises(ValueError, match=rf"^{bad}: unknown key 'optim.lrr' \(did you mean 'optim.lr'\?\)"):
        load_train_config(bad)
    # a typo in the file is reported even when an override would set the right key
    with pytest.raises(ValueError, match=rf"^{bad}: unknown key 'optim.lrr'"):
        load_train_config(bad, ["optim.lr=1e-3"])
    bad.write_text('[data]\nstore = "x.zarr"\n[run]\nepochs = "10"\n')
    with pytest.raises(ValueError, match=rf"^{bad}: run.epochs must be an integer, got string '10'"):
        load_train_config(bad)
    bad.write_text('[data]\nstore = "x.zarr"\n[optim]\nlr = -1\n')
    with pytest.raises(ValueError, match=rf"^{bad}: optim.lr must be > 0, got -1"):
        load_train_config(bad)
    bad.write_text("[data\n")
    with pytest.raises(ValueError, match=rf"^{bad}: invalid TOML"):
        load_train_config(bad)
    bad.write_text("[optim]\nlr = 1e-3\n")
    with pytest.raises(ValueError, match=rf"^{bad}: missing required key 'data.store'"):
        load_train_config(bad)
    assert load_train_config(bad, ["data.store=x.zarr"]).optim.lr == 1e-3


def test_dump_toml_round_trip(tmp_path):
    weird = str(tmp_path / 'we"ird\\dir\tü')
    configs = [
        load_train_config(DATA / "train.toml"),
        TrainConfig(
            data=DataConfig(weird, test_percent=0, split_seed=5, cache="pinned", num_shards=16),
            model=ModelConfig(hidden=(7,), activations=("sigmoid",),
                              networks={"Ti": {"hidden": [4, 3], "activations": ["twist", "linear"]}, "O": {"hidden": [], "activations": []}}),
            optim=OptimConfig(method="sgd", lr=3e-7, weight_decay=1e-12, momentum=0.0, betas=(0.5, 0.75), clip_grad_norm=0.25),
            schedule=ScheduleConfig(kind="plateau", step_size=3, gamma=1, patience=0, factor=0.1, min_lr=1e-30),
            loss=LossConfig(force_weight=1, l2=1e-5),
            run=RunConfig(epochs=1, batch_size=1, dtype="float64", device="cuda:1", seed=2**40, run_dir=weird,
                          checkpoint_every=5, keep_last=1, early_stop_patience=2, log_every=10),
        ),
        read_train_in(DATA / "train.in"),
    ]
    for i, cfg in enumerate(configs):
        path = tmp_path / f"c{i}" / "config.toml"
        path.parent.mkdir()
        text = dump_toml(cfg)
        path.write_text(text)
        back = load_train_config(path)
        if not os.path.isabs(cfg.data.store):  # relative paths resolve against the dumped file
            back = dataclasses.replace(back, data=dataclasses.replace(back.data, store=cfg.data.store),
                                       run=dataclasses.replace(back.run, run_dir=cfg.run.run_dir))
        assert back == cfg, text
    header = dump_toml(configs[0]).splitlines()[:2]
    assert header == ["# aenet_dist training configuration",
                      "# unset (TOML has no null): data.num_shards, data.memory_budget_gb, data.readers, data.batch_dir, run.checkpoint_every, "
                      "run.early_stop_patience"]


def test_save_resolved_config(tmp_path):
    cfg = load_train_config(DATA / "train.toml")
    run_dir = tmp_path / "runs" / "a"
    path = save_resolved_config(cfg, run_dir)
    assert path == run_dir / "config.toml"
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.toml"]  # no temp file left behind
    assert load_train_config(path) == cfg
    save_resolved_config(dataclasses.replace(cfg, loss=LossConfig(force_weight=0.5)), run_dir)
    assert load_train_config(path).loss.force_weight == 0.5


# --------------------------------------------------------------------------- aenet-PyTorch train.in


def test_read_train_in(config_warnings):
    cfg = read_train_in(DATA / "train.in")
    # batches formed once, as aenet-PyTorch forms them
    assert cfg.data == DataConfig(store="tio2.zarr", test_percent=10.0, split_seed=3, cache="gpu", batches="fixed")
    assert cfg.run.epochs == 250 and cfg.run.batch_size == 128 and cfg.run.seed == 7 and cfg.run.eval_every == 1
    assert cfg.optim.method == "adamw" and cfg.optim.lr == 1e-4 and cfg.optim.weight_decay == 1e-3
    assert cfg.loss.force_weight == 0.1 and cfg.loss.l2 == 0.0
    assert cfg.model.networks == {"Ti": {"hidden": (5, 5), "activations": ("tanh", "tanh")},
                                  "O": {"hidden": (5, 5), "activations": ("tanh", "tanh")}}
    assert cfg.model.network_for("Ti") == NetworkConfig((5, 5), ("tanh", "tanh"))
    # SAVE_ENERGIES is known but unsupported
    messages = [r.getMessage() for r in config_warnings]
    assert len(messages) == 1 and "SAVE_ENERGIES" in messages[0] and "train.in:19" in messages[0]


def test_read_train_in_variants(tmp_path, config_warnings):
    tin = tmp_path / "train.in"
    tin.write_text(
        "trainingset ../refdata.zarr   ! inline comment\n"
        "iterations 10\n"
        "iterwrite 5\n"                 # the test set every 5th epoch
        "method adam lr=1d-3\n"         # parameters on the keyword's line, Fortran exponent
        "maxenergy 0.5\n"
        "networks\n"
        "2\n"                            # optional count line
        "  Ti Ti.nn 1 4:TWIST\n"
        "  O  O.nn  3 3:t 3:sigmoid 2:linear\n"
    )
    cfg = read_train_in(tin)
    assert cfg.data.store == "../refdata.zarr" and cfg.data.test_percent == 10.0 and cfg.data.cache == "auto"
    assert cfg.run.eval_every == 5 and cfg.data.batches == "fixed"
    assert cfg.optim.method == "adam" and cfg.optim.lr == 1e-3 and cfg.optim.weight_decay == 0.0
    assert cfg.loss.force_weight == 0.0  # no FORCES: energies only, as in aenet-PyTorch
    assert cfg.model.network_for("Ti") == NetworkConfig((4,), ("twist",))
    assert cfg.model.network_for("O") == NetworkConfig((3, 3, 2), ("tanh", "sigmoid", "linear"))
    assert any("MAXENERGY" in r.getMessage() for r in config_warnings)
    tin.write_text("TRAININGSET x.zarr\nMETHOD\nsgd mu=0.01 momentum=0.5\nMEMORY_MODE disk\nFORCES\nalpha=1\n")
    cfg = read_train_in(tin)
    assert (cfg.optim.method, cfg.optim.lr, cfg.optim.momentum) == ("sgd", 0.01, 0.5)
    assert cfg.data.cache == "stream" and cfg.loss.force_weight == 1.0


@pytest.mark.parametrize("text, line, match", [
    ("TRAININGSET x\nTESTPERCENT 10\nFOO 3\n", 3, r"unknown keyword 'FOO'$"),
    ("TRAININGSET x\nITERATONS 10\n", 2, r"unknown keyword 'ITERATONS' \(did you mean ITERATIONS\?\)"),
    ("TRAININGSET x\nITERATIONS 1O0\n", 2, "ITERATIONS expects an integer, got '1O0'"),
    ("TRAININGSET x\nTESTPERCENT ten\n", 2, "TESTPERCENT expects a number, got 'ten'"),
    ("TRAININGSET x\nREGULARIZATION\n", 2, r"REGULARIZATION expects one value, got 0"),
    ("TRAININGSET x\nTESTPERCENT 150\n", 2, r"data.test_percent must be in \[0, 100\), got 150.0"),
    ("TRAININGSET x\nBATCHSIZE 0\n", 2, "run.batch_size must be > 0"),
    ("TRAININGSET x\nBATCHSIZE 2\nBATCHSIZE 4\n", 3, r"BATCHSIZE given twice \(first on line 2\)"),
    ("TRAININGSET x\nMETHOD\nmethod=lbfgs lr=0.1\n", 3, "METHOD 'lbfgs' is not supported"),
    ("TRAININGSET x\nMETHOD\nmethod=adam lr=fast\n", 3, "METHOD lr expects a number, got 'fast'"),
    ("TRAININGSET x\nMETHOD\nmethod=adam lr=-1\n", 3, "optim.lr must be > 0"),
    ("TRAININGSET x\nMETHOD\nmethod=adam rate=0.1\n", 3, "METHOD: unknown parameter 'rate'"),
    ("TRAININGSET x\nFORCES\nMETHOD\nmethod=adam\n", 2, "FORCES needs alpha="),
    ("TRAININGSET x\nFORCES\nalpha=2\n", 3, r"loss.force_weight must be in \[0, 1\], got 2.0"),
    ("TRAININGSET x\nMEMORY_MODE tpu\n", 2, "MEMORY_MODE must be cpu, gpu or disk"),
    ("TRAININGSET x\nNETWORKS\nTi Ti.nn 2 5:tanh\n", 3, "Ti declares 2 hidden layers but lists 1"),
    ("TRAININGSET x\nNETWORKS\nTi Ti.nn 1 5:relu\n", 3, "model.networks.Ti.activations: unknown activation 'relu'"),
    ("TRAININGSET x\nNETWORKS\nTi Ti.nn 1 5tanh\n", 3, "expected nodes:activation, got '5tanh'"),
    ("TRAININGSET x\nNETWORKS\nTi Ti.nn 1 five:tanh\n", 3, "NETWORKS: Ti number of nodes expects an integer"),
    ("TRAININGSET x\nNETWORKS\n3\nTi Ti.nn 1 5:tanh\n", 2, "NETWORKS announces 3 elements but lists 1"),
    ("TRAININGSET x\nNETWORKS\nITERATIONS 3\n", 2, "NETWORKS lists no element"),
])
def test_read_train_in_errors(tmp_path, text, line, match):
    tin = tmp_path / "train.in"
    tin.write_text(text)
    with pytest.raises(ValueError, match=rf"^{tin}:{line}: .*{match}"):
        read_train_in(tin)


def test_read_train_in_missing_trainingset(tmp_path):
    tin = tmp_path / "train.in"
    tin.write_text("ITERATIONS 3\n")
    with pytest.raises(ValueError, match=rf"^{tin}: TRAININGSET is missing"):
        read_train_in(tin)


def test_train_in_takes_the_overrides_of_a_toml(tmp_path):
    """One override path: a train.in takes every train.toml override, with the same messages."""
    cfg = read_train_in(DATA / "train.in", ["model.networks.Ti.hidden=[8,8]", "run.epochs=5", "optim.lr=1e-3"])
    assert cfg.model.network_for("Ti") == NetworkConfig((8, 8), ("tanh", "tanh"))  # activations from the file
    assert cfg.model.network_for("O") == NetworkConfig((5, 5), ("tanh", "tanh"))
    assert (cfg.run.epochs, cfg.optim.lr, cfg.run.batch_size) == (5, 1e-3, 128)
    assert read_train_in(DATA / "train.in", ["model.networks.Zr.hidden=[3,3]"]).model.network_for("Zr").hidden == (3, 3)
    for override in ("optim.lrr=1e-3", "model.networks.Ti.hiden=[3]", "optim.lr=abc", "optim.lr=-1", "run.dtype=half",
                     "optim=3", "run.epochs.x=1"):
        with pytest.raises(ValueError) as from_toml:
            load_train_config(DATA / "train.toml", [override])
        with pytest.raises(ValueError) as from_train_in:
            read_train_in(DATA / "train.in", [override])
        assert str(from_train_in.value) == str(from_toml.value), override
    with pytest.raises(ValueError, match=r"^override 'optim.lrr=1': unknown key 'optim.lrr' \(did you mean 'optim.lr'\?\)$"):
        read_train_in(DATA / "train.in", ["optim.lrr=1"])


def test_errors_blame_the_line_or_the_override(tmp_path):
    """A value's error names the train.in line that set it, or the override that changed it."""
    tin = tmp_path / "train.in"
    tin.write_text("TRAININGSET x.zarr\nNETWORKS\n  Ti Ti.nn 2 5:tanh 5:relu\n")
    with pytest.raises(ValueError, match=rf"^{tin}:3: model.networks.Ti.activations: unknown activation 'relu'"):
        read_train_in(tin, ["run.epochs=5"])
    tin.write_text("TRAININGSET x.zarr\nNETWORKS\n  Ti Ti.nn 2 5:tanh 5:tanh\nBATCHSIZE 0\n")
    with pytest.raises(ValueError, match=rf"^{tin}:4: run.batch_size must be > 0"):
        read_train_in(tin)
    assert read_train_in(tin, ["run.batch_size=4"]).run.batch_size == 4  # an override replaces the bad value
    with pytest.raises(ValueError, match=r"^override 'model.networks.Ti.hidden=\[8\]': model.networks.Ti.activations has 2"):
        read_train_in(tin, ["run.batch_size=4", "model.networks.Ti.hidden=[8]"])


def test_missing_or_unreadable_config_file_is_one_sentence(tmp_path):
    """Not Python's "[Errno 2] No such file or directory: 'nofile.toml'": the file and what to do."""
    with pytest.raises(ValueError, match=rf"^configuration file {tmp_path / 'nofile.toml'} does not exist; check the path"):
        load_train_config(tmp_path / "nofile.toml")
    with pytest.raises(ValueError, match=rf"^configuration file {tmp_path} is a directory"):
        load_train_config(tmp_path)
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'binary.toml'}: not a text file"):
        load_train_config(tmp_path / "binary.toml")


@pytest.mark.parametrize("compressor, limits, good, bad", [("zstd", (-131072, 22), (-5, 0, 1, 22), (23, 99, -131073)),
                                                             ("lz4", (1, 9), (1, 9), (0, 10))])
def test_compression_level_out_of_the_codecs_range_is_refused(compressor, limits, good, bad):
    """The codecs clamp a level out of range without a word (zstd 99 is 22); zstd's fast negative levels and 0 are its own."""
    for level in good:
        assert StoreOptions(compressor=compressor, compressor_level=level).compressor_level == level
    for level in bad:
        with pytest.raises(ValueError, match=rf"compression level \(--compression-level\) of {compressor} must be an integer "
                                             rf"in \[{limits[0]}, {limits[1]}\], got {level}"):
            StoreOptions(compressor=compressor, compressor_level=level)
