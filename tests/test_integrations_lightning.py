"""mcdrop.integrations.lightning.MCDropoutCallback against a real Lightning Trainer on the CPU.

The logged metrics are checked against mcdrop run by hand on the same weights and data (the same
seeded masks, so equal up to the float32 Lightning stores logged values in); the training run is
checked to be bit for bit the same with and without the callback.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import mcdrop
from mcdrop.errors import (
    InvalidInputError,
    InvalidTypeError,
    McdropWarning,
    MissingDependencyError,
    NoDropoutError,
)

L = pytest.importorskip("lightning.pytorch")
from mcdrop.integrations.lightning import MCDropoutCallback  # noqa: E402
from mcdrop.report.trackers import metric_key, report_values  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # Lightning's own: about torch's pytree, shuffled val loaders (on purpose here), a fit without validation
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*shuffling enabled.*"),
    pytest.mark.filterwarnings("ignore:.*no `val_dataloader`.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*(smaller than the logging interval|sync_dist).*"),
]

FLOAT32 = 1e-6  # Lightning keeps a logged value as a float32 tensor: relative tolerance against float64


class TinyModule(L.LightningModule):
    """A classifier with dropout (and optionally BatchNorm, and no dropout at all)."""

    def __init__(self, dropout: bool = True, batchnorm: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(4, 16), nn.ReLU()]
        if batchnorm:
            layers.append(nn.BatchNorm1d(16))
        layers += [nn.Dropout(0.3) if dropout else nn.Identity(), nn.Linear(16, 3)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y), add_dataloader_idx=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


class DictOutput(TinyModule):
    """forward returns a dict the callback should not wrap: ``model="net"`` points at the network."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"scores": self.net(x)}

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x)["scores"], y)

    def validation_step(self, batch, batch_idx):
        pass


def _data(n: int = 48, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x, y)


def _trainer(callbacks, logger=False, **kwargs) -> L.Trainer:
    options = dict(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=logger,
        callbacks=callbacks,
    )
    options.update(kwargs)
    return L.Trainer(**options)


def _by_hand(module: nn.Module, loader: DataLoader, n_samples: int, seed: int = 0) -> dict[str, float]:
    """The report metrics mcdrop gives for the module's current weights, run by hand."""
    mc = mcdrop.MCDropout(module, n_samples=n_samples, seed=seed)
    pred = mc.predict_loader(loader, progress=False)
    return report_values(mcdrop.report(pred, n_resamples=0))


def _finite_keys(metrics: dict[str, float], prefix: str = "mc/", suffix: str = "") -> dict[str, float]:
    return {metric_key(k, prefix) + suffix: v for k, v in metrics.items() if math.isfinite(v)}


# ----------------------------------------------------------------------------------------------
# logging, reports
# ----------------------------------------------------------------------------------------------
def test_fit_logs_mc_metrics_to_every_logger_and_writes_a_report_per_epoch(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger  # here: spawned DDP workers skip it

    L.seed_everything(0, verbose=False)
    module = TinyModule()
    train = DataLoader(_data(64, 1), batch_size=16, shuffle=True)
    val = DataLoader(_data(48, 2), batch_size=16)
    callback = MCDropoutCallback(
        n_samples=8, report_dir=tmp_path / "reports", report_kwargs={"n_resamples": 0}
    )
    csv_logger = CSVLogger(str(tmp_path), name="csv")
    tb_logger = TensorBoardLogger(str(tmp_path), name="tb", default_hp_metric=False)
    trainer = _trainer([callback], logger=[csv_logger, tb_logger])
    trainer.fit(module, train, val)

    # one report per epoch (the sanity check writes none)
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["epoch=000", "epoch=001"]
    saved = [
        json.loads((tmp_path / "reports" / f"epoch={e:03d}" / "summary.json").read_text())["metrics"]
        for e in (0, 1)
    ]
    # the last epoch's metrics: the report, callback_metrics and mcdrop by hand agree
    expected = _finite_keys(_by_hand(module, val, 8))
    assert set(expected) <= set(trainer.callback_metrics)
    for key, value in expected.items():
        assert float(trainer.callback_metrics[key]) == pytest.approx(value, rel=FLOAT32, abs=1e-9)
    assert saved[1]["ECE"] == pytest.approx(expected["mc/ECE"], rel=1e-12)
    assert saved[0]["ECE"] != saved[1]["ECE"]  # the weights changed between the epochs

    # CSVLogger: one row per validation with every mc/ key
    with open(Path(csv_logger.log_dir) / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("mc/ECE")]
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert float(rows[0]["mc/ECE"]) == pytest.approx(saved[0]["ECE"], rel=FLOAT32)
    assert float(rows[1]["mc/n_inputs"]) == 48.0
    # TensorBoardLogger: the same scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_logger.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.value for e in acc.Scalars("mc/ECE")] == pytest.approx(
        [saved[0]["ECE"], saved[1]["ECE"]], rel=FLOAT32
    )


