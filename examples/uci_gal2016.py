"""Reproduce Gal & Ghahramani (2016), "Dropout as a Bayesian Approximation", Table 1 ("Dropout" column).

The paper evaluates MC dropout on UCI regression sets by test RMSE and test log-likelihood. This
script repeats that experiment with mcdrop on the seven sets kept in ``../shared/data/uci`` (relative
to the repository root), following the protocol of that folder's ``README.md``, which is the one of the
authors' code (yaringal/DropoutUncertaintyExps):

* Splits: ``np.random.seed(1)``, then for each split ``perm = np.random.choice(range(n), n,
  replace=False)``; the first ``round(0.9 * n)`` rows of the permutation train, the rest test.
  20 splits (protein: 5).
* Inputs and target are standardised with the *training* split's mean and std (ddof 0, a constant
  column gets std 1); predictions are mapped back to original units before scoring.
* Network: dropout(p) -> Linear(d, 50) -> ReLU -> dropout(p) -> Linear(50, 1) (protein: 100 hidden
  units), Keras-style initialisation (Glorot-uniform weights, zero biases), our own
  :class:`mcdrop.nn.Dropout`.
* Training: Adam (lr 1e-3), batch 32, reshuffled every epoch, 400 epochs (protein 200). Loss: MSE on
  the standardised target plus ``reg * sum(W**2)`` for each weight matrix (not the biases) -- Keras'
  ``l2(reg)`` convention -- with ``reg = l**2 * (1 - p) / (2 * N * tau)``, N the number of training
  points and prior length-scale l = 1e-2 (yacht 1e-1, naval 1). p and tau are fixed per set (the
  values the authors found by Bayesian optimisation).
* Test: T = 10000 stochastic passes with :class:`mcdrop.MCDropout`; RMSE of the MC mean and the MC
  test log-likelihood ``mean_i [logsumexp_t(-tau/2 (y_i - yhat_ti)**2) - log T - 0.5 log 2pi +
  0.5 log tau]`` (:func:`mcdrop.metrics.mc_log_likelihood`), both in original units: ``yhat`` is
  un-standardised as ``yhat_std * std_y + mean_y`` and tau is applied to the original-unit squared
  error, exactly as in the authors' ``net.py``.
* Report: mean +- standard error over splits (``std / sqrt(n_splits)``, ddof 0), beside the paper's
  numbers, with the difference in units of the combined standard error
  ``sqrt(se_ours**2 + se_paper**2)`` and a "within 2 SE" verdict.

All splits of one set have the same number of training rows, so the S networks of the S splits are
trained together as one batched network (weights of shape ``(S, in, out)``, ``torch.baddbmm``). Every
split still has its own data, standardisation, shuffling, dropout masks and Adam state: the loss is the
sum of the per-split losses and Adam is element-wise, so each split's network gets exactly the updates
it would get if it were trained alone; batching only removes Python overhead. For testing, each split's
network is copied into a plain ``nn.Sequential`` and evaluated with ``mcdrop.MCDropout``.

Run from the repository root (mcdrop need not be installed)::

    PYTHONPATH=. python examples/uci_gal2016.py --quick                       # smoke run, ~1 min
    PYTHONPATH=. python examples/uci_gal2016.py --datasets yacht energy wine-quality-red \
        --out uci_results.csv                                                   # full protocol

Options: ``--datasets`` (default: all seven), ``--splits`` (default 20, protein 5), ``--epochs``
(default 400, protein 200), ``--samples`` (T, default 10000), ``--quick`` (2 splits, 20 epochs,
T=100), ``--seed``, ``--threads``, ``--data-dir`` (default ``<repo>/../shared/data/uci``), ``--out``
(a CSV of the summary; the per-split values go to ``<out>_splits.csv``). Runs are reproducible: the
splits come from ``np.random.seed(1)``, initialisation, shuffling and training dropout from
``torch.manual_seed(seed + dataset index)``, and the MC passes from ``MCDropout(seed=...)``.
Results and timings are in ``docs/uci.md``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

import mcdrop
from mcdrop.metrics import mc_log_likelihood
from mcdrop.nn import Dropout

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "uci"

BATCH_SIZE = 32
LEARNING_RATE = 1e-3
TRAIN_FRACTION = 0.9
SPLIT_SEED = 1
MC_BATCH_ROWS = 16384  # rows per MC forward pass: small chunks stay in cache (~2.5x faster than 256 MiB)


@dataclass(frozen=True)
class UCIConfig:
    """One data set of Table 1: where its data are, its fixed hyper-parameters and the paper's numbers."""

    folder: str
    p: float
    tau: float
    lengthscale: float = 1e-2
    n_hidden: int = 50
    epochs: int = 400
    n_splits: int = 20
    target_col: int = -1
    feature_cols: tuple[int, ...] | None = None  # None: every column except the target
    paper_rmse: tuple[float, float] = (math.nan, math.nan)  # mean, standard error
    paper_ll: tuple[float, float] = (math.nan, math.nan)


