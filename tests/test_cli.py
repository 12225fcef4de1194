"""The `mcdrop` command: demo, report, and every error path exiting 2 with one clear message."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from zoo import mlp

from mcdrop.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def scripted_model(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(mlp(5, 3, hidden=16, p=0.3, act=nn.ReLU)), str(path))
    return path


@pytest.fixture()
def npz_data(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(path, x=rng.normal(size=(40, 5)).astype(np.float32), y=rng.integers(0, 3, 40))
    return path


def test_demo_writes_a_full_report(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "2", "--n-samples", "5"]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and str(out.resolve()) in printed
    for name in ("report.html", "summary.csv", "summary.json", "per_input.csv", "reliability.csv", "ood.png"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ood_sets"] == {"pixel-shuffled digits": summary["n_ood"]}, summary["ood_sets"]
    assert summary["metadata"]["command"] == "mcdrop demo" and summary["metadata"]["epochs"] == 2
    table = pd.read_csv(out / "summary.csv").set_index("metric")
    assert 0 < table.loc["accuracy", "deterministic"] <= 1  # the dropout-off baseline
    assert "dropout off" in printed and "[pixel-shuffled digits]" in printed
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5


def test_demo_refuses_to_overwrite_without_force(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["demo", "--out", str(out), "--epochs", "1", "--n-samples", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--force" in err and "Traceback" not in err
    assert (out / "notes.txt").read_text() == "mine"


def test_report_from_torchscript_and_npz(tmp_path: Path, scripted_model: Path, npz_data: Path) -> None:
    out = tmp_path / "rep"
    code = main(
        [
            "report",
            "--model",
            str(scripted_model),
            "--trust-code",
            "--data",
            str(npz_data),
            "--n-samples",
            "8",
            "--out",
            str(out),
            "--quiet",
            "--ood",
            str(npz_data),
        ]
    )
    assert code == 0
    summary = pd.read_csv(out / "summary.csv")
    assert "accuracy" in set(summary["metric"])
    assert len(pd.read_csv(out / "per_input.csv")) == 40


def test_report_from_csv_with_a_named_target(tmp_path: Path, scripted_model: Path) -> None:
    rng = np.random.default_rng(1)
    frame = pd.DataFrame(rng.normal(size=(30, 5)), columns=list("abcde"))
    frame["label"] = rng.integers(0, 3, 30)
    data = tmp_path / "data.csv"
    frame.to_csv(data, index=False)
    out = tmp_path / "rep"
    assert (
        main(
            [
                "report",
                "--model",
                str(scripted_model),
                "--trust-code",
                "--data",
                str(data),
                "--target",
                "label",
                "--n-samples",
                "4",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    assert len(pd.read_csv(out / "per_input.csv")) == 30


def test_torchscript_needs_trust_code(tmp_path: Path, scripted_model: Path, npz_data: Path, capsys) -> None:
    args = [
        "report",
        "--model",
        str(scripted_model),
        "--data",
        str(npz_data),
        "--out",
        str(tmp_path / "r"),
        "--quiet",
    ]
    assert main(args) == 2
    assert "--trust-code" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_report_from_factory_needs_trust_code(tmp_path: Path, npz_data: Path, monkeypatch, capsys) -> None:
    module = tmp_path / "my_models.py"
    module.write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 3))\n"
    )
    weights = tmp_path / "w.pt"
    torch.manual_seed(0)
    torch.save(nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.2), nn.Linear(8, 3)).state_dict(), weights)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = [
        "report",
        "--model",
        "my_models:make",
        "--weights",
        str(weights),
        "--data",
        str(npz_data),
        "--n-samples",
        "4",
        "--out",
        str(tmp_path / "rep"),
        "--quiet",
    ]
    assert main(args) == 2
    assert "--trust-code" in capsys.readouterr().err
    assert main([*args, "--trust-code"]) == 0


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda d: ["--model", str(d / "missing.pt"), "--data", str(d / "data.npz")], "not found"),
        (lambda d: ["--model", str(d / "model.pt"), "--data", str(d / "missing.npz")], "not found"),
        (lambda d: ["--model", str(d / "garbage.pt"), "--data", str(d / "data.npz")], "TorchScript"),
        (
            lambda d: ["--model", str(d / "model.pt"), "--data", str(d / "data.npz"), "--target", "label"],
            "label",
        ),
        (lambda d: ["--model", str(d / "model.pt"), "--data", str(d / "wide.npz")], "failed on inputs"),
        (
            lambda d: ["--model", str(d / "model.pt"), "--data", str(d / "data.txt")],
            "unsupported data format",
        ),
        (
            lambda d: ["--model", str(d / "model.pt"), "--data", str(d / "data.npz"), "--n-samples", "0"],
            "at least 1",
        ),
        (
            lambda d: ["--model", "no_such_module_xyz:make", "--trust-code", "--data", str(d / "data.npz")],
            "cannot import",
        ),
    ],
)
def test_report_error_paths_exit_2_with_one_message(
    tmp_path: Path, scripted_model: Path, npz_data: Path, capsys, make_args, message: str
) -> None:
    (tmp_path / "garbage.pt").write_bytes(b"not a model")
    (tmp_path / "data.txt").write_text("1 2 3")
    np.savez(tmp_path / "wide.npz", x=np.zeros((4, 7), np.float32), y=np.zeros(4, int))
    code = main(["report", *make_args(tmp_path), "--trust-code", "--out", str(tmp_path / "rep"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "rep").exists()


def test_python_dash_m_runs_the_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mcdrop", "--help"], capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 0
    assert "demo" in done.stdout and "report" in done.stdout


# ------------------------------------------------------------------------------------------------
# bad input exits 2 with a short message naming what was wrong, never a traceback
# ------------------------------------------------------------------------------------------------
def _fails(argv: list[str], capsys) -> str:
    """Run ``main(argv)``, check it exits 2 with one or two lines on stderr and no traceback; the text."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    assert 1 <= len(err.strip().splitlines()) <= 2, err
    return err