def test_metrics_without_report_dir_are_the_streaming_metrics(tmp_path: Path) -> None:
    module = TinyModule()
    val = DataLoader(_data(40, 3), batch_size=16)
    trainer = _trainer([MCDropoutCallback(n_samples=6, seed=3)])
    trainer.validate(module, val, verbose=False)
    mc = mcdrop.MCDropout(module, n_samples=6, seed=3)
    stream = mc.predict_loader(val, keep="metrics", progress=False).summary()
    expected = _finite_keys(stream)
    assert "mc/RMSCE" in expected and "mc/misclassification_AUROC_entropy_error_bound" in expected
    got = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("mc/")}
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=FLOAT32, abs=1e-9)
    assert not list(tmp_path.iterdir())  # no report_dir: nothing written


def test_the_report_has_the_dropout_off_baseline_and_its_metrics_are_logged(tmp_path: Path) -> None:
    import pandas as pd

    module = TinyModule()
    val = DataLoader(_data(40, 3), batch_size=16)
    with_base = MCDropoutCallback(n_samples=6, report_dir=tmp_path / "a", report_kwargs={"n_resamples": 0})
    without = MCDropoutCallback(
        n_samples=6, report_dir=tmp_path / "b", report_kwargs={"n_resamples": 0}, baseline=False, prefix="nb/"
    )
    trainer = _trainer([with_base, without])
    trainer.validate(module, val, verbose=False)

    mc = mcdrop.MCDropout(module, n_samples=6, seed=0)
    pred = mc.predict_loader(val, progress=False, deterministic=True)
    by_hand = mcdrop.report(pred, n_resamples=0)
    base = report_values(by_hand, "deterministic")
    expected = {**_finite_keys(report_values(by_hand)), **_finite_keys(base, "mc/deterministic/")}
    assert "mc/deterministic/ECE" in expected and "mc/deterministic/n_inputs" not in expected
    got = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("mc/")}
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=FLOAT32, abs=1e-9), key
    assert got["mc/deterministic/ECE"] != got["mc/ECE"]
    saved = pd.read_csv(tmp_path / "a" / "epoch=000" / "summary.csv").set_index("metric")
    assert saved.loc["ECE", "deterministic"] == pytest.approx(base["ECE"], rel=1e-9)
    # baseline=False: MC only, the same MC numbers
    plain = pd.read_csv(tmp_path / "b" / "epoch=000" / "summary.csv").set_index("metric")
    assert "deterministic" not in plain.columns
    assert not [k for k in trainer.callback_metrics if k.startswith("nb/deterministic")]
    assert float(trainer.callback_metrics["nb/ECE"]) == pytest.approx(got["mc/ECE"], rel=FLOAT32)


def test_several_val_dataloaders_get_a_suffix_and_a_report_each(tmp_path: Path) -> None:
    module = TinyModule()
    loaders = [DataLoader(_data(32, 4), batch_size=16), DataLoader(_data(24, 5), batch_size=8)]
    callback = MCDropoutCallback(n_samples=5, report_dir=tmp_path, report_kwargs={"n_resamples": 0})
    trainer = _trainer([callback])
    trainer.validate(module, loaders, verbose=False)
    for i, loader in enumerate(loaders):
        expected = _finite_keys(_by_hand(module, loader, 5), suffix=f"/dataloader_idx_{i}")
        for key, value in expected.items():
            assert float(trainer.callback_metrics[key]) == pytest.approx(value, rel=FLOAT32, abs=1e-9)
        summary = json.loads((tmp_path / "epoch=000" / f"dataloader_idx_{i}" / "summary.json").read_text())
        assert summary["n_inputs"] == len(loader.dataset)
    assert "mc/ECE" not in trainer.callback_metrics


