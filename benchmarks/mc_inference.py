"""How fast is MC dropout inference with mcdrop, against one pass, a naive loop and other libraries?

Run it from the repository root (the package need not be installed)::

    python benchmarks/mc_inference.py                 # every model, N = 10, 50, 100
    python benchmarks/mc_inference.py --models mlp --n 50 --repeats 9
    python benchmarks/mc_inference.py --markdown      # the table of docs/performance.md

For each model and number of samples N it times, round-robin in one process (so that a busy
machine slows every contender alike), the median of ``--repeats`` rounds of:

* ``one pass``: one deterministic forward pass of the model in eval mode (for the transformer the
  fused fast path, which skips dropout);
* ``loop``: N forward passes with dropout correctly on (``mcdrop.enable_dropout``: every dropout,
  attention dropout and LSTM inter-layer dropout in train mode, BatchNorm in eval, the fused
  transformer fast path off), stacked: the naive baseline;
* ``mcdrop``: ``mcdrop.MCDropout(model, n_samples=N).sample(x)``, the N samples samples-first
  (the default ``strategy="auto"``; its choice is printed);
* ``baal``: baal's ``mc_inference(model, x, N, replicate_in_memory=True)`` and
  ``torch-uncertainty``: its ``mc_dropout(model, N, on_batch=True)`` wrapper, when installed
  (``pip install -e .[bench]``), both run inside ``mcdrop.enable_dropout`` so that they draw the
  same, correct randomness (on their own they switch on ``nn.Dropout`` modules only).

It prints the median time of each and mcdrop's time as a multiple of each baseline (below 1:
mcdrop is faster). Only the two functions used are loaded from the peer libraries, not their
packages' ``__init__`` (baal's pulls in transformers and takes many seconds).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import logging
import os
import platform
import statistics
import sys
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mcdrop  # noqa: E402

# --------------------------------------------------------------------------- the models


class HeadDropoutCNN(nn.Module):
    """A small CNN with BatchNorm whose only dropout sits before the classifier head."""

    def __init__(self, n_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(128, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def mlp() -> nn.Module:
    """784-512-512-10 with dropout after each hidden layer."""
    return nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(512, 512), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(512, 10),
    )  # fmt: skip


class TransformerClassifier(nn.Module):
    """Token embedding + positions, an ``nn.TransformerEncoder`` (dropout 0.1 everywhere), mean pooling."""

    def __init__(self, vocab: int = 1000, d: int = 128, heads: int = 4, ff: int = 512, layers: int = 2,
                 length: int = 64, n_classes: int = 5) -> None:  # fmt: skip
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(length, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, n_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(tokens) + self.pos[: tokens.shape[1]])
        return self.head(h.mean(1))


class LSTMClassifier(nn.Module):
    """Token embedding, a 2-layer ``nn.LSTM`` with inter-layer dropout 0.3, the last step's state."""

    def __init__(self, vocab: int = 1000, d: int = 64, hidden: int = 128, n_classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.lstm = nn.LSTM(d, hidden, num_layers=2, dropout=0.3, batch_first=True)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.embed(tokens))[0][:, -1])


def build(name: str) -> tuple[nn.Module, torch.Tensor, str]:
    """The model (random init, eval mode), its input batch and a description."""
    torch.manual_seed(0)
    if name == "cnn":
        return (
            HeadDropoutCNN().eval(),
            torch.randn(64, 3, 32, 32),
            "CNN+BatchNorm, dropout before the head; 64x3x32x32",
        )
    if name == "mlp":
        return (
            mlp().eval(),
            torch.randn(256, 784),
            "MLP 784-512-512-10, dropout after each hidden layer; 256x784",
        )
    if name == "transformer":
        return (
            TransformerClassifier().eval(),
            torch.randint(0, 1000, (32, 64)),
            "TransformerEncoder d128 h4 ff512 x2, attention dropout on; 32x64 tokens",
        )
    if name == "lstm":
        return (
            LSTMClassifier().eval(),
            torch.randint(0, 1000, (32, 32)),
            "LSTM 2x128, inter-layer dropout 0.3; 32x32 tokens",
        )
    raise SystemExit(f"unknown model {name!r}; choose from cnn, mlp, transformer, lstm")


# --------------------------------------------------------------------------- the peers (loaded minimally)


def _site_packages_file(package: str, relative: str) -> Path | None:
    spec = importlib.util.find_spec(package) if package not in sys.modules else None
    if package in sys.modules:
        root = Path(next(iter(sys.modules[package].__path__)))
    elif spec is None or not spec.submodule_search_locations:
        return None
    else:
        root = Path(next(iter(spec.submodule_search_locations)))
    path = root / relative
    return path if path.exists() else None


