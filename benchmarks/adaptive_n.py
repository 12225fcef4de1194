"""Fixed N = 100 against adaptive N (``n_samples="auto"``): forward rows, wall time, and the metrics.

For the demo's digits MLP (``mcdrop demo``'s model, trained the same way) and a small dropout CNN on
the same 8x8 digits, this prints, in one process:

* fixed N = 100: forward rows (samples x inputs), best-of-``--repeats`` wall time, accuracy, ECE
  and NLL with their 95% percentile bootstrap intervals over the inputs (1000 resamples, seed 0);
* adaptive N at each ``--tolerances`` value (``min_samples=20``, ``max_samples=1000``, target: the
  top-class probability): the same, the mean and largest samples per input, how many inputs hit
  ``max_samples``, and whether each of its three metrics lies inside the fixed run's interval (and
  the fixed value inside the adaptive run's interval);
* per tolerance, the ratio of forward rows (mean over seeds) and of wall time (best), fixed /
  adaptive, and whether every metric of every seed agreed within the intervals.

Each seed is one run of both (``--seeds``): the Monte Carlo noise of a metric such as the ECE is
itself of the order of its bootstrap interval's lower half-width on 540 inputs, so one seed says
little.

Forward rows count the sample rows the model computes for the result (``samples_per_input`` summed);
the first call's probe and check passes are made before timing. Run:
``python benchmarks/adaptive_n.py`` (about a minute on two cores); ``--threads`` sets torch's threads.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch
from torch import nn

import mcdrop
from mcdrop import metrics

# The demo's own data and model (private to the package, used here so that the benchmark measures
# exactly the model `mcdrop demo` reports on).
from mcdrop._demo import load_digits_data, train_digits_mlp

METRICS = ("accuracy", "ECE", "NLL")


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions on the 8x8 digits, dropout before and after the dense layer."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.25),
            nn.Linear(32 * 16, 128),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, 1, 8, 8)))


def train_cnn(x: torch.Tensor, y: torch.Tensor, epochs: int = 30, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def evaluate(pred: mcdrop.ClassificationPrediction, y: torch.Tensor) -> dict[str, tuple[float, float, float]]:
    """Each metric with its 95% percentile bootstrap interval (1000 resamples, seed 0)."""
    boot = metrics.bootstrap_classification(pred.probs, y, n_resamples=1000, seed=0)
    values = {
        "accuracy": metrics.accuracy(pred.probs, y),
        "ECE": metrics.expected_calibration_error(pred.probs, y),
        "NLL": metrics.negative_log_likelihood(pred.probs, y),
    }
    return {m: (values[m], *metrics.percentile_interval(boot[m], 0.95)) for m in METRICS}


def best_time(fn: Callable[[], mcdrop.Prediction], repeats: int) -> tuple[float, mcdrop.Prediction]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    assert out is not None
    return best, out


def inside(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    """Each value inside the other's interval."""
    return b[1] <= a[0] <= b[2] and a[1] <= b[0] <= a[2]


def show(values: dict[str, tuple[float, float, float]]) -> str:
    return "  ".join(f"{m} {v:.4f} [{lo:.4f}, {hi:.4f}]" for m, (v, lo, hi) in values.items())


def run(
    name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, tolerances: list[float], seeds: list[int],
    repeats: int,
) -> None:  # fmt: skip
    print(f"\n== {name}: {len(x)} test inputs; seeds {seeds}")
    rows_fixed = 100 * len(x)
    fixed_runs = []
    for seed in seeds:
        mcdrop.MCDropout(model, n_samples=100, seed=seed).predict(x)  # the first call's probe, before timing
        t_fixed, fixed = best_time(
            lambda s=seed: mcdrop.MCDropout(model, n_samples=100, seed=s).predict(x), repeats
        )
        fixed_runs.append((t_fixed, evaluate(fixed, y)))
        print(
            f"fixed N=100 seed {seed}  rows {rows_fixed:>7}  time {t_fixed:6.3f} s  {show(fixed_runs[-1][1])}"
        )
    t_fixed = min(t for t, _ in fixed_runs)
    for tol in tolerances:
        agree_all, rows_all, times = True, [], []
        for seed, (_, m_fixed) in zip(seeds, fixed_runs, strict=True):
            make = lambda tol=tol, s=seed: mcdrop.MCDropout(model, n_samples="auto", tolerance=tol, seed=s)  # noqa: E731
            make().predict(x)
            t_auto, auto = best_time(lambda make=make: make().predict(x), repeats)
            counts = auto.samples_per_input
            rows_all.append(int(counts.sum()))
            times.append(t_auto)
            m_auto = evaluate(auto, y)
            agree = {m: inside(m_auto[m], m_fixed[m]) for m in METRICS}
            agree_all = agree_all and all(agree.values())
            print(
                f"auto tol={tol:<5g} seed {seed}  rows {rows_all[-1]:>7}  time {t_auto:6.3f} s  {show(m_auto)}  "
                f"N mean {counts.float().mean():.1f} max {int(counts.max())}, at max_samples "
                f"{int((counts == auto.max_samples).sum())}; within the same seed's fixed-N intervals (and it in "
                f"theirs): {', '.join(m for m, ok in agree.items() if ok) or 'none'}"
            )
        rows = sum(rows_all) / len(rows_all)
        print(
            f"   tol={tol:g}: {rows_fixed / rows:.1f}x fewer forward rows, {t_fixed / min(times):.1f}x the speed of "
            f"fixed N=100; all metrics of all seeds within the intervals: {agree_all}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tolerances", type=float, nargs="+", default=[0.05, 0.03, 0.02, 0.01])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"mcdrop {mcdrop.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads"
    )
    data = load_digits_data(seed=0)
    mlp = train_digits_mlp(data, seed=0).eval()
    run("demo digits MLP", mlp, data.x_test, data.y_test, args.tolerances, args.seeds, args.repeats)
    cnn = train_cnn(data.x_train, data.y_train)
    run("digits CNN", cnn, data.x_test, data.y_test, args.tolerances, args.seeds, args.repeats)


if __name__ == "__main__":
    main()
