"""docs/quickstart.md runs as written, and examples/evaluate_cnn.py stays a short, honest evaluation."""

from __future__ import annotations

import ast
import io
import os
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def python_blocks(path: Path) -> list[str]:
    """The ```python blocks of a Markdown file, in order."""
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.DOTALL | re.MULTILINE)


def code_lines(source: str) -> int:
    """Physical lines holding code: not blank, not only a comment, not the module docstring."""
    tree = ast.parse(source)
    docstring: set[int] = set()
    first = tree.body[0] if tree.body else None
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        docstring = set(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    skip = {
        tokenize.COMMENT,
        tokenize.NL,
        tokenize.NEWLINE,
        tokenize.INDENT,
        tokenize.DEDENT,
        tokenize.ENDMARKER,
    }
    lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in skip:
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return len(lines - docstring)


def test_code_lines_counts_code_only() -> None:
    source = '"""Doc.\n\nMore doc.\n"""\n\nimport os  # why\n\n# a comment\nx = (\n    1,\n)\n'
    assert code_lines(source) == 4  # import, and the three lines of the assignment


@pytest.mark.slow  # ~6 s on 2 CPU cores: trains three small models and writes a report with figures
def test_quickstart_blocks_run_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every Python block of docs/quickstart.md, run in order in one namespace, in a fresh folder.

    McdropWarnings are errors under pytest, so a block that warns fails here too.
    """
    blocks = python_blocks(REPO / "docs" / "quickstart.md")
    assert len(blocks) >= 7  # the evaluation, dict batches, regression, aleatoric, adaptive, seed, context
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "quickstart"}
    rng = torch.get_rng_state()
    try:
        for i, block in enumerate(blocks):
            exec(compile(block, f"docs/quickstart.md, python block {i + 1}", "exec"), namespace)  # noqa: S102
    finally:
        torch.set_rng_state(rng)  # the quickstart seeds torch's global RNG for its training
    ns = namespace
    # the evaluation: the names the text promises, with the shapes it states
    pred, calibrated = ns["pred"], ns["calibrated"]
    assert pred.probs.shape == (360, 10) and pred.samples.shape == (50, 360, 10)
    assert torch.equal(calibrated.samples, pred.samples / ns["scaler"].temperature_)  # no new draws
    assert (
        pred.deterministic.n_samples == 1 and float(pred.deterministic.mutual_information.abs().max()) == 0.0
    )
    rep = ns["rep"]
    assert set(rep.variants) == {"deterministic", "recalibrated"}
    assert rep.recalibration["value"] == pytest.approx(ns["scaler"].temperature_)
    # the report's own fitted temperature and tempered prediction are the quickstart's scaler and calibrated
    assert rep.recalibrator.temperature_ == pytest.approx(ns["scaler"].temperature_)
    assert torch.equal(rep.predictions["recalibrated"].predicted, calibrated.predicted)
    assert rep.counts["n_ood [pixel-shuffled]"] == 360
    assert (tmp_path / "quickstart-report" / "report.html").stat().st_size > 10_000
    # dict batches read as the tuple batches: same inputs, same targets
    assert torch.equal(ns["pred_dicts"].targets, pred.targets)
    # regression, heteroscedastic and adaptive sections
    assert ns["pred_reg"].mean.shape == (400, 1) and bool((ns["high"] > ns["low"]).all())
    het = ns["pred_het"]
    assert torch.allclose(het.total_variance, het.variance + het.aleatoric_variance)
    auto = ns["pred_auto"]
    assert auto.samples_per_input.shape == (360,) and int(auto.samples_per_input.min()) >= 20
    assert len(ns["outs"]) == 10


@pytest.mark.slow  # ~10 s: trains the CNN and writes its report
def test_evaluate_cnn_example(tmp_path: Path) -> None:
    script = REPO / "examples" / "evaluate_cnn.py"
    assert code_lines(script.read_text()) <= 25
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        },
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Warning" not in done.stderr, done.stderr[-3000:]
    table = {}
    for line in done.stdout.splitlines():
        parts = line.rsplit(maxsplit=3)
        if len(parts) == 4 and parts[0] in ("accuracy", "NLL", "ECE"):
            table[parts[0]] = [float(v) for v in parts[1:]]  # deterministic, MC, MC + temperature
    assert set(table) == {"accuracy", "NLL", "ECE"}, done.stdout
    moved = re.search(r"T = ([\d.]+), classes changed: (\d+)", done.stdout)
    assert moved, done.stdout
    assert 0 < float(moved.group(1)) < 1  # the MC predictions of this CNN are underconfident
    # Always: each input the temperature moved changes the accuracy by at most 1/360 (4-decimal print).
    changed = int(moved.group(2))
    assert abs(table["accuracy"][2] - table["accuracy"][1]) <= changed / 360 + 1e-4, done.stdout
    # This run (seeded, one thread): what the example's docstring states, no class moved, the
    # accuracy unchanged. Another thread count sums in another order and trains another CNN.
    assert changed == 0 and table["accuracy"][1] == table["accuracy"][2], done.stdout
    assert table["NLL"][2] < table["NLL"][1]  # temperature fitted on validation helps on test
    assert (tmp_path / "evaluate_cnn-report" / "report.html").stat().st_size > 10_000