def test_test_stage_logs_under_test_prefix_unless_on_test_is_false(tmp_path: Path) -> None:
    module = TinyModule()
    loader = DataLoader(_data(32, 6), batch_size=16)
    trainer = _trainer(
        [MCDropoutCallback(n_samples=5, report_dir=tmp_path, report_kwargs={"n_resamples": 0})]
    )
    trainer.test(module, loader, verbose=False)
    expected = _finite_keys(_by_hand(module, loader, 5), prefix="mc/test/")
    for key, value in expected.items():
        assert float(trainer.callback_metrics[key]) == pytest.approx(value, rel=FLOAT32, abs=1e-9)
    assert (tmp_path / "test" / "summary.json").exists()
    trainer = _trainer([MCDropoutCallback(n_samples=5, on_test=False)])
    trainer.test(module, loader, verbose=False)
    assert not [k for k in trainer.callback_metrics if k.startswith("mc/")]


def test_every_n_epochs(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    callback = MCDropoutCallback(n_samples=4, every_n_epochs=2)
    loader = DataLoader(_data(32, 7), batch_size=16)
    logger = CSVLogger(str(tmp_path), name="csv")
    trainer = _trainer([callback], logger=logger, max_epochs=3, num_sanity_val_steps=0)
    trainer.fit(TinyModule(), loader, loader)
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted({int(r["epoch"]) for r in rows if r.get("val_loss")}) == [
        0,
        1,
        2,
    ]  # Lightning validated 3 times
    assert [int(r["epoch"]) for r in rows if r.get("mc/ECE")] == [1]  # the callback evaluated at epoch 1 only


# ----------------------------------------------------------------------------------------------
# the training run and the module are left alone
# ----------------------------------------------------------------------------------------------
def _train(with_callback: bool, seed: int | None) -> dict[str, torch.Tensor]:
    L.seed_everything(0, verbose=False)
    module = TinyModule(batchnorm=True)
    train = DataLoader(_data(64, 1), batch_size=16, shuffle=True)
    val = DataLoader(_data(32, 2), batch_size=16, shuffle=True)  # its iteration draws from the global RNG
    callbacks = [MCDropoutCallback(n_samples=4, seed=seed)] if with_callback else []
    _trainer(callbacks, max_epochs=3).fit(module, train, val)
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("seed", [0, None])
def test_training_is_bit_identical_with_and_without_the_callback(seed: int | None) -> None:
    without = _train(False, seed)
    with_ = _train(True, seed)
    assert without.keys() == with_.keys()
    for key in without:
        assert torch.equal(without[key], with_[key]), key


class _Snapshot(L.Callback):
    """Records the module's state at the end of each validation epoch (before or after the MC callback)."""

    def __init__(self) -> None:
        self.states: list[dict] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        import random

        import numpy as np

        self.states.append(
            {
                "flags": [m.training for m in pl_module.modules()],
                "params": {k: v.clone() for k, v in pl_module.state_dict().items()},
                "torch": torch.get_rng_state(),
                "random": random.getstate(),
                "numpy": np.random.get_state()[1].copy(),
            }
        )


def test_module_state_and_global_rng_are_untouched_by_an_evaluation() -> None:
    module = TinyModule(batchnorm=True)
    before, after = _Snapshot(), _Snapshot()
    loader = DataLoader(_data(32, 8), batch_size=16, shuffle=True)
    trainer = _trainer([before, MCDropoutCallback(n_samples=4, seed=None), after], max_epochs=1)
    trainer.fit(module, loader, loader)
    assert len(before.states) == len(after.states) == 2  # the sanity check and epoch 0
    for b, a in zip(before.states, after.states, strict=True):
        assert b["flags"] == a["flags"]
        assert all(torch.equal(b["params"][k], a["params"][k]) for k in b["params"])
        assert torch.equal(b["torch"], a["torch"])
        assert b["random"] == a["random"]
        assert (b["numpy"] == a["numpy"]).all()


# ----------------------------------------------------------------------------------------------
# what is wrapped, errors
# ----------------------------------------------------------------------------------------------
def test_model_option_points_at_an_attribute_or_a_callable() -> None:
    module = DictOutput()
    loader = DataLoader(_data(32, 9), batch_size=16)
    for model in ("net", lambda m: m.net):
        trainer = _trainer([MCDropoutCallback(n_samples=5, model=model)])
        trainer.validate(module, loader, verbose=False)
        expected = mcdrop.MCDropout(module.net, n_samples=5, seed=0).predict_loader(
            loader, keep="metrics", progress=False
        )
        assert float(trainer.callback_metrics["mc/NLL"]) == pytest.approx(
            expected.summary()["NLL"], rel=FLOAT32
        )
    with pytest.raises(InvalidInputError, match="no attribute path 'backbone.head'"):
        _trainer([MCDropoutCallback(model="backbone.head")]).validate(module, loader, verbose=False)
    with pytest.raises(InvalidTypeError, match="must lead to a torch.nn.Module"):
        _trainer([MCDropoutCallback(model=lambda m: "net")]).validate(module, loader, verbose=False)


def test_no_dropout_raises_before_training() -> None:
    module = TinyModule(dropout=False)
    weights = {k: v.clone() for k, v in module.state_dict().items()}
    loader = DataLoader(_data(32, 10), batch_size=16)
    trainer = _trainer([MCDropoutCallback(n_samples=4)])
    with pytest.raises(
        NoDropoutError, match=r"MCDropoutCallback has nothing to sample in TinyModule.*model="
    ):
        trainer.fit(module, loader, loader)
    assert trainer.global_step == 0
    assert all(torch.equal(weights[k], v) for k, v in module.state_dict().items())


def test_fit_without_validation_warns() -> None:
    loader = DataLoader(_data(32, 11), batch_size=16)
    trainer = _trainer([MCDropoutCallback(n_samples=4)], max_epochs=1)
    with pytest.warns(McdropWarning, match="did not run during trainer.fit"):
        trainer.fit(TinyModule(), loader)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="n_samples"):
        MCDropoutCallback(n_samples=0)
    with pytest.raises(InvalidInputError, match="every_n_epochs"):
        MCDropoutCallback(every_n_epochs=0)
    with pytest.raises(InvalidTypeError, match="model must be"):
        MCDropoutCallback(model=3)
    with pytest.raises(InvalidInputError, match="n_samples"):
        MCDropoutCallback(n_samples="many")
    with pytest.raises(InvalidInputError, match="task"):
        MCDropoutCallback(task="segmentation")