def _report_args(tmp_path: Path, model: Path | str, data: Path, *extra: str) -> list[str]:
    out = str(tmp_path / "rep")
    model_args = ["--model", str(model), "--trust-code", "--data", str(data)]
    return ["report", *model_args, "--n-samples", "3", "--out", out, "--quiet", *extra]


def _features(n: int = 12, seed: int = 0) -> pd.DataFrame:
    return pd.DataFrame(np.random.default_rng(seed).normal(size=(n, 5)), columns=list("abcde"))


def test_csv_with_string_targets_exits_2(tmp_path: Path, scripted_model: Path, capsys) -> None:
    frame = _features()
    frame["y"] = ["cat", "dog", "1"] * 4
    data = tmp_path / "pets.csv"
    frame.to_csv(data, index=False)
    err = _fails(_report_args(tmp_path, scripted_model, data), capsys)
    assert "target column 'y' must hold numbers" in err and "'cat'" in err
    assert not (tmp_path / "rep").exists()


@pytest.mark.parametrize("target", ["strings", "empty", "absent"])
def test_ood_csv_targets_are_ignored(
    tmp_path: Path, scripted_model: Path, npz_data: Path, capsys, target: str
) -> None:
    frame = _features(9, seed=1)
    if target == "strings":
        frame["y"] = ["cat", "dog", "bird"] * 3
    elif target == "empty":
        frame["y"] = np.nan
    ood = tmp_path / "ood.csv"
    frame.to_csv(ood, index=False)
    assert main(_report_args(tmp_path, scripted_model, npz_data, "--ood", str(ood))) == 0, (
        capsys.readouterr().err
    )
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary["ood_sets"] == {
        "ood.csv": 9
    }  # the target column, if any, was dropped, not used as a 6th input


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ({"x": ["a", "b"], "y": [0, 1]}, "the inputs 'x' must be numbers; got list starting with str 'a'"),
        ({"x": {"a": 1}, "y": [0, 1]}, "the inputs 'x' must be numbers; got dict"),
        ({"x": None, "y": [0, 1]}, "the inputs 'x' must be numbers; got NoneType"),
        ({"x": torch.tensor(3.0), "y": [0]}, "the inputs 'x' is a single number"),
        ({"x": torch.zeros(2, 5), "y": ["a", "b"]}, "the targets 'y' must be numbers; got list"),
        ({"x": torch.zeros(2, 5), "y": {"a": 1}}, "the targets 'y' must be numbers; got dict"),
    ],
)
def test_pt_data_that_are_not_numbers_exit_2(
    tmp_path: Path, scripted_model: Path, capsys, store: dict, message: str
) -> None:
    data = tmp_path / "data.pt"
    torch.save(store, data)
    err = _fails(_report_args(tmp_path, scripted_model, data), capsys)
    assert message in err, err


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (
            {"x": np.array(["a", "b"]), "y": np.array([0, 1])},
            "the inputs 'x' must be numbers; got an array of dtype",
        ),
        ({"x": np.zeros((2, 5), np.float32), "y": np.array(["a", "b"])}, "the targets 'y' must be numbers"),
    ],
)
def test_npz_data_that_are_not_numbers_exit_2(
    tmp_path: Path, scripted_model: Path, capsys, arrays: dict, message: str
) -> None:
    data = tmp_path / "data.npz"
    np.savez(data, **arrays)
    err = _fails(_report_args(tmp_path, scripted_model, data), capsys)
    assert message in err and "'a'" in err, err


