"""Active learning on scikit-learn's digits: MC dropout BALD (and BatchBALD) against random acquisition.

A small dropout MLP starts from 20 labelled digits (two per class). Each round it is trained afresh
on the labelled set, its test accuracy is measured (MC dropout, mean of the sampled
probabilities), and ``--acquire`` more digits are taken from the unlabelled pool: by BALD (the
mutual information of MC dropout, ``mcdrop.acquisition``), by BatchBALD (on the 100 pool digits of
highest BALD), or at random. Every method of a seed starts from the same labelled set and trains
with the same initial weights each round, so the seeds give paired comparisons; accuracy is printed
per round as mean ± standard error over the seeds, the learning curves are plotted to a PNG.

Run: ``python examples/active_learning_digits.py [--quick] [--out curves.png]`` (about 1-2 minutes
on one core; ``--quick``: 2 seeds, 3 rounds, about 15 s).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader

import mcdrop
from mcdrop import acquisition

METHODS = {"random": "random", "BALD": "bald", "BatchBALD": "batch_bald"}


def make_mlp(p: float) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128),
        nn.ReLU(),
        nn.Dropout(p),
        nn.Linear(128, 128),
        nn.ReLU(),
        nn.Dropout(p),
        nn.Linear(128, 10),
    )


def train(x: torch.Tensor, y: torch.Tensor, *, seed: int, p: float, steps: int) -> nn.Module:
    """A fresh MLP trained full-batch on the labelled set (the same initial weights for every method)."""
    torch.manual_seed(seed)
    net = make_mlp(p)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
    net.train()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval()


def initial_labels(y: np.ndarray, per_class: int, rng: np.random.Generator) -> list[int]:
    return [int(i) for c in range(10) for i in rng.choice(np.flatnonzero(y == c), per_class, replace=False)]


def run_seed(seed: int, args: argparse.Namespace, x: np.ndarray, y: np.ndarray) -> dict[str, list[float]]:
    """Accuracy per round of each method, for one seed (split, initial set, weights)."""
    x_pool, x_te, y_pool, y_te = train_test_split(x, y, test_size=500, random_state=seed, stratify=y)
    x_pool_t, y_pool_t = torch.from_numpy(x_pool), torch.from_numpy(y_pool)
    x_te_t, y_te_t = torch.from_numpy(x_te), torch.from_numpy(y_te)
    start = initial_labels(y_pool, 2, np.random.default_rng(seed))
    curves: dict[str, list[float]] = {}
    for name, method in METHODS.items():
        if name not in args.methods:
            continue
        labelled = list(start)
        curve = []
        for round_ in range(args.rounds + 1):
            net = train(
                x_pool_t[labelled], y_pool_t[labelled], seed=1000 * seed + round_, p=args.p, steps=args.steps
            )
            mc = mcdrop.MCDropout(
                net, n_samples=args.n_samples, seed=1000 * seed + round_, keep_samples=method == "batch_bald"
            )
            accuracy = float((mc.predict(x_te_t).predicted == y_te_t).float().mean())
            curve.append(accuracy)
            if round_ == args.rounds:
                break
            unlabelled = np.setdiff1d(np.arange(len(y_pool)), labelled)
            loader = DataLoader(x_pool_t[unlabelled], batch_size=256)  # the pool, streamed in order
            options = (
                {"prefilter": min(100, len(unlabelled)), "n_joint_samples": 2000}
                if method == "batch_bald"
                else {}
            )
            # a fresh seed per seed and round: one round's random draws do not repeat the last one's
            draw_seed = 1000 * seed + round_
            picked = acquisition.select_from_loader(
                mc, loader, args.acquire, method, seed=draw_seed, **options
            )
            labelled += unlabelled[picked.numpy()].tolist()
        curves[name] = curve
    return curves


def mean_se(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else float("nan")


def main() -> None:
    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--acquire", type=int, default=10, help="digits labelled per round")
    parser.add_argument("--steps", type=int, default=300, help="full-batch Adam steps per training")
    parser.add_argument("--p", type=float, default=0.5, help="dropout rate")
    parser.add_argument("--n-samples", type=int, default=20, help="MC dropout samples")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--quick", action="store_true", help="2 seeds, 3 rounds")
    parser.add_argument("--out", default="active_learning_digits.png", help="the learning curves (PNG)")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.rounds = 2, 3

    digits = load_digits()
    x, y = (digits.data / 16.0).astype(np.float32), digits.target
    began = time.perf_counter()
    runs = [run_seed(seed, args, x, y) for seed in range(args.seeds)]
    names = [n for n in METHODS if n in args.methods]

    print(
        f"test accuracy (mean ± standard error over {args.seeds} seeds), {args.acquire} digits labelled per round"
    )
    print(f"{'labelled':>8}  " + "  ".join(f"{n:>15}" for n in names))
    for r in range(args.rounds + 1):
        cells = [mean_se([run[n][r] for run in runs]) for n in names]
        print(f"{20 + r * args.acquire:>8}  " + "  ".join(f"{m:>8.3f} ± {s:.3f}" for m, s in cells))
    print("\nmean accuracy over the rounds after the first acquisition (area under the learning curve):")
    for n in names:
        m, s = mean_se([float(np.mean(run[n][1:])) for run in runs])
        print(f"  {n:>10}: {m:.3f} ± {s:.3f}")
    if "random" in names:
        for n in names:
            if n == "random":
                continue
            diffs = [float(np.mean(np.subtract(run[n][1:], run["random"][1:]))) for run in runs]
            m, s = mean_se(diffs)
            last_m, last_s = mean_se([run[n][-1] - run["random"][-1] for run in runs])
            wins = sum(d > 0 for d in diffs)
            print(
                f"  {n} - random, paired by seed: {m:+.3f} ± {s:.3f} over the rounds, "
                f"{last_m:+.3f} ± {last_s:.3f} at the last round; ahead in {wins} of {len(diffs)} seeds"
            )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = [20 + r * args.acquire for r in range(args.rounds + 1)]
    for n in names:
        stats = [mean_se([run[n][r] for run in runs]) for r in range(args.rounds + 1)]
        mean = np.array([m for m, _ in stats])
        se = np.nan_to_num(np.array([s for _, s in stats]))
        ax.plot(sizes, mean, marker="o", label=n)
        ax.fill_between(sizes, mean - se, mean + se, alpha=0.2)
    ax.set_xlabel("labelled digits")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Active learning on digits ({args.seeds} seeds, ± 1 SE)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"\nlearning curves written to {args.out} ({time.perf_counter() - began:.0f} s)")


if __name__ == "__main__":
    main()