def test_an_unknown_keyword_is_named_in_the_callbacks_terms() -> None:
    with pytest.raises(InvalidTypeError) as info:
        MCDropoutCallback(n_sample=3, report_kwarg={})
    message = str(info.value)
    assert "'n_sample', 'report_kwarg'" in message
    assert "help(MCDropoutCallback)" in message and "help(mcdrop.MCDropout)" in message
    assert "__init__" not in message  # not Python's wording about SamplingOptions


def test_mcdrops_own_errors_come_through_unchanged() -> None:
    # what MCDropout itself says about the same value, word for word
    with pytest.raises(InvalidTypeError) as direct:
        mcdrop.MCDropout(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)), memory_budget="1GB")
    with pytest.raises(InvalidTypeError) as through:
        MCDropoutCallback(memory_budget="1GB")
    assert str(through.value) == str(direct.value)
    assert "does not take" not in str(through.value)
    with pytest.raises(InvalidInputError, match="tolerance"):
        MCDropoutCallback(n_samples="auto", tolerance=-1.0)


def test_adaptive_n_samples_auto_is_accepted_and_logged() -> None:
    module = TinyModule()
    val = DataLoader(_data(40, 3), batch_size=16)
    callback = MCDropoutCallback(n_samples="auto", seed=3, max_samples=40)
    assert callback.n_samples == "auto"
    trainer = _trainer([callback])
    trainer.validate(module, val, verbose=False)
    mc = mcdrop.MCDropout(module, n_samples="auto", seed=3, max_samples=40)
    expected = _finite_keys(mc.predict_loader(val, keep="metrics", progress=False).summary())
    got = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("mc/")}
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=FLOAT32, abs=1e-9)