def test_ood_pt_targets_are_ignored(tmp_path: Path, scripted_model: Path, npz_data: Path, capsys) -> None:
    ood = tmp_path / "ood.pt"
    torch.save({"x": torch.randn(7, 5), "y": ["not", "labels"]}, ood)  # wrong type and length: unused
    assert main(_report_args(tmp_path, scripted_model, npz_data, "--ood", str(ood))) == 0, (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("boom", "calling cli_factories:boom() failed: ValueError: bad config"),
        ("needs", "needs() needs arguments (n_in)"),
        ("Net", "Net() needs arguments (width)"),
        ("broken_import", None),
    ],
)
def test_factory_that_fails_exits_2(
    tmp_path: Path, npz_data: Path, monkeypatch, capsys, factory: str, message: str | None
) -> None:
    (tmp_path / "cli_factories.py").write_text(
        "import torch\n"
        "def boom():\n"
        "    raise ValueError('bad config')\n"
        "def needs(n_in, n_out=3):\n"
        "    return torch.nn.Linear(n_in, n_out)\n"
        "class Net(torch.nn.Linear):\n"
        "    def __init__(self, width):\n"
        "        super().__init__(5, width)\n"
    )
    (tmp_path / "cli_broken_module.py").write_text("raise RuntimeError('cannot configure')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = "cli_broken_module:make" if factory == "broken_import" else f"cli_factories:{factory}"
    err = _fails(_report_args(tmp_path, spec, npz_data), capsys)
    if message is None:
        assert (
            "cannot import module 'cli_broken_module'" in err and "RuntimeError: cannot configure" in err
        ), err
    else:
        assert message in err, err


@pytest.mark.parametrize("where", ["--data", "--weights"])
def test_a_plain_pickle_gets_mcdrops_one_line_and_no_torch_warning(
    tmp_path: Path, npz_data: Path, monkeypatch, capsys, where: str
) -> None:
    pickled = tmp_path / "pickled.pt"
    with pickled.open("wb") as f:  # pickle.dump, not torch.save: torch warns of its protocol first
        pickle.dump({"x": np.zeros((4, 5), np.float32), "model": nn.Linear(5, 3)}, f)
    (tmp_path / "cli_pickle_factory.py").write_text(
        "import torch\ndef make():\n    return torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Dropout(0.2))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    data, extra = (pickled, ()) if where == "--data" else (npz_data, ("--weights", str(pickled)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        err = _fails(_report_args(tmp_path, "cli_pickle_factory:make", data, *extra), capsys)
    assert len(err.strip().splitlines()) == 1 and "weights_only=True refuses" in err, err
    assert [str(w.message) for w in caught] == []


@pytest.fixture()
def two_output_regressor(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2)).eval()
    path = tmp_path / "reg.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    return path


def test_output_option_reports_the_chosen_output(tmp_path: Path, two_output_regressor: Path, capsys) -> None:
    x = np.random.default_rng(0).normal(size=(30, 5)).astype(np.float32)
    y = np.zeros((30, 2), np.float32)
    y[:, 0] = 1e6  # output 0 is far off its targets, output 1 close: the RMSE shows which was reported
    data = tmp_path / "reg.npz"
    np.savez(data, x=x, y=y)
    args = _report_args(tmp_path, two_output_regressor, data, "--task", "regression")

    err = _fails(args, capsys)
    assert "2 outputs per input" in err and "--output J (0 <= J < 2)" in err and "output=j" not in err, err
    err = _fails([*args, "--output", "2"], capsys)
    assert "--output 2 is out of range" in err, err

    assert main([*args, "--output", "1"]) == 0, capsys.readouterr().err
    summary = pd.read_csv(tmp_path / "rep" / "summary.csv").set_index("metric")["value"]
    assert summary["RMSE"] < 10, summary["RMSE"]
    assert "(output 1)" in (tmp_path / "rep" / "report.html").read_text()


def test_a_regressor_with_a_map_per_input_is_refused_with_a_cli_fix(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.Dropout(0.2), nn.Unflatten(1, (2, 3))).eval()
    model = tmp_path / "map.pt"
    torch.jit.save(torch.jit.script(net), str(model))
    data = tmp_path / "map.npz"
    x = np.random.default_rng(0).normal(size=(20, 5)).astype(np.float32)
    np.savez(data, x=x, y=np.zeros((20, 2, 3), np.float32))
    err = _fails(_report_args(tmp_path, model, data, "--task", "regression"), capsys)
    assert "shape (2, 3) per input" in err and "package.module:factory" in err and "Traceback" not in err, err


def test_output_option_is_refused_for_a_classifier(
    tmp_path: Path, scripted_model: Path, npz_data: Path, capsys
) -> None:
    err = _fails(_report_args(tmp_path, scripted_model, npz_data, "--output", "0"), capsys)
    assert "--output applies to regression models" in err, err


def test_torchscript_forward_failure_keeps_its_cause(tmp_path: Path, scripted_model: Path, capsys) -> None:
    data = tmp_path / "wide.npz"
    np.savez(data, x=np.zeros((4, 7), np.float32), y=np.zeros(4, int))
    err = _fails(_report_args(tmp_path, scripted_model, data), capsys)
    assert "failed on inputs of shape (4, 7)" in err, err
    assert "RuntimeError: mat1 and mat2 shapes cannot be multiplied (4x7 and 5x16)" in err, err
    assert "TorchScript interpreter" not in err, err


def test_ood_forward_failure_exits_2(tmp_path: Path, scripted_model: Path, npz_data: Path, capsys) -> None:
    ood = tmp_path / "ood.npz"
    np.savez(ood, x=np.zeros((4, 5), np.int64))  # integer inputs: the Linear refuses them
    err = _fails(_report_args(tmp_path, scripted_model, npz_data, "--ood", str(ood)), capsys)
    assert f"the model failed on inputs of shape (4, 5) from {ood}" in err, err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a,b,c,d,e,y\n", "has no data rows (only a header"),
        ("y\n0\n1\n2\n", "has no feature columns (only the target column 'y')"),
    ],
)
def test_degenerate_csvs_are_named(
    tmp_path: Path, scripted_model: Path, capsys, text: str, message: str
) -> None:
    data = tmp_path / "data.csv"
    data.write_text(text)
    err = _fails(_report_args(tmp_path, scripted_model, data), capsys)
    assert message in err, err
    assert "numeric" not in err and "failed on inputs" not in err, err


