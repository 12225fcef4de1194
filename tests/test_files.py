"""Files: nothing is overwritten without asking, writes are atomic, loading a model is a trust boundary.

* ``report.save``, ``UncertaintyReport.to_html(path)`` and ``mcdrop report``/``mcdrop demo`` never
  replace existing files without ``overwrite=True``/``--force``; ``--force`` replaces only a previous
  mcdrop report, never a folder holding anything else, and says so before any work is done.
* Writes are atomic: an exception or a ``KeyboardInterrupt`` at any step (a figure, the HTML, the
  final rename) leaves the target absent or exactly as it was, and no temporary file behind.
* Nothing is written outside the chosen folder: the only entries added next to it are the folder
  itself, and every file it lists in ``summary.json`` is a plain name inside it.
* Loading is a trust boundary: ``--weights`` and ``.pt`` data go through
  ``torch.load(weights_only=True)`` (a pickle that would run code is refused and does not run);
  TorchScript files and ``package.module:factory`` models, which run code, need ``--trust-code``
  (without it the file is not even opened and the module not imported); ``predict_loader``
  checkpoints are read with ``weights_only=True`` too.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from zoo import mlp

import mcdrop
from mcdrop.cli import main
from mcdrop.errors import InvalidInputError, ReportExistsError
from mcdrop.report import UncertaintyReport, _render


@pytest.fixture(autouse=True)
def fast_png(monkeypatch):
    """Tiny fixed PNGs instead of rendered figures: these tests are about files, not pictures."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 3), (20, 120, 200)).save(buf, format="PNG")
    png = buf.getvalue()
    monkeypatch.setattr(UncertaintyReport, "_png", lambda self, name: png)


@pytest.fixture(scope="module")
def report() -> UncertaintyReport:
    torch.manual_seed(0)
    mc = mcdrop.MCDropout(mlp(5, 3, hidden=16, p=0.3, act=nn.ReLU), n_samples=4, seed=0)
    pred = mc.predict(torch.randn(30, 5))
    return mcdrop.report(pred, torch.randint(0, 3, (30,)), model=mc, title="files")