DATASETS: dict[str, UCIConfig] = {
    "yacht": UCIConfig(
        "yacht",
        0.01,
        0.541869562034,
        lengthscale=1e-1,
        paper_rmse=(1.1092, 0.0850),
        paper_ll=(-1.5541, 0.0269),
    ),
    "energy": UCIConfig(
        "energy", 0.05, 0.427114830213, paper_rmse=(1.6634, 0.0433), paper_ll=(-1.9853, 0.0198)
    ),
    "wine-quality-red": UCIConfig(
        "wine-quality-red", 0.05, 2.95833720839, paper_rmse=(0.6202, 0.0087), paper_ll=(-0.9334, 0.0142)
    ),
    "kin8nm": UCIConfig(
        "kin8nm", 0.05, 192.482910156, paper_rmse=(0.0965, 0.0007), paper_ll=(0.9509, 0.0057)
    ),
    "power-plant": UCIConfig(
        "power-plant", 0.005, 0.0871109017617, paper_rmse=(4.0221, 0.0411), paper_ll=(-2.7952, 0.0104)
    ),
    "naval-propulsion-plant": UCIConfig(
        "naval-propulsion-plant",
        0.05,
        42173.5152106,
        lengthscale=1.0,
        target_col=16,
        feature_cols=tuple(range(16)),
        paper_rmse=(0.0055, 0.0001),
        paper_ll=(3.8046, 0.0111),
    ),
    "protein-tertiary-structure": UCIConfig(
        "protein-tertiary-structure",
        0.005,
        0.0644419184588,
        n_hidden=100,
        epochs=200,
        n_splits=5,
        paper_rmse=(4.3555, 0.0195),
        paper_ll=(-2.8912, 0.0043),
    ),
}

SUMMARY_COLUMNS = [
    "dataset",
    "splits",
    "epochs",
    "samples",
    "full_protocol",
    "rmse",
    "rmse_se",
    "paper_rmse",
    "paper_rmse_se",
    "rmse_diff_se",
    "rmse_within_2se",
    "test_ll",
    "test_ll_se",
    "paper_test_ll",
    "paper_test_ll_se",
    "test_ll_diff_se",
    "test_ll_within_2se",
    "train_seconds",
    "test_seconds",
]


# ---------------------------------------------------------------------------------------------- data
def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """Return the UCI data folder, or raise ``FileNotFoundError`` saying where it was looked for."""
    path = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    if not path.is_dir():
        raise FileNotFoundError(
            f"UCI data folder not found: {path}. It should hold one sub-folder per data set with a "
            f"data.txt (e.g. {path / 'yacht' / 'data.txt'}); the default is <repo>/../shared/data/uci. "
            "Pass --data-dir to point elsewhere."
        )
    return path