def test_text_feature_columns_exit_2(tmp_path: Path, scripted_model: Path, capsys) -> None:
    data = tmp_path / "data.csv"
    data.write_text("a,b,y\n1,cat,0\n2,dog,1\n")  # pandas >= 3 reads 'b' as a StringDtype column
    err = _fails(_report_args(tmp_path, scripted_model, data), capsys)
    assert "input columns must be numeric; these are not: ['b']" in err, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--epochs", "-3"], "--epochs must be at least 1; got -3"),
        (["demo", "--epochs", "0"], "--epochs must be at least 1; got 0"),
        (["demo", "--n-samples", "0"], "--n-samples must be at least 1; got 0"),
        (["demo", "--seed", "-1"], "--seed must be at least 0; got -1"),
        (["demo", "--seed", str(2**32)], "--seed must be at most 4294967295"),
        (
            ["report", "--model", "m.pt", "--data", "d.npz", "--batch-size", "0"],
            "--batch-size must be at least 1",
        ),
        (
            ["report", "--model", "m.pt", "--data", "d.npz", "--seed", "-5"],
            "--seed must be at least 0; got -5",
        ),
        (["report", "--model", "m.pt", "--data", "d.npz", "--output", "-1"], "--output must be at least 0"),
    ],
)
def test_numeric_options_are_checked_before_any_work(
    tmp_path: Path, monkeypatch, capsys, argv: list[str], message: str
) -> None:
    import mcdrop._demo

    def no_training(*args, **kwargs):
        raise AssertionError("the demo trained before checking its options")

    monkeypatch.setattr(mcdrop._demo, "train_digits_mlp", no_training)
    monkeypatch.setattr(mcdrop._demo, "load_digits_data", no_training)
    err = _fails([*argv, "--out", str(tmp_path / "rep"), "--quiet"], capsys)
    assert message in err, err
    assert not (tmp_path / "rep").exists()