def load_baal() -> Callable[..., Any] | None:
    """baal's ``mc_inference`` (from ``baal/modelwrapper.py``) with the one helper it uses."""
    modelwrapper = _site_packages_file("baal", "modelwrapper.py")
    iterutils = _site_packages_file("baal", "utils/iterutils.py")
    if modelwrapper is None or iterutils is None:
        return None
    helpers = types.ModuleType("_bench_baal_iterutils")
    exec(compile(iterutils.read_text(), str(iterutils), "exec"), helpers.__dict__)  # noqa: S102
    tree = ast.parse(modelwrapper.read_text())
    func = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "mc_inference")
    namespace: dict[str, Any] = {"torch": torch, "Sequence": __import__("collections.abc").abc.Sequence,
                                 "map_on_tensor": helpers.map_on_tensor}  # fmt: skip
    exec(compile(ast.Module(body=[func], type_ignores=[]), str(modelwrapper), "exec"), namespace)  # noqa: S102
    return namespace["mc_inference"]


def load_torch_uncertainty() -> Callable[..., Any] | None:
    """torch-uncertainty's ``mc_dropout`` (``torch_uncertainty/methods/mc_dropout.py`` on its own)."""
    path = _site_packages_file("torch_uncertainty", "methods/mc_dropout.py")
    if path is None:
        return None
    spec = importlib.util.spec_from_file_location("_bench_tu_mc_dropout", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError:  # einops missing
        return None
    return module.mc_dropout


def version_of(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001
        return "not installed"


# --------------------------------------------------------------------------- timing


def contenders(
    model: nn.Module, x: torch.Tensor, n: int, peers: dict[str, Any]
) -> dict[str, Callable[[], Any]]:
    """Zero-argument callables, one per contender, each drawing N samples (or one pass)."""
    mc = mcdrop.MCDropout(model, n_samples=n, seed=0)

    def one_pass() -> Any:
        return model(x)

    def loop() -> Any:
        with mcdrop.enable_dropout(model):
            return torch.stack([model(x) for _ in range(n)])

    runs: dict[str, Callable[[], Any]] = {"one pass": one_pass, "loop": loop, "mcdrop": lambda: mc.sample(x)}
    if peers.get("baal") is not None:
        mc_inference = peers["baal"]

        def baal() -> Any:
            with mcdrop.enable_dropout(model):
                return mc_inference(model, x, n, replicate_in_memory=True)

        runs["baal"] = baal
    if peers.get("torch-uncertainty") is not None:
        try:
            wrapped = peers["torch-uncertainty"](model, num_estimators=n, on_batch=True)
        except ValueError:  # it only takes models with nn.Dropout-like modules (not an LSTM's dropout)
            return runs
        wrapped.eval()

        def tu() -> Any:
            with mcdrop.enable_dropout(model):
                return wrapped(x)

        runs["torch-uncertainty"] = tu
    return runs


def time_round_robin(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each callable over ``repeats`` rounds, all callables in every round."""
    with torch.inference_mode(False), torch.no_grad():
        for fn in runs.values():  # warm-up (allocator, mcdrop's per-signature decision)
            fn()
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(repeats):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


class _StrategyLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.last = ""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "sampling with strategy" in message:
            self.last = message.split("strategy ", 1)[1].split(" ", 1)[0].strip("'")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="cnn,mlp,transformer,lstm")
    parser.add_argument("--n", default="10,50,100", help="numbers of samples, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-peers", action="store_true", help="skip baal and torch-uncertainty")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    peers: dict[str, Any] = {}
    if not args.no_peers:
        peers = {"baal": load_baal(), "torch-uncertainty": load_torch_uncertainty()}
    log = _StrategyLog()
    logging.getLogger("mcdrop.sampling").addHandler(log)
    logging.getLogger("mcdrop.sampling").setLevel(logging.DEBUG)

    print(f"# MC dropout inference, {time.strftime('%Y-%m-%d')}")
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), python {platform.python_version()}, mcdrop {mcdrop.__version__}, "
        f"baal {version_of('baal') if peers.get('baal') else 'not used'}, "
        f"torch-uncertainty {version_of('torch-uncertainty') if peers.get('torch-uncertainty') else 'not used'}"
    )
    peer_names = [p for p in ("baal", "torch-uncertainty") if peers.get(p) is not None]
    header = ["model", "N", "strategy", "one pass", "loop", "mcdrop", *peer_names,
              "x one pass", "x loop", *[f"x {p}" for p in peer_names]]  # fmt: skip
    rows = []
    for name in args.models.split(","):
        model, x, description = build(name.strip())
        print(f"# {name}: {description}")
        for n in (int(v) for v in args.n.split(",")):
            log.last = ""
            med = time_round_robin(contenders(model, x, n, peers), args.repeats)
            mine = med["mcdrop"]
            row = [name, str(n), log.last or "cached"]
            row += [
                f"{med[k] * 1e3:.1f} ms" if k in med else "n/a"
                for k in ["one pass", "loop", "mcdrop", *peer_names]
            ]
            row += [f"{mine / med['one pass']:.2f}", f"{mine / med['loop']:.2f}"]
            row += [f"{mine / med[p]:.2f}" if p in med else "n/a" for p in peer_names]
            rows.append(row)
            print("  " + "  ".join(f"{h}={v}" for h, v in zip(header, row, strict=True)), flush=True)
    if args.markdown:
        print()
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
    with contextlib.suppress(Exception):
        logging.getLogger("mcdrop.sampling").removeHandler(log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
