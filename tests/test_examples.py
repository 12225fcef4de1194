"""The examples run as they are and print what they promise (the UCI one has its own test)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # 5-10 s each: the examples train their models
@pytest.mark.parametrize(
    ("script", "args", "expected"),
    [
        ("classification_ood.py", ["--epochs", "8"], ["accuracy", "OOD pixel-shuffled", "report written"]),
        ("regression_heteroscedastic.py", ["--epochs", "10"], ["aleatoric", "PICP", "report written"]),
        ("transformer_text.py", [], ["attention_dropout", "fast_path_gate", "OOD AUROC by MI"]),
    ],
)
def test_example_runs(tmp_path: Path, script: str, args: list[str], expected: list[str]) -> None:
    if "transformer" not in script:
        args = [*args, "--out", str(tmp_path / "report")]
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / script), *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for text in expected:
        assert text in done.stdout, (text, done.stdout)
    if "--out" in args:
        assert (tmp_path / "report" / "report.html").stat().st_size > 10_000


@pytest.mark.slow  # ~15 s of CPU: 2 seeds x 3 rounds x 3 methods of training
def test_active_learning_example_runs(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "active_learning_digits.py"),
            "--quick",
            "--out",
            "curves.png",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for text in ["BALD", "BatchBALD", "random", "paired by seed", "learning curves written"]:
        assert text in done.stdout, (text, done.stdout)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