# ------------------------------------------------------------------------------------------------
# model files: what a file is, found without running it, and the exact fix for those that are no model
# ------------------------------------------------------------------------------------------------
def _bn_net(seed: int = 0) -> nn.Module:
    """A classifier with BatchNorm (whose mode matters) and one dropout, in eval mode."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    with torch.no_grad():  # running statistics far from a batch's own, so a train-mode BatchNorm shows
        net[1].running_mean.normal_(0, 2)
        net[1].running_var.uniform_(0.5, 4)
    return net.eval()


def test_a_state_dict_as_the_model_gets_the_factory_command(tmp_path: Path, npz_data: Path, capsys) -> None:
    state = tmp_path / "weights.pt"
    torch.save(_bn_net().state_dict(), state)
    for trust in ((), ("--trust-code",)):
        args = [
            "report",
            "--model",
            str(state),
            *trust,
            "--data",
            str(npz_data),
            "--out",
            str(tmp_path / "r"),
        ]
        err = _fails(args, capsys)
        assert "holds a state dict (9 tensors: '0.weight', '0.bias', '1.weight', ...)" in err, err
        assert f"--model package.module:factory --weights {state}" in err, err
        assert "TorchScript" not in err and "corrupt" not in err, err


def test_a_checkpoint_dict_as_the_model_names_the_key(tmp_path: Path, npz_data: Path, capsys) -> None:
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "model_state": _bn_net().state_dict()}, ckpt)
    err = _fails(
        ["report", "--model", str(ckpt), "--data", str(npz_data), "--out", str(tmp_path / "r")], capsys
    )
    assert "training checkpoint" in err and "under 'model_state'" in err and "--weights weights.pt" in err, (
        err
    )


def test_a_pickled_module_needs_trust_code_and_then_loads(
    tmp_path: Path, npz_data: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cli_pickled_net.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.body = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 3))\n"
        "    def forward(self, x):\n"
        "        return self.body(x)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import cli_pickled_net  # the module a user's training script imported

    torch.save(cli_pickled_net.Net().eval(), tmp_path / "whole.pt")
    monkeypatch.delitem(sys.modules, "cli_pickled_net")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    args = ["report", "--model", "whole.pt", "--data", str(npz_data), "--n-samples", "3", "--out", "rep"]
    err = _fails(args, capsys)
    assert "whole model saved with torch.save(model) (class cli_pickled_net.Net)" in err, err
    assert "--trust-code" in err and "--model package.module:factory --weights weights.pt" in err, err
    assert main([*args, "--trust-code", "--quiet"]) == 0, capsys.readouterr().err  # its module: from the cwd
    assert len(pd.read_csv(tmp_path / "rep" / "per_input.csv")) == 40


def test_a_module_pickled_from_a_script_says_its_class_cannot_be_imported(
    tmp_path: Path, npz_data: Path, monkeypatch, capsys
) -> None:
    class Net(nn.Sequential):
        pass

    Net.__module__, Net.__qualname__ = "__main__", "Net"  # as if defined in the training script
    monkeypatch.setattr(sys.modules["__main__"], "Net", Net, raising=False)
    torch.save(Net(nn.Linear(5, 3), nn.Dropout(0.2)), tmp_path / "whole.pt")
    monkeypatch.delattr(sys.modules["__main__"], "Net")
    err = _fails(_report_args(tmp_path, tmp_path / "whole.pt", npz_data), capsys)
    assert "its class __main__.Net was defined in the script that saved it" in err, err


def test_detecting_a_file_runs_no_code_from_it(tmp_path: Path, npz_data: Path, capsys) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # unpickling it creates the marker file

    evil = tmp_path / "evil.pt"
    torch.save({"model": Payload()}, evil)
    for trust in ((), ("--trust-code",)):  # a pickle of no module is no model: never unpickled
        err = _fails(["report", "--model", str(evil), *trust, "--data", str(npz_data), "--out", "r"], capsys)
        assert "is a pickle of Python objects (" in err and "open)" in err, err
    assert not marker.exists()


def test_weights_are_refused_for_a_model_file(
    tmp_path: Path, scripted_model: Path, npz_data: Path, capsys
) -> None:
    err = _fails(_report_args(tmp_path, scripted_model, npz_data, "--weights", str(scripted_model)), capsys)
    assert "--weights applies to a package.module:factory model" in err, err


# ------------------------------------------------------------------------------------------------
# package.module:factory from the current folder; which weights were evaluated
# ------------------------------------------------------------------------------------------------
_FACTORY_SOURCE = (
    "import torch\n"
    "def make():\n"
    "    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3),\n"
    "                               torch.nn.Linear(16, 3))\n"
)


def _factory_folder(tmp_path: Path, name: str) -> Path:
    """A folder holding module ``name`` (factory ``make``), its trained-like weights and a data file."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / f"{name}.py").write_text(_FACTORY_SOURCE)
    torch.manual_seed(0)
    torch.save(
        nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3)).state_dict(),
        folder / "weights.pt",
    )
    rng = np.random.default_rng(0)
    np.savez(folder / "data.npz", x=rng.normal(size=(40, 5)).astype(np.float32), y=rng.integers(0, 3, 40))
    return folder


def test_a_factory_module_in_the_current_folder_is_imported(tmp_path: Path, monkeypatch, capsys) -> None:
    folder = _factory_folder(tmp_path, "cli_cwd_models")
    monkeypatch.chdir(folder)
    # the console script's sys.path: its own folder first, neither "" nor the current folder
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(folder), ".")])
    monkeypatch.delitem(sys.modules, "cli_cwd_models", raising=False)
    argv = ["report", "--model", "cli_cwd_models:make", "--trust-code", "--weights", "weights.pt"]
    assert main([*argv, "--data", "data.npz", "--n-samples", "3", "--out", "rep"]) == 0, (
        capsys.readouterr().err
    )
    out = capsys.readouterr().out
    assert "weights: weights.pt (a state dict)" in out and "accuracy" in out, out
    assert str(folder) not in sys.path  # put there for the import only
    assert (folder / "rep" / "report.html").exists()


@pytest.mark.slow
def test_python_dash_m_imports_a_factory_from_the_current_folder(tmp_path: Path) -> None:
    folder = _factory_folder(tmp_path, "cli_sub_models")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "always"}
    argv = [
        "report",
        "--model",
        "cli_sub_models:make",
        "--trust-code",
        "--data",
        "data.npz",
        "--n-samples",
        "3",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "mcdrop", *argv], capture_output=True, text=True, cwd=folder, env=env
    )
    assert done.returncode == 0, done.stderr
    assert "weights: none given" in done.stdout, done.stdout
    assert "no --weights given for cli_sub_models:make" in done.stderr, done.stderr


