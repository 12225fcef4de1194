"""The `mcdrop` command: demo, report, and every error path exiting 2 with one clear message."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from mcdrop.cli import main

REPO = Path(__file__).resolve().parents[1]


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3)).eval()


@pytest.fixture()
def scripted_model(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(_classifier()), str(path))
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
    assert summary, "empty summary.json"
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
    args = ["report", "--model", str(scripted_model), "--data", str(npz_data), "--out", str(tmp_path / "r"), "--quiet"]
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