def test_missing_lightning_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)  # an import of these now raises ImportError
    monkeypatch.delitem(sys.modules, "mcdrop.integrations.lightning")
    with pytest.raises(MissingDependencyError, match=r'pip install "mcdrop\[lightning\]"'):
        importlib.import_module("mcdrop.integrations.lightning")
    monkeypatch.delitem(sys.modules, "mcdrop.integrations.lightning", raising=False)


def test_import_mcdrop_does_not_import_lightning() -> None:
    code = "import sys, mcdrop, mcdrop.integrations; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


# ----------------------------------------------------------------------------------------------
# DDP
# ----------------------------------------------------------------------------------------------
def _shard_by_hand(module: nn.Module, dataset, n_samples: int, seed: int, world: int):
    """What mcdrop.distributed computes, in one process: rank r's shard with rank r's seed."""
    from mcdrop.distributed import derive_seed
    from mcdrop.loop import select_rows
    from mcdrop.predictions import concat_predictions

    parts, indices = [], []
    for rank in range(world):
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        loader = DataLoader(dataset, batch_size=8, sampler=sampler)
        mc = mcdrop.MCDropout(module, n_samples=n_samples, seed=derive_seed(seed, rank))
        parts.append(mc.predict_loader(loader, progress=False))
        indices.append(torch.as_tensor(list(iter(sampler))))
    pred = concat_predictions(parts)
    pred.targets = torch.cat([p.targets for p in parts])
    order = torch.argsort(torch.cat(indices))
    pred = select_rows(pred, order)
    return pred


@pytest.mark.slow
def test_ddp_two_processes_metrics_match_and_one_report(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = TinyModule()
    data = _data(40, 12)  # even: DistributedSampler pads nothing
    reports = MCDropoutCallback(
        n_samples=6, seed=5, report_dir=tmp_path / "r", report_kwargs={"n_resamples": 0}
    )
    streaming = MCDropoutCallback(n_samples=6, seed=5, prefix="stream/")
    trainer = _trainer([reports, streaming], strategy="ddp_spawn", devices=2)
    trainer.validate(module, DataLoader(data, batch_size=8), verbose=False)

    pred = _shard_by_hand(module, data, 6, 5, world=2)
    expected = report_values(mcdrop.report(pred, n_resamples=0))  # its metrics and counts
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["epoch=000"]  # one report, by rank 0
    summary = json.loads((tmp_path / "r" / "epoch=000" / "summary.json").read_text())
    saved = {**summary["metrics"], **summary.get("counts", {})}
    for name, value in expected.items():
        if math.isfinite(value):
            assert saved[name] == pytest.approx(value, rel=1e-9), name
            got = float(trainer.callback_metrics[metric_key(name)])
            assert got == pytest.approx(value, rel=FLOAT32, abs=1e-9), name
    # the all-reduced streaming metrics: the same calibration numbers
    for name in ("accuracy", "NLL", "Brier", "ECE", "MCE", "n_inputs"):
        got = float(trainer.callback_metrics[metric_key(name, "stream/")])
        assert got == pytest.approx(expected[name], rel=FLOAT32, abs=1e-9), name


def _documented_example() -> str:
    """The first Python block of the Lightning section of docs/integrations.md."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "integrations.md").read_text()
    section = text.split("## Lightning", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow  # trains the example's model for two epochs and saves two reports
def test_the_documented_example_runs(tmp_path: Path, capsys) -> None:
    namespace: dict[str, object] = {"__name__": "docs_example"}
    code = _documented_example().replace("tempfile.mkdtemp()", repr(str(tmp_path)))  # its folder: ours
    exec(compile(code, "docs/integrations.md", "exec"), namespace)  # noqa: S102
    printed = capsys.readouterr().out.splitlines()
    assert 0 <= float(printed[-2]) <= 1
    assert printed[-1] == "['epoch=000', 'epoch=001']"
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv", newline="") as f:
        assert [r["mc/ECE"] for r in csv.DictReader(f) if r.get("mc/ECE")]