def test_a_factory_without_weights_says_so_on_stdout_and_stderr(tmp_path: Path, monkeypatch, capsys) -> None:
    folder = _factory_folder(tmp_path, "cli_noweights_models")
    monkeypatch.chdir(folder)
    monkeypatch.delitem(sys.modules, "cli_noweights_models", raising=False)
    argv = ["report", "--model", "cli_noweights_models:make", "--trust-code", "--data", "data.npz"]
    assert main([*argv, "--n-samples", "3", "--out", "rep"]) == 0
    captured = capsys.readouterr()
    assert "weights: none given: the factory's own initialisation" in captured.out, captured.out
    assert "warning: no --weights given" in captured.err, captured.err
    meta = json.loads((folder / "rep" / "summary.json").read_text())["metadata"]
    assert meta["weights"].startswith("none given: the factory's own initialisation"), meta
    assert meta["model"] == "cli_noweights_models:make", meta


# ------------------------------------------------------------------------------------------------
# exported programs (torch.export.save): sampled where the graph holds dropout, refused where not
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """Programs of one BatchNorm + dropout classifier, exported in several ways, and its data."""
    folder = tmp_path_factory.mktemp("exported")
    x = torch.randn(4, 5)
    batch = ({0: torch.export.Dim.DYNAMIC},)
    net = _bn_net()
    files = {}

    def save(name: str, program) -> None:
        files[name] = folder / f"{name}.pt2"
        torch.export.save(program, files[name])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.export's pytree notes
        save("eval", torch.export.export(net, (x,), dynamic_shapes=batch))
        save("eval_decomposed", torch.export.export(net, (x,), dynamic_shapes=batch).run_decompositions())
        save("static", torch.export.export(net, (x,)))
        net[3].train()  # the recipe: dropout alone in train mode
        save("dropout_train", torch.export.export(net, (x,), dynamic_shapes=batch))
        save(
            "dropout_train_decomposed",
            torch.export.export(net, (x,), dynamic_shapes=batch).run_decompositions(),
        )
        net.train()
        save("all_train", torch.export.export(net, (x,), dynamic_shapes=batch))
    net.eval()
    files["weights"] = folder / "weights.pt"
    torch.save(net.state_dict(), files["weights"])
    (folder / "cli_bn_factory.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),\n"
        "                               torch.nn.Dropout(0.3), torch.nn.Linear(16, 3))\n"
    )
    rng = np.random.default_rng(0)
    files["data"] = folder / "data.npz"
    np.savez(files["data"], x=rng.normal(size=(200, 5)).astype(np.float32), y=rng.integers(0, 3, 200))
    return files


def _summary(folder: Path) -> pd.Series:
    return pd.read_csv(folder / "summary.csv").set_index("metric")["value"]


def test_an_exported_program_with_dropout_is_sampled_as_the_eager_model(
    tmp_path: Path, exported: dict[str, Path], monkeypatch, capsys
) -> None:
    common = ["--data", str(exported["data"]), "--n-samples", "200", "--quiet"]
    monkeypatch.chdir(exported["weights"].parent)
    monkeypatch.delitem(sys.modules, "cli_bn_factory", raising=False)
    eager = ["--model", "cli_bn_factory:make", "--weights", str(exported["weights"]), "--trust-code"]
    assert main(["report", *eager, *common, "--seed", "1", "--out", str(tmp_path / "eager")]) == 0
    want = _summary(tmp_path / "eager")
    want_off = pd.read_csv(tmp_path / "eager" / "summary.csv").set_index("metric")["deterministic"]
    assert want["mean mutual information"] > 0.01
    for how in ("dropout_train", "dropout_train_decomposed", "eval"):
        out = tmp_path / how
        assert (
            main(["report", "--model", str(exported[how]), "--trust-code", *common, "--out", str(out)]) == 0
        )
        got = _summary(out)
        # The same rate at the same place, other seeds: the mean mutual information (about 0.05 here)
        # agrees within 10 %, where a lost dropout gives 0 and a doubled rate about twice as much.
        assert got["mean mutual information"] == pytest.approx(want["mean mutual information"], rel=0.1), how
        assert got["accuracy"] == pytest.approx(want["accuracy"], abs=0.05), how
        # with dropout off the program is the eager model: the same baseline to float precision
        got_off = pd.read_csv(out / "summary.csv").set_index("metric")["deterministic"]
        assert got_off["accuracy"] == want_off["accuracy"], how
        assert got_off["NLL"] == pytest.approx(want_off["NLL"], rel=1e-5), how
        sites = pd.read_csv(out / "sites.csv")
        assert sites["rate"].tolist() == [0.3] and sites["kind"].tolist() == ["dropout"], (how, sites)


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("all_train", "exported in train mode, so its BatchNorm normalises each batch with that batch's own"),
        ("eval_decomposed", "holds no dropout op, so MC dropout has nothing to sample"),
        ("static", "exported for batches of exactly 4 input(s) (static shapes)"),
    ],
)
def test_an_exported_program_mc_dropout_cannot_sample_is_refused(
    tmp_path: Path, exported: dict[str, Path], capsys, how: str, message: str
) -> None:
    err = _fails(_report_args(tmp_path, exported[how], exported["data"]), capsys)
    assert message in err, err
    if how != "static":
        assert ".train() on its dropout and attention layers only" in err, err  # how to export instead


