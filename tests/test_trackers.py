"""UncertaintyReport.log_to / mcdrop.report.trackers.log_report against the real trackers, read back.

TensorBoard: the event file is read with TensorBoard's own EventAccumulator. MLflow: a file-store
run is read back with MlflowClient. Lightning: its CSVLogger, TensorBoardLogger and MLFlowLogger.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

import mcdrop
from mcdrop.errors import InvalidInputError, InvalidTypeError
from mcdrop.report.trackers import log_report, metric_key

pytestmark = pytest.mark.usefixtures("one_thread")

FLOAT32 = 1e-6  # TensorBoard stores scalars as float32: relative tolerance of the read-back


def _classifier_report(all_right: bool = False) -> mcdrop.UncertaintyReport:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3)).eval()
    pred = mcdrop.MCDropout(net, n_samples=6, seed=0).predict(torch.randn(40, 3))
    labels = (
        pred.probs.argmax(1)
        if all_right
        else torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(1))
    )
    return mcdrop.report(pred, labels, n_resamples=20, title="tracker test")


@pytest.fixture(scope="module")
def rep() -> mcdrop.UncertaintyReport:
    return _classifier_report()


@pytest.fixture(scope="module")
def variants_rep() -> mcdrop.UncertaintyReport:
    """A report with the dropout-off baseline and a recalibrated column."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3)).eval()
    mc = mcdrop.MCDropout(net, n_samples=6, seed=0, keep_samples=True)
    x, val_x = torch.randn(40, 3), torch.randn(30, 3)
    g = torch.Generator().manual_seed(1)

    def labels_of(pred):  # the model's class, a third of them replaced by a random one
        noisy = torch.rand(len(pred), generator=g) < 1 / 3
        return torch.where(noisy, torch.randint(0, 3, (len(pred),), generator=g), pred.probs.argmax(1))

    pred, val_pred = mc.predict(x), mc.predict(val_x)
    labels, val_labels = labels_of(pred), labels_of(val_pred)
    return mcdrop.report(
        pred,
        labels,
        baseline=mc.predict_deterministic(x),
        calibration=(val_pred, val_labels),
        n_resamples=20,
        title="variants",
    )


def _variant_scalars(rep: mcdrop.UncertaintyReport, prefix: str = "mc/") -> dict[str, float]:
    """What the variant columns of the summary should be logged as, read off the summary itself."""
    rows = rep.summary[rep.summary["group"] != "counts"]
    out = {}
    for variant in ("deterministic", "recalibrated"):
        for metric, value in zip(rows["metric"], rows[variant].astype(float), strict=True):
            if math.isfinite(value):
                out[metric_key(metric, f"{prefix}{variant}/")] = value
    return out


def _events(logdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _values(rep: mcdrop.UncertaintyReport) -> dict[str, float]:
    """The metrics and the counts (n_inputs, n_samples) of the report."""
    return dict(zip(rep.summary["metric"], rep.summary["value"].astype(float), strict=True))


def _finite(rep: mcdrop.UncertaintyReport, prefix: str = "mc/") -> dict[str, float]:
    return {metric_key(k, prefix): v for k, v in _values(rep).items() if math.isfinite(v)}


# ----------------------------------------------------------------------------------------------
# names
# ----------------------------------------------------------------------------------------------
def test_metric_keys_are_valid_mlflow_names_and_distinct(rep) -> None:
    pattern = re.compile(r"^[/\w.\- ]*$")  # MLflow's rule for metric names
    keys = [metric_key(name) for name in _values(rep)]
    assert all(pattern.match(k) for k in keys), keys
    assert len(set(keys)) == len(keys)
    assert metric_key("PICP (95%)") == "mc/PICP_95pct"


# ----------------------------------------------------------------------------------------------
# TensorBoard
# ----------------------------------------------------------------------------------------------
def test_tensorboard_scalars_images_and_text_read_back(rep, tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path)) as writer:
        logged = rep.log_to(writer, step=7)
    acc = _events(tmp_path)
    expected = _finite(rep)
    assert logged == expected
    assert set(acc.Tags()["scalars"]) == set(expected)
    for key, value in expected.items():
        (event,) = acc.Scalars(key)
        assert event.step == 7
        assert event.value == pytest.approx(value, rel=FLOAT32, abs=1e-12)
    assert set(acc.Tags()["images"]) == {f"mc/{name}" for name in rep.figure_names}
    for name in rep.figure_names:
        (image,) = acc.Images(f"mc/{name}")
        assert image.step == 7 and image.width > 100 and image.height > 100
        assert image.encoded_image_string.startswith(b"\x89PNG")
    (text,) = acc.Tensors("mc/summary/text_summary")
    body = text.tensor_proto.string_val[0].decode()
    assert text.step == 7
    assert "| ECE |" in body and f"{rep.metrics['ECE']:.6g}" in body
    assert "tracker test" in body