def digest(folder: Path) -> dict[str, str]:
    """Every entry below ``folder`` with a hash of its bytes (symlinks by their target)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            out[rel] = "link->" + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def no_leftovers(parent: Path, allowed: set[str]) -> None:
    extra = sorted(p.name for p in parent.iterdir() if p.name not in allowed)
    assert not extra, f"left behind next to the report: {extra}"


# ----------------------------------------------------------------------------- report.save / to_html
def test_save_writes_only_plain_file_names_inside_the_folder(report, tmp_path) -> None:
    target = report.save(tmp_path / "out")
    no_leftovers(tmp_path, {"out"})
    listed = json.loads((target / "summary.json").read_text(encoding="utf-8"))["files"]
    assert sorted(listed) == sorted(p.name for p in target.iterdir())
    assert all(Path(name).name == name and name not in (".", "..") for name in listed)
    assert all(p.is_file() and not p.is_symlink() for p in target.iterdir())


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, OSError])
@pytest.mark.parametrize("step", ["html", "summary_json", "rename"])
def test_save_interrupted_at_any_step_leaves_the_old_report_exactly(
    report, tmp_path, monkeypatch, interrupt, step
) -> None:
    from mcdrop.report import _report

    target = report.save(tmp_path / "out")
    before = digest(target)
    if step == "html":
        monkeypatch.setattr(_render, "document_html", _raiser(interrupt))
    elif step == "summary_json":
        monkeypatch.setattr(_report.UncertaintyReport, "_summary_json", _raiser(interrupt))
    else:
        real_rename = os.rename
        calls = {"n": 0, "fail": 2}

        def rename(src, dst):  # the rename that puts the new report in place fails
            calls["n"] += 1
            if calls["n"] == calls["fail"]:
                raise interrupt("interrupted")
            return real_rename(src, dst)

        monkeypatch.setattr(_report.os, "rename", rename)
    with pytest.raises(interrupt):
        report.save(target, overwrite=True)
    assert digest(target) == before
    no_leftovers(tmp_path, {"out"})
    if step == "rename":  # a fresh folder is renamed into place at once
        calls["n"], calls["fail"] = 0, 1
    with pytest.raises(interrupt):
        report.save(tmp_path / "fresh")
    no_leftovers(tmp_path, {"out"})


def _raiser(exc: type[BaseException]):
    def raise_(*args, **kwargs):
        raise exc("interrupted")

    return raise_


def test_save_never_overwrites_without_permission_nor_anything_but_a_report(report, tmp_path) -> None:
    target = report.save(tmp_path / "out")
    before = digest(target)
    with pytest.raises(ReportExistsError, match="overwrite=True"):
        report.save(target)
    (target / "notes.txt").write_text("mine")
    before = digest(target)
    with pytest.raises(ReportExistsError, match="notes.txt"):
        report.save(target, overwrite=True)
    assert digest(target) == before
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(ReportExistsError, match="symbolic link"):
        report.save(link, overwrite=True)
    assert digest(target) == before and link.is_symlink()


def test_to_html_never_overwrites_without_permission_and_writes_atomically(
    report, tmp_path, monkeypatch
) -> None:
    page = tmp_path / "page.html"
    page.write_text("my own page")
    with pytest.raises(ReportExistsError, match="overwrite=True"):
        report.to_html(page)
    assert page.read_text() == "my own page"
    with pytest.raises(ReportExistsError, match="folder"):
        report.to_html(tmp_path)
    text = report.to_html(page, overwrite=True)
    assert page.read_text(encoding="utf-8") == text and text.startswith("<!DOCTYPE html>")
    # a failure while writing leaves the old page and no temporary file
    from mcdrop.report import _report

    def broken_fdopen(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(_report.os, "fdopen", broken_fdopen)
    with pytest.raises(KeyboardInterrupt):
        report.to_html(page, overwrite=True)
    assert page.read_text(encoding="utf-8") == text
    no_leftovers(tmp_path, {"page.html"})
    assert report.to_html().startswith("<!DOCTYPE html>")  # no path: nothing written


# ----------------------------------------------------------------------------- the command line
@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    model = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(mlp(5, 3, hidden=16, p=0.3, act=nn.ReLU)), str(model))
    data = tmp_path / "data.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.normal(size=(24, 5)).astype(np.float32), y=rng.integers(0, 3, 24))
    weights = tmp_path / "weights.pt"
    torch.save(mlp(5, 3, hidden=16, p=0.3, act=nn.ReLU).state_dict(), weights)
    return {"model": model, "data": data, "weights": weights}


def report_args(files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "report",
        "--model",
        str(files["model"]),
        "--data",
        str(files["data"]),
        "--out",
        str(out),
        "--n-samples",
        "3",
        "--quiet",
        "--trust-code",
        *extra,
    ]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_cli_never_overwrites_without_force_and_force_replaces_only_a_report(files, tmp_path, capsys) -> None:
    out = tmp_path / "rep"
    assert main(report_args(files, out)) == 0
    before = digest(out)
    assert main(report_args(files, out)) == 2
    assert "--force" in one_error_line(capsys)
    assert digest(out) == before
    assert main(report_args(files, out, "--force")) == 0  # a previous report: replaced
    assert set(digest(out)) == set(before)
    no_leftovers(tmp_path, {"rep", *(p.name for p in files.values())})


def test_cli_force_on_a_folder_with_other_files_refuses_before_any_work(
    files, tmp_path, capsys, monkeypatch
) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    before = digest(out)

    def no_work(*args, **kwargs):
        raise AssertionError("the model was evaluated although the output folder was refused")

    monkeypatch.setattr(mcdrop.MCDropout, "predict_loader", no_work)
    assert main(report_args(files, out, "--force")) == 2
    assert "thesis.tex" in one_error_line(capsys)
    assert digest(out) == before
    assert main(["demo", "--out", str(out), "--force", "--quiet", "--epochs", "1"]) == 2
    assert "thesis.tex" in one_error_line(capsys)
    assert digest(out) == before


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_cli_out_that_is_a_file_or_a_link_is_refused(files, tmp_path, capsys, kind) -> None:
    target = tmp_path / "somewhere"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("a file")
    else:
        out.symlink_to(target)
    for force in ((), ("--force",)):
        assert main(report_args(files, out, *force)) == 2
        assert kind.replace("symlink", "symbolic link") in one_error_line(capsys)
    assert (out.read_text() == "a file") if kind == "file" else out.is_symlink()
    assert digest(target) == {"keep.txt": hashlib.sha256(b"keep").hexdigest()}


def test_cli_interrupted_while_writing_leaves_nothing_or_the_old_report(files, tmp_path, monkeypatch) -> None:
    out = tmp_path / "rep"
    monkeypatch.setattr(_render, "document_html", _raiser(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        main(report_args(files, out))
    no_leftovers(tmp_path, {p.name for p in files.values()})
    monkeypatch.undo()
    monkeypatch.setattr(UncertaintyReport, "_png", lambda self, name: b"\x89PNG fake")
    assert main(report_args(files, out)) == 0
    before = digest(out)
    monkeypatch.setattr(_render, "document_html", _raiser(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        main(report_args(files, out, "--force"))
    assert digest(out) == before
    no_leftovers(tmp_path, {"rep", *(p.name for p in files.values())})


def test_cli_torchscript_needs_trust_code_and_is_not_even_opened_without_it(
    files, tmp_path, capsys, monkeypatch
) -> None:
    opened = []
    real_load = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: opened.append(a) or real_load(*a, **k))
    args = [a for a in report_args(files, tmp_path / "rep") if a != "--trust-code"]
    assert main(args) == 2
    assert "--trust-code" in one_error_line(capsys)
    assert not opened and not (tmp_path / "rep").exists()
    assert main([*args, "--trust-code"]) == 0
    assert len(opened) == 1


def _malicious_pickle(path: Path, marker: Path) -> None:
    """A file that, unpickled without weights_only, would create ``marker`` (code execution)."""

    class Payload:
        def __reduce__(self):
            return (builtins.open, (str(marker), "w"))

    torch.save({"0.weight": Payload(), "x": torch.zeros(4, 5), "y": torch.zeros(4)}, str(path))


def test_cli_weights_and_data_are_loaded_with_weights_only(files, tmp_path, capsys, monkeypatch) -> None:
    module = tmp_path / "trusted_factory.py"
    module.write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3),"
        " torch.nn.Linear(16, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    calls = []
    real_load = torch.load
    monkeypatch.setattr(
        torch, "load", lambda *a, **k: calls.append(k.get("weights_only")) or real_load(*a, **k)
    )
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    _malicious_pickle(evil, marker)
    base = ["report", "--model", "trusted_factory:make", "--trust-code", "--n-samples", "2", "--quiet"]
    assert (
        main([*base, "--weights", str(evil), "--data", str(files["data"]), "--out", str(tmp_path / "a")]) == 2
    )
    assert "could not load weights" in one_error_line(capsys)
    assert (
        main([*base, "--weights", str(files["weights"]), "--data", str(evil), "--out", str(tmp_path / "b")])
        == 2
    )
    one_error_line(capsys)
    assert not marker.exists(), "a pickle ran code"
    assert calls and all(flag is True for flag in calls), calls
    assert (
        main(
            [
                *base,
                "--weights",
                str(files["weights"]),
                "--data",
                str(files["data"]),
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 0
    )


def test_cli_factory_module_is_not_imported_without_trust_code(files, tmp_path, capsys, monkeypatch) -> None:
    marker = tmp_path / "imported"
    (tmp_path / "side_effect_models.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Dropout(0.3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    args = [
        "report",
        "--model",
        "side_effect_models:make",
        "--data",
        str(files["data"]),
        "--out",
        str(tmp_path / "r"),
        "--quiet",
    ]
    assert main(args) == 2
    assert "--trust-code" in one_error_line(capsys)
    assert not marker.exists() and "side_effect_models" not in sys.modules
    assert main([*args, "--trust-code", "--n-samples", "2"]) == 0
    assert marker.exists()
    sys.modules.pop("side_effect_models", None)


@pytest.mark.parametrize(
    ("device", "message"),
    [("bogus", "not a device"), ("meta", "meta")]
    + ([] if torch.cuda.is_available() else [("cuda", "no CUDA device")]),
)
def test_cli_bad_device_is_one_clear_line(files, tmp_path, capsys, device, message) -> None:
    assert main(report_args(files, tmp_path / "rep", "--device", device)) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "rep").exists()


# ----------------------------------------------------------------------------- checkpoints
def test_predict_loader_checkpoints_are_read_with_weights_only(tmp_path) -> None:
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "run.ckpt"
    _malicious_pickle(checkpoint, marker)
    loader = DataLoader(TensorDataset(torch.randn(8, 5), torch.randint(0, 3, (8,))), batch_size=4)
    mc = mcdrop.MCDropout(mlp(5, 3, hidden=16, p=0.3, act=nn.ReLU), n_samples=2, seed=0)
    with pytest.raises(InvalidInputError, match="could not read the checkpoint"):
        mc.predict_loader(loader, progress=False, keep="metrics", checkpoint=checkpoint)
    assert not marker.exists(), "a checkpoint ran code"
    assert checkpoint.exists()  # not deleted either: the user decides