def test_an_exported_program_needs_trust_code(tmp_path: Path, exported: dict[str, Path], capsys) -> None:
    args = [
        "report",
        "--model",
        str(exported["eval"]),
        "--data",
        str(exported["data"]),
        "--out",
        str(tmp_path),
    ]
    err = _fails(args, capsys)
    assert "is an exported program (torch.export.save)" in err and "--trust-code" in err, err


# ------------------------------------------------------------------------------------------------
# --task regression on a classifier; TorchScript without deprecation noise; the printed summary
# ------------------------------------------------------------------------------------------------
def test_regression_on_a_k_class_model_suggests_classification(
    tmp_path: Path, scripted_model: Path, npz_data: Path, capsys
) -> None:
    err = _fails(_report_args(tmp_path, scripted_model, npz_data, "--task", "regression"), capsys)
    assert "look like the scores of 3 classes" in err and "pass --task classification" in err, err
    assert (
        "targets of shape (40,)" in err and "--output J (0 <= J < 3) is for a regressor of 3 targets" in err
    ), err
    wide = tmp_path / "wide.npz"
    np.savez(wide, x=np.zeros((6, 5), np.float32), y=np.zeros((6, 3), np.float32))
    err = _fails(_report_args(tmp_path, scripted_model, wide, "--task", "regression"), capsys)
    assert "the targets have 3 columns" in err and "choose it with --output J (0 <= J < 3)" in err, err