def test_variant_columns_are_logged_as_scalars_and_in_the_table(variants_rep, tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    rep = variants_rep
    assert {"deterministic", "recalibrated"} <= set(rep.summary.columns)
    with SummaryWriter(str(tmp_path)) as writer:
        logged = rep.log_to(writer, step=2)
    variant = _variant_scalars(rep)
    assert "mc/deterministic/ECE" in variant and "mc/recalibrated/NLL" in variant
    assert "mc/deterministic/n_inputs" not in logged  # counts: MC only
    expected = {**_finite(rep), **variant}
    assert logged == expected
    acc = _events(tmp_path)
    assert set(acc.Tags()["scalars"]) == set(expected)
    for key, value in variant.items():
        (event,) = acc.Scalars(key)
        assert event.step == 2 and event.value == pytest.approx(value, rel=FLOAT32, abs=1e-12)
    # dropout off is not MC: the baseline's ECE is its own number
    assert logged["mc/deterministic/ECE"] != logged["mc/ECE"]
    body = acc.Tensors("mc/summary/text_summary")[0].tensor_proto.string_val[0].decode()
    header = next(line for line in body.splitlines() if line.startswith("| group |"))
    assert header.split(" | ")[1:4] == ["metric", "deterministic", "deterministic 95% interval"]
    assert "| MC | MC 95% interval | recalibrated | recalibrated 95% interval | flag |" in header
    ece = rep.summary.set_index("metric").loc["ECE"]
    row = next(line for line in body.splitlines() if "| ECE |" in line)
    assert row.startswith("| calibration | ECE | ")
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == f"{ece['deterministic']:.6g}" and cells[4] == f"{ece['value']:.6g}"
    assert cells[6] == f"{ece['recalibrated']:.6g}"
    assert cells[5] == f"[{ece['ci_low']:.6g}, {ece['ci_high']:.6g}]"
    assert "Column deterministic: deterministic (dropout off)." in body


def test_variant_values_by_name(variants_rep, rep) -> None:
    from mcdrop.report.trackers import report_values

    base = report_values(variants_rep, "deterministic")
    assert "n_inputs" not in base
    assert base["ECE"] == float(variants_rep.summary.set_index("metric").loc["ECE", "deterministic"])
    with pytest.raises(InvalidInputError, match="no 'deterministic' column"):
        report_values(rep, "deterministic")


def test_nan_metrics_are_not_logged_as_scalars_but_kept_in_the_table(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    rep = _classifier_report(all_right=True)  # every prediction right: misclassification AUROC undefined
    nan = [k for k, v in _values(rep).items() if math.isnan(v)]
    assert "misclassification AUROC (entropy)" in nan
    with SummaryWriter(str(tmp_path)) as writer:
        logged = log_report(rep, writer)
    acc = _events(tmp_path)
    assert not {metric_key(k) for k in nan} & set(acc.Tags()["scalars"])
    assert set(logged) == set(acc.Tags()["scalars"]) == set(_finite(rep))
    body = acc.Tensors("mc/summary/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| misclassification AUROC (entropy) | NaN |" in body


# ----------------------------------------------------------------------------------------------
# MLflow
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store in maintenance mode
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    yield mlflow
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def _check_mlflow_run(
    mlflow, run_id: str, rep, folder: str, step: int, tmp_path: Path, prefix: str = "mc/"
) -> None:
    client = mlflow.MlflowClient()
    metrics = client.get_run(run_id).data.metrics
    expected = _finite(rep, prefix)
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-12)
        (point,) = client.get_metric_history(run_id, key)
        assert point.step == step
    names = {Path(a.path).name for a in client.list_artifacts(run_id, folder)}
    assert names == {f"{n}.png" for n in rep.figure_names} | {"summary.json"}
    local = Path(client.download_artifacts(run_id, f"{folder}/summary.json", str(tmp_path / "dl")))
    table = json.loads(local.read_text())
    rows = {row[table["columns"].index("metric")]: row for row in table["data"]}
    assert set(rows) == set(rep.summary["metric"])
    value = table["columns"].index("value")
    assert rows["ECE"][value] == pytest.approx(rep.metrics["ECE"], rel=1e-9)  # the JSON keeps 10 digits
    png = Path(client.download_artifacts(run_id, f"{folder}/reliability.png", str(tmp_path / "dl")))
    assert png.read_bytes().startswith(b"\x89PNG")


def test_mlflow_active_run_metrics_figures_and_table(rep, mlflow_store, tmp_path: Path) -> None:
    mlflow = mlflow_store
    with mlflow.start_run() as run:
        rep.log_to(mlflow, step=3)
    _check_mlflow_run(mlflow, run.info.run_id, rep, "mc/step_3", 3, tmp_path)


def test_mlflow_activerun_object_and_client_with_run_id(rep, mlflow_store, tmp_path: Path) -> None:
    mlflow = mlflow_store
    with mlflow.start_run() as run:
        pass  # the run is finished: ActiveRun and client log to it by id
    rep.log_to(run, prefix="val/")
    _check_mlflow_run(mlflow, run.info.run_id, rep, "val", 0, tmp_path, prefix="val/")
    client = mlflow.MlflowClient()
    other = client.create_run(client.get_run(run.info.run_id).info.experiment_id)
    rep.log_to(client, step=1, run_id=other.info.run_id)
    _check_mlflow_run(mlflow, other.info.run_id, rep, "mc/step_1", 1, tmp_path)


def test_mlflow_gets_the_variant_scalars_and_columns(variants_rep, mlflow_store, tmp_path: Path) -> None:
    mlflow = mlflow_store
    rep = variants_rep
    with mlflow.start_run() as run:
        rep.log_to(mlflow, step=1)
    client = mlflow.MlflowClient()
    metrics = client.get_run(run.info.run_id).data.metrics
    expected = {**_finite(rep), **_variant_scalars(rep)}
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-12)
    local = client.download_artifacts(run.info.run_id, "mc/step_1/summary.json", str(tmp_path / "dl"))
    table = json.loads(Path(local).read_text())
    for column in ("group", "deterministic", "deterministic_ci_low", "recalibrated", "recalibrated_ci_high"):
        assert column in table["columns"]
    rows = {row[table["columns"].index("metric")]: row for row in table["data"]}
    ece = rep.summary.set_index("metric").loc["ECE"]
    assert rows["ECE"][table["columns"].index("group")] == "calibration"
    assert rows["ECE"][table["columns"].index("deterministic")] == pytest.approx(
        ece["deterministic"], rel=1e-9
    )


def test_mlflow_without_active_run_or_run_id_is_refused(rep, mlflow_store) -> None:
    mlflow = mlflow_store
    with pytest.raises(InvalidInputError, match="start_run"):
        rep.log_to(mlflow)
    with pytest.raises(InvalidInputError, match="run_id="):
        rep.log_to(mlflow.MlflowClient())


# ----------------------------------------------------------------------------------------------
# Lightning loggers
# ----------------------------------------------------------------------------------------------
def test_lightning_csv_logger_gets_the_scalars(rep, tmp_path: Path) -> None:
    loggers = pytest.importorskip("lightning.pytorch.loggers")
    import csv

    logger = loggers.CSVLogger(str(tmp_path), name="run")
    rep.log_to(logger, step=5)
    logger.save()
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    expected = _finite(rep)
    assert int(row["step"]) == 5
    assert {k for k in row if k != "step"} == set(expected)
    for key, value in expected.items():
        assert float(row[key]) == pytest.approx(value, rel=1e-12)


def test_lightning_tensorboard_logger_gets_scalars_and_images(rep, tmp_path: Path) -> None:
    loggers = pytest.importorskip("lightning.pytorch.loggers")
    logger = loggers.TensorBoardLogger(str(tmp_path), name="run", default_hp_metric=False)
    rep.log_to([logger], step=2)
    logger.finalize("success")
    acc = _events(Path(logger.log_dir))
    assert set(acc.Tags()["scalars"]) == set(_finite(rep))
    assert acc.Scalars("mc/ECE")[0].value == pytest.approx(rep.metrics["ECE"], rel=FLOAT32)
    assert set(acc.Tags()["images"]) == {f"mc/{name}" for name in rep.figure_names}
    assert "mc/summary/text_summary" in acc.Tags()["tensors"]


def test_lightning_mlflow_logger_gets_scalars_figures_and_table(rep, mlflow_store, tmp_path: Path) -> None:
    loggers = pytest.importorskip("lightning.pytorch.loggers")
    logger = loggers.MLFlowLogger(experiment_name="mc", tracking_uri=(tmp_path / "mlruns").as_uri())
    rep.log_to(logger, step=4)
    logger.finalize("success")
    _check_mlflow_run(mlflow_store, logger.run_id, rep, "mc/step_4", 4, tmp_path)


# ----------------------------------------------------------------------------------------------
# refusals and laziness
# ----------------------------------------------------------------------------------------------
def test_unknown_logger_is_refused_listing_what_is_supported_before_logging_anything(rep, tmp_path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with pytest.raises(InvalidTypeError, match=r"SummaryWriter.*mlflow.*Lightning logger") as err:
        rep.log_to(print)
    assert "builtin_function_or_method" in str(err.value)
    with SummaryWriter(str(tmp_path)) as writer:
        with pytest.raises(InvalidTypeError, match="supported"):
            rep.log_to([writer, {"not": "a logger"}])
    assert _events(tmp_path).Tags()["scalars"] == []  # nothing logged to the good one either
    with pytest.raises(InvalidInputError, match="empty"):
        rep.log_to([])
    with pytest.raises(InvalidInputError, match="step"):
        rep.log_to(SummaryWriter(str(tmp_path / "x")), step=-1)
    with pytest.raises(InvalidTypeError, match="UncertaintyReport"):
        log_report(rep.summary, SummaryWriter(str(tmp_path / "y")))


def test_trackers_import_no_tracker_at_module_level() -> None:
    import ast

    import mcdrop.report.trackers as trackers

    tree = ast.parse(Path(trackers.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
    assert names and not [
        m for m in names if m.split(".")[0] in ("mlflow", "tensorboard", "lightning", "tensorboardX")
    ]
    assert not [m for m in names if m.startswith("torch.utils.tensorboard")]


def _documented_example() -> str:
    """The first Python block of the Trackers section of docs/integrations.md."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "integrations.md").read_text()
    section = text.split("## Trackers", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_documented_example_runs(mlflow_store, tmp_path: Path) -> None:
    namespace: dict[str, object] = {}
    code = _documented_example().replace("tempfile.mkdtemp()", repr(str(tmp_path)))  # its folder: ours
    exec(compile(code, "docs/integrations.md", "exec"), namespace)  # noqa: S102
    rep = namespace["rep"]
    assert namespace["logged"] == _finite(rep)
    assert _events(tmp_path / "tensorboard").Tags()["images"]
    client = mlflow_store.MlflowClient()
    (experiment,) = client.search_experiments()
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.metrics["mc/ECE"] == pytest.approx(rep.metrics["ECE"], rel=1e-12)