def load_dataset(name: str, data_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load one set as ``(X, y)`` float64 arrays: inputs ``(n, d)`` and target ``(n,)``."""
    cfg = DATASETS[name]
    path = resolve_data_dir(data_dir) / cfg.folder / "data.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the data of {name!r} are missing from the UCI folder.")
    data = np.loadtxt(path, ndmin=2)
    target = cfg.target_col % data.shape[1]
    cols = (
        cfg.feature_cols
        if cfg.feature_cols is not None
        else tuple(c for c in range(data.shape[1]) if c != target)
    )
    return data[:, list(cols)], data[:, target]


def make_splits(n: int, n_splits: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The paper's train/test splits: ``np.random.seed(1)``, then one ``np.random.choice`` permutation each.

    Note that this reseeds numpy's global RNG (as the authors' code does).
    """
    np.random.seed(SPLIT_SEED)
    n_train = int(round(TRAIN_FRACTION * n))
    splits = []
    for _ in range(n_splits):
        perm = np.random.choice(range(n), n, replace=False)
        splits.append((perm[:n_train], perm[n_train:]))
    return splits


@dataclass
class Standardised:
    """One split, standardised with its training statistics."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray  # original units (it is only scored, never fed to the network)
    mean_x: np.ndarray
    std_x: np.ndarray
    mean_y: float
    std_y: float


def standardise(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
) -> Standardised:
    """Standardise inputs and target with the training split's mean and std (ddof 0; std 0 -> 1)."""
    mean_x = x_train.mean(0)
    std_x = x_train.std(0)
    std_x = np.where(std_x == 0, 1.0, std_x)
    mean_y = float(y_train.mean())
    std_y = float(y_train.std())
    std_y = std_y if std_y > 0 else 1.0
    return Standardised(
        x_train=(x_train - mean_x) / std_x,
        y_train=(y_train - mean_y) / std_y,
        x_test=(x_test - mean_x) / std_x,
        y_test=y_test,
        mean_x=mean_x,
        std_x=std_x,
        mean_y=mean_y,
        std_y=std_y,
    )


def weight_decay(p: float, tau: float, lengthscale: float, n_train: int) -> float:
    """Keras ``l2`` coefficient of the paper: ``reg = l**2 * (1 - p) / (2 * N * tau)``."""
    return lengthscale**2 * (1.0 - p) / (2.0 * n_train * tau)


# ------------------------------------------------------------------------------------------- network
class SplitMLPs(nn.Module):
    """S independent copies of the paper's network, one per split, evaluated in one batched pass.

    ``forward`` takes ``(S, batch, d)`` and returns ``(S, batch, 1)``: row block s goes through network s
    only. The dropout layers are elementwise, so every split draws its own masks.
    """

    def __init__(self, n_splits: int, d_in: int, n_hidden: int, p: float) -> None:
        super().__init__()
        self.p = p
        self.drop_in = Dropout(p)
        self.drop_hidden = Dropout(p)
        self.w1 = nn.Parameter(_glorot_uniform(n_splits, d_in, n_hidden))
        self.b1 = nn.Parameter(torch.zeros(n_splits, 1, n_hidden))
        self.w2 = nn.Parameter(_glorot_uniform(n_splits, n_hidden, 1))
        self.b2 = nn.Parameter(torch.zeros(n_splits, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(torch.baddbmm(self.b1, self.drop_in(x), self.w1))
        return torch.baddbmm(self.b2, self.drop_hidden(hidden), self.w2)

    def weight_penalty(self) -> torch.Tensor:
        """``sum(W**2)`` over the weight matrices of all splits (biases are not regularised)."""
        return self.w1.square().sum() + self.w2.square().sum()

    def network(self, split: int) -> nn.Sequential:
        """Split ``split``'s network as a plain ``nn.Sequential`` (a copy, in eval mode)."""
        d_in, n_hidden = self.w1.shape[1:]
        net = nn.Sequential(
            Dropout(self.p), nn.Linear(d_in, n_hidden), nn.ReLU(), Dropout(self.p), nn.Linear(n_hidden, 1)
        )
        with torch.no_grad():
            net[1].weight.copy_(self.w1[split].T)
            net[1].bias.copy_(self.b1[split, 0])
            net[4].weight.copy_(self.w2[split].T)
            net[4].bias.copy_(self.b2[split, 0])
        return net.eval()


def _glorot_uniform(n: int, fan_in: int, fan_out: int) -> torch.Tensor:
    """Keras' default initialisation: U(-b, b) with ``b = sqrt(6 / (fan_in + fan_out))``."""
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return torch.empty(n, fan_in, fan_out).uniform_(-bound, bound)


def _adam(params: Iterable[nn.Parameter]) -> torch.optim.Adam:
    """Adam with Keras' defaults (lr 1e-3, betas 0.9/0.999, eps 1e-8); the fused kernel where available."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8, fused=True)
    except (RuntimeError, TypeError, ValueError):  # torch without fused CPU Adam: same algorithm, slower
        return torch.optim.Adam(params, lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8)


def train_split_networks(
    x_train: torch.Tensor, y_train: torch.Tensor, cfg: UCIConfig, epochs: int, log_every: int = 0
) -> SplitMLPs:
    """Train one network per split, all at once (see the module docstring).

    Args:
        x_train: Standardised training inputs of every split, ``(S, N, d)`` float32.
        y_train: Standardised training targets, ``(S, N, 1)``.
        cfg: The set's configuration (p, tau, length-scale, hidden units).
        epochs: Passes over the training data.
        log_every: Print the mean training loss every this many epochs (0: never).

    Returns:
        The trained :class:`SplitMLPs`, in eval mode. Uses (and advances) torch's global RNG.
    """
    n_splits, n_train, d_in = x_train.shape
    model = SplitMLPs(n_splits, d_in, cfg.n_hidden, cfg.p)
    reg = weight_decay(cfg.p, cfg.tau, cfg.lengthscale, n_train)
    optimiser = _adam(model.parameters())
    model.train()
    for epoch in range(epochs):
        # Every split reshuffles its own rows; a Keras-style last batch may be smaller than 32.
        perm = torch.argsort(torch.rand(n_splits, n_train), dim=1)
        xs = torch.gather(x_train, 1, perm.unsqueeze(-1).expand(-1, -1, d_in))
        ys = torch.gather(y_train, 1, perm.unsqueeze(-1))
        total = 0.0
        for start in range(0, n_train, BATCH_SIZE):
            xb, yb = xs[:, start : start + BATCH_SIZE], ys[:, start : start + BATCH_SIZE]
            mse = (model(xb) - yb).square().mean(dim=(1, 2))  # (S,): each split's own batch MSE
            loss = mse.sum() + reg * model.weight_penalty()  # sum of the S independent losses
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if log_every:
                total += float(loss) * yb.shape[1]
        if log_every and (epoch + 1) % log_every == 0:
            print(f"    epoch {epoch + 1}: loss per split {total / n_train / n_splits:.4f}", flush=True)
    return model.eval()


# ---------------------------------------------------------------------------------------- evaluation
def mc_test_metrics(
    samples_std: torch.Tensor, y_test: np.ndarray | torch.Tensor, mean_y: float, std_y: float, tau: float
) -> tuple[float, float]:
    """Test RMSE of the MC mean and MC test log-likelihood, in original units (the authors' convention).

    Args:
        samples_std: MC samples of the standardised prediction, ``(T, n, 1)``.
        y_test: Test targets in original units, ``(n,)``.
        mean_y: Training-split target mean.
        std_y: Training-split target std.
        tau: The set's model precision, applied to the original-unit squared error.

    Returns:
        ``(rmse, test_ll)``.
    """
    yhat = samples_std.double() * std_y + mean_y  # (T, n, 1) in original units
    y = torch.as_tensor(np.asarray(y_test), dtype=torch.float64).reshape(-1, 1)
    rmse = float((yhat.mean(0) - y).square().mean().sqrt())
    return rmse, mc_log_likelihood(yhat, y, tau)


def evaluate_split(
    net: nn.Module, split: Standardised, tau: float, n_samples: int, seed: int
) -> tuple[float, float]:
    """T stochastic passes over the test split with ``mcdrop.MCDropout``; returns ``(rmse, test_ll)``."""
    mc = mcdrop.MCDropout(
        net,
        n_samples=n_samples,
        task="regression",
        seed=seed,
        keep_samples=True,
        max_batch_size=MC_BATCH_ROWS,
    )
    pred = mc.predict(torch.as_tensor(split.x_test, dtype=torch.float32))
    assert pred.samples is not None
    return mc_test_metrics(pred.samples, split.y_test, split.mean_y, split.std_y, tau)


def run_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    n_splits: int | None = None,
    epochs: int | None = None,
    n_samples: int = 10000,
    seed: int = 0,
    log_every: int = 0,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Run the protocol on one set.

    Returns:
        The per-split results (columns ``dataset, split, n_train, n_test, rmse, test_ll``) and the
        timings ``{"train_seconds", "test_seconds"}``.
    """
    cfg = DATASETS[name]
    n_splits = cfg.n_splits if n_splits is None else n_splits
    epochs = cfg.epochs if epochs is None else epochs
    x, y = load_dataset(name, data_dir)
    splits = [standardise(x[tr], y[tr], x[te], y[te]) for tr, te in make_splits(len(y), n_splits)]
    x_train = torch.as_tensor(np.stack([s.x_train for s in splits]), dtype=torch.float32)
    y_train = torch.as_tensor(np.stack([s.y_train for s in splits]), dtype=torch.float32).unsqueeze(-1)

    torch.manual_seed(seed + list(DATASETS).index(name))
    start = time.perf_counter()
    model = train_split_networks(x_train, y_train, cfg, epochs, log_every=log_every)
    train_seconds = time.perf_counter() - start

    rows = []
    start = time.perf_counter()
    for i, split in enumerate(splits):
        rmse, ll = evaluate_split(model.network(i), split, cfg.tau, n_samples, seed=seed * 1000 + i)
        rows.append(
            {
                "dataset": name,
                "split": i,
                "n_train": len(split.y_train),
                "n_test": len(split.y_test),
                "rmse": rmse,
                "test_ll": ll,
            }
        )
    test_seconds = time.perf_counter() - start
    return pd.DataFrame(rows), {"train_seconds": train_seconds, "test_seconds": test_seconds}


def mean_se(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and standard error ``std / sqrt(n)`` (ddof 0, as in the paper's tables)."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std() / math.sqrt(len(arr)))


def summarise(
    name: str, per_split: pd.DataFrame, epochs: int, n_samples: int, timings: dict[str, float]
) -> dict[str, object]:
    """One summary row: ours vs the paper, with the difference in combined standard errors."""
    cfg = DATASETS[name]
    row: dict[str, object] = {
        "dataset": name,
        "splits": len(per_split),
        "epochs": epochs,
        "samples": n_samples,
        "full_protocol": len(per_split) == cfg.n_splits and epochs == cfg.epochs and n_samples == 10000,
    }
    for ours_key, paper, out in (("rmse", cfg.paper_rmse, "rmse"), ("test_ll", cfg.paper_ll, "test_ll")):
        mean, se = mean_se(per_split[ours_key])
        diff = (mean - paper[0]) / math.sqrt(se**2 + paper[1] ** 2)
        row.update(
            {
                out: mean,
                f"{out}_se": se,
                f"paper_{out}": paper[0],
                f"paper_{out}_se": paper[1],
                f"{out}_diff_se": diff,
                f"{out}_within_2se": bool(abs(diff) <= 2.0),
            }
        )
    row.update(timings)
    return row


def format_dataset_table(row: dict[str, object]) -> str:
    """The per-set table printed after each set: ours and the paper's, side by side."""
    note = "" if row["full_protocol"] else "  [NOT the full protocol: indicative only]"
    lines = [
        f"{row['dataset']}: {row['splits']} splits, {row['epochs']} epochs, T={row['samples']}; "
        f"train {row['train_seconds']:.0f} s, test {row['test_seconds']:.0f} s{note}",
        f"  {'metric':<8} {'ours':>20} {'paper':>20} {'diff/SE':>8}  verdict",
    ]
    for label, key in (("RMSE", "rmse"), ("test LL", "test_ll")):
        # Four decimals, six for small values (naval's RMSE is 0.0055 ± 0.0001).
        digits = 4 if abs(float(row[f"paper_{key}"])) >= 0.1 else 6  # type: ignore[arg-type]
        ours = f"{row[key]:.{digits}f} ± {row[f'{key}_se']:.{digits}f}"
        paper = f"{row[f'paper_{key}']:.{digits}f} ± {row[f'paper_{key}_se']:.{digits}f}"
        verdict = "within 2 SE" if row[f"{key}_within_2se"] else "NOT within 2 SE"
        lines.append(f"  {label:<8} {ours:>20} {paper:>20} {row[f'{key}_diff_se']:>+8.2f}  {verdict}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=list(DATASETS),
        choices=list(DATASETS),
        metavar="NAME",
        help=f"sets to run (default: all seven: {', '.join(DATASETS)})",
    )
    parser.add_argument("--splits", type=int, default=None, help="splits per set (default 20, protein 5)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default 400, protein 200)")
    parser.add_argument("--samples", type=int, default=None, help="MC test passes T (default 10000)")
    parser.add_argument("--quick", action="store_true", help="smoke mode: 2 splits, 20 epochs, T=100")
    parser.add_argument("--seed", type=int, default=0, help="torch seed for training and MC passes")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--data-dir", default=None, help=f"UCI data folder (default {DEFAULT_DATA_DIR})")
    parser.add_argument(
        "--out", default=None, help="write the summary CSV here (per split: <out>_splits.csv)"
    )
    parser.add_argument("--log-every", type=int, default=0, help="print the training loss every K epochs")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    """Run the selected sets, print a table per set and a summary; return the summary frame."""
    args = parse_args(argv)
    try:
        data_dir = resolve_data_dir(args.data_dir)
    except FileNotFoundError as err:
        sys.exit(f"error: {err}")
    torch.set_num_threads(args.threads)
    quick = (2, 20, 100) if args.quick else (None, None, 10000)
    n_splits = args.splits if args.splits is not None else quick[0]
    n_samples = args.samples if args.samples is not None else quick[2]

    summaries, per_split_frames = [], []
    for name in args.datasets:
        epochs = args.epochs if args.epochs is not None else (quick[1] or DATASETS[name].epochs)
        per_split, timings = run_dataset(
            name,
            data_dir=data_dir,
            n_splits=n_splits,
            epochs=epochs,
            n_samples=n_samples,
            seed=args.seed,
            log_every=args.log_every,
        )
        row = summarise(name, per_split, epochs, n_samples, timings)
        print(format_dataset_table(row), flush=True)
        summaries.append(row)
        per_split_frames.append(per_split)
        summary = pd.DataFrame(summaries, columns=SUMMARY_COLUMNS)
        if args.out:  # rewritten after every set, so a long run leaves partial results behind
            out = Path(args.out)
            summary.to_csv(out, index=False)
            pd.concat(per_split_frames).to_csv(out.with_name(out.stem + "_splits.csv"), index=False)

    summary = pd.DataFrame(summaries, columns=SUMMARY_COLUMNS)
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print("\nSummary:")
        print(
            summary[
                [
                    "dataset",
                    "splits",
                    "epochs",
                    "samples",
                    "rmse",
                    "rmse_se",
                    "rmse_diff_se",
                    "test_ll",
                    "test_ll_se",
                    "test_ll_diff_se",
                    "train_seconds",
                    "test_seconds",
                ]
            ].to_string(index=False, float_format=lambda v: f"{v:.6g}")
        )
    return summary


if __name__ == "__main__":
    main()