def test_torchscript_loads_without_deprecation_noise(
    tmp_path: Path, scripted_model: Path, npz_data: Path, capsys
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(_report_args(tmp_path, scripted_model, npz_data)) == 0
        warnings.warn("`torch.jit.load` is deprecated.", DeprecationWarning, stacklevel=1)  # ours only
    messages = [str(w.message) for w in caught]
    assert messages == ["`torch.jit.load` is deprecated."], messages
    assert "deprecated" not in capsys.readouterr().err


def test_report_prints_its_summary_with_title_and_bins(
    tmp_path: Path, scripted_model: Path, npz_data: Path, capsys
) -> None:
    args = [
        "report",
        "--model",
        str(scripted_model),
        "--trust-code",
        "--data",
        str(npz_data),
        "--n-samples",
        "4",
    ]
    out = tmp_path / "rep"
    assert main([*args, "--out", str(out), "--title", "Churn model, March", "--n-bins", "4"]) == 0
    printed = capsys.readouterr().out
    summary = pd.read_csv(out / "summary.csv").set_index("metric")
    lines = {line.split("  ")[0].strip(): line for line in printed.splitlines()}
    accuracy = summary.loc["accuracy"]
    assert f"{accuracy['value']:.4g}" in lines["accuracy"], printed
    assert f"[{accuracy['ci_low']:.4g}, {accuracy['ci_high']:.4g}]" in lines["accuracy"], printed
    assert "ECE" in lines and "n_inputs" in lines, printed
    assert "Churn model, March" in (out / "report.html").read_text()
    assert len(pd.read_csv(out / "reliability.csv")) == 4
    err = _fails([*args, "--out", str(tmp_path / "r2"), "--n-bins", "0"], capsys)
    assert "--n-bins must be at least 1" in err, err


def test_readme_demo_mentions_force() -> None:
    readme = (REPO / "README.md").read_text()
    demo = readme[readme.index("Run the demo") : readme.index("Run the tests")]
    assert "--force" in demo


def test_report_records_its_inputs_baseline_and_named_ood(
    tmp_path: Path, scripted_model: Path, npz_data: Path, capsys
) -> None:
    ood = tmp_path / "shifted.npz"
    np.savez(ood, x=np.random.default_rng(3).normal(5, 1, size=(12, 5)).astype(np.float32))
    out = tmp_path / "rep"
    argv = [
        "report",
        "--model",
        str(scripted_model),
        "--trust-code",
        "--data",
        str(npz_data),
        "--n-samples",
        "4",
    ]
    assert main([*argv, "--ood", str(ood), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    meta = summary["metadata"]
    assert meta["model"] == str(scripted_model.resolve()) and meta["data"] == str(npz_data.resolve()), meta
    assert meta["ood"] == str(ood.resolve()) and meta["weights"] == f"those saved in {scripted_model}", meta
    assert summary["ood_sets"] == {"shifted.npz": 12}, summary["ood_sets"]
    table = pd.read_csv(out / "summary.csv").set_index("metric")
    # the baseline is the scripted model run once in eval mode: its accuracy, recomputed here
    data = np.load(npz_data)
    net = torch.jit.load(str(scripted_model)).eval()
    with torch.no_grad():
        accuracy = (net(torch.from_numpy(data["x"])).argmax(1).numpy() == data["y"]).mean()
    assert table.loc["accuracy", "deterministic"] == pytest.approx(accuracy)
    assert "dropout off" in printed and "[shifted.npz]" in printed, printed
    assert main([*argv, "--no-baseline", "--out", str(tmp_path / "plain"), "--quiet"]) == 0
    assert "deterministic" not in pd.read_csv(tmp_path / "plain" / "summary.csv").columns
    assert json.loads((tmp_path / "plain" / "summary.json").read_text())["metadata"]["baseline"] is False


class _TinyEncoder(nn.Module):
    """A transformer encoder layer (attention dropout inside a fused op) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x.view(x.shape[0], 2, 8)).mean(1))


def test_an_exported_transformer_samples_its_attention_dropout_or_says_it_cannot(
    tmp_path: Path, capsys
) -> None:
    torch.manual_seed(0)
    net, x = _TinyEncoder().eval(), torch.randn(4, 16)
    batch = ({0: torch.export.Dim.DYNAMIC},)
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, x=rng.normal(size=(20, 16)).astype(np.float32), y=rng.integers(0, 3, 20))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.export.save(torch.export.export(net, (x,), dynamic_shapes=batch), tmp_path / "eval.pt2")
        net.train()  # no BatchNorm here: train mode is fine, and the attention keeps its dropout
        torch.export.save(torch.export.export(net, (x,), dynamic_shapes=batch), tmp_path / "train.pt2")
    for how in ("eval", "train"):
        argv = _report_args(tmp_path, tmp_path / f"{how}.pt2", data, "--out", str(tmp_path / how))
        assert main(argv) == 0
        err = capsys.readouterr().err
        sites = pd.read_csv(tmp_path / how / "sites.csv")
        assert (sites["kind"] == "dropout").sum() == 3 and (sites["rate"] == 0.2).all(), sites
        attention = (sites["kind"] == "attention_dropout").sum()
        if how == "eval":
            assert attention == 0 and "attention dropout (inside fused attention ops) was left out" in err, (
                err
            )
        else:
            assert attention == 1 and err == "", err


def test_an_exported_cnn_samples_its_channel_and_alpha_dropout(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.ReLU(),
        nn.Dropout2d(0.25),
        nn.Flatten(),
        nn.AlphaDropout(0.1),
        nn.Linear(144, 3),
    ).eval()
    for module in (net[2], net[4]):
        module.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.export.export(
            net, (torch.randn(4, 1, 8, 8),), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},)
        )
        torch.export.save(program, tmp_path / "cnn.pt2")
    rng = np.random.default_rng(0)
    data = tmp_path / "images.npz"
    np.savez(data, x=rng.normal(size=(12, 1, 8, 8)).astype(np.float32), y=rng.integers(0, 3, 12))
    assert main(_report_args(tmp_path, tmp_path / "cnn.pt2", data)) == 0, capsys.readouterr().err
    sites = pd.read_csv(tmp_path / "rep" / "sites.csv")
    assert sites[["kind", "rate"]].values.tolist() == [["dropout", 0.25], ["dropout", 0.1]], sites
    assert sites["module_type"].tolist()[1] == "AlphaDropout", sites
    table = pd.read_csv(tmp_path / "rep" / "summary.csv").set_index("metric")
    assert table.loc["mean mutual information", "value"] > 0  # the samples differ


def test_n_samples_auto_samples_adaptively_to_the_tolerance(tmp_path: Path, capsys) -> None:
    out = tmp_path / "auto"
    args = [
        "demo",
        "--out",
        str(out),
        "--epochs",
        "2",
        "--n-samples",
        "auto",
        "--tolerance",
        "0.05",
        "--quiet",
    ]
    assert main(args) == 0
    run = json.loads((out / "summary.json").read_text())["run"]
    assert run["n_samples"] == "auto" and run["tolerance"] == 0.05 and run["max_samples"] == 1000
    assert 20 <= run["samples_per_input"]["min"] <= run["samples_per_input"]["max"] <= 1000
    # a tolerance with a fixed N, and a word that is no number, are refused without a traceback
    assert main(["demo", "--out", str(tmp_path / "x"), "--n-samples", "10", "--tolerance", "0.05"]) == 2
    assert "adaptive sampling only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(tmp_path / "y"), "--n-samples", "many"])
    assert "whole number or 'auto'" in capsys.readouterr().err
