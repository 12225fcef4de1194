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
* Report: mean +- standard error over splits (``std / sqrt(n_splits)``, ddof 0), beside the paper's.
  The paper's numbers are computed from ``<set>/paper_splits.csv``, the authors' own per-split results
  (nothing is typed in; a set without that file gets no comparison). Two comparisons:

  - unpaired: the difference in units of the combined standard error ``sqrt(se_ours**2 +
    se_paper**2)`` and a "within 2 SE" verdict;
  - paired: the split procedure regenerates the authors' split files exactly (the data README says
    so), so split i of ours and of the paper have the same train/test rows. Per split ``d_i = ours_i - paper_i``; reported are the
    mean of d ± its standard error ``std(d, ddof=1) / sqrt(n)``, the paired t statistic ``mean / SE``
    with its two-sided p-value (Student t, n - 1 degrees of freedom, computed here through the
    regularized incomplete beta function so that scipy is not needed), and the Pearson correlation
    of the per-split values. A run with fewer splits pairs its splits with the paper's first ones.

All splits of one set have the same number of training rows, so the S networks of the S splits are
trained together as one batched network (weights of shape ``(S, in, out)``, ``torch.baddbmm``). Every
split still has its own data, standardisation, shuffling, dropout masks and Adam state: the loss is the
sum of the per-split losses and Adam is element-wise, so each split's network gets exactly the updates
it would get if it were trained alone; batching only removes Python overhead. For testing, each split's
network is copied into a plain ``nn.Sequential`` and evaluated with ``mcdrop.MCDropout``.

Run from the repository root (mcdrop need not be installed)::

    PYTHONPATH=. python examples/uci_gal2016.py --quick                       # smoke run, ~1 min
    nice -n 19 env PYTHONPATH=. python examples/uci_gal2016.py --threads 1 \
        --out uci_results.csv                                                   # full protocol, all seven
    PYTHONPATH=. python examples/uci_gal2016.py --data-file my.csv --target y --p 0.05 --tau 10

Options: ``--datasets`` (default: all seven), ``--splits`` (default 20, protein 5), ``--epochs``
(default 400, protein 200), ``--samples`` (T, default 10000), ``--quick`` (2 splits, 20 epochs,
T=100), ``--seed``, ``--threads``, ``--data-dir`` (default ``<repo>/../shared/data/uci``), ``--out``
(a CSV of the summary; the per-split values go to ``<out>_splits.csv``). Runs are reproducible: the
splits come from ``np.random.seed(1)``, initialisation, shuffling and training dropout from
``torch.manual_seed(seed + dataset index)``, and the MC passes from ``MCDropout(seed=...)``.

Your own data: ``--data-file PATH`` runs the same protocol (splits, standardisation, network, training,
T passes, metrics) on any regression file, comma-, semicolon- or whitespace-separated, header optional
(see :func:`read_data_file`), with ``--target`` (column index, default -1, or header name),
``--features`` (default: every other column), ``--p`` and ``--tau`` (both required: the paper tuned
them per set, and tau is in the target's units), ``--length-scale`` (default 1e-2), ``--hidden``
(default 50), and ``--splits``/``--epochs``/``--samples`` (default 20/400/10000). There is no paper
comparison for such a file. A file or option that cannot be used stops the script before any training
with a one-line ``uci_gal2016.py: error: ...`` on stderr and exit status 2.
Results and timings are in ``docs/uci.md``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

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
    """One data set: where its data are and its fixed hyper-parameters (the paper's, or a user's)."""

    folder: str
    p: float
    tau: float
    lengthscale: float = 1e-2
    n_hidden: int = 50
    epochs: int = 400
    n_splits: int = 20
    target_col: int = -1
    feature_cols: tuple[int, ...] | None = None  # None: every column except the target


# The paper's numbers are not typed in here: they are computed from each set's paper_splits.csv (the
# authors' per-split results; see load_paper_splits). A set without that file gets no paper comparison.
DATASETS: dict[str, UCIConfig] = {
    "yacht": UCIConfig("yacht", 0.01, 0.541869562034, lengthscale=1e-1),
    "energy": UCIConfig("energy", 0.05, 0.427114830213),
    "wine-quality-red": UCIConfig("wine-quality-red", 0.05, 2.95833720839),
    "kin8nm": UCIConfig("kin8nm", 0.05, 192.482910156),
    "power-plant": UCIConfig("power-plant", 0.005, 0.0871109017617),
    "naval-propulsion-plant": UCIConfig(
        "naval-propulsion-plant",
        0.05,
        42173.5152106,
        lengthscale=1.0,
        target_col=16,
        feature_cols=tuple(range(16)),
    ),
    "protein-tertiary-structure": UCIConfig(
        "protein-tertiary-structure", 0.005, 0.0644419184588, n_hidden=100, epochs=200, n_splits=5
    ),
}

PAPER_SPLITS_FILE = "paper_splits.csv"
PAPER_COLUMNS = {"test_mc_rmse": "rmse", "test_ll": "test_ll"}  # paper_splits.csv column -> ours
METRICS = (("RMSE", "rmse"), ("test LL", "test_ll"))
MIN_ROWS = 10  # a --data-file needs this many rows: 90 % train and at least one test row per split

SUMMARY_COLUMNS = [
    "dataset",
    "splits",
    "epochs",
    "samples",
    "full_protocol",
    "paper_splits",  # splits in paper_splits.csv (0: no paper comparison)
    "paired_splits",  # splits compared pairwise (same split index, hence the same train/test rows)
]
for _key in ("rmse", "test_ll"):
    SUMMARY_COLUMNS += [
        _key,
        f"{_key}_se",
        f"paper_{_key}",
        f"paper_{_key}_se",
        f"{_key}_diff_se",  # unpaired: (ours - paper) / sqrt(se_ours**2 + se_paper**2)
        f"{_key}_within_2se",
        f"{_key}_paired_diff",  # paired: mean over splits of (ours - paper)
        f"{_key}_paired_diff_se",  # its standard error (ddof 1, the one the t statistic uses)
        f"{_key}_paired_t",
        f"{_key}_paired_p",  # two-sided, Student t with paired_splits - 1 degrees of freedom
        f"{_key}_split_corr",  # Pearson correlation of ours and the paper's over the paired splits
    ]
SUMMARY_COLUMNS += ["train_seconds", "test_seconds"]


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


class DataFileError(ValueError):
    """A data file (``--data-file`` or a ``paper_splits.csv``) that cannot be used; the message is one line."""


def load_paper_splits(name: str, data_dir: str | Path | None = None) -> pd.DataFrame | None:
    """The authors' per-split results of one set, or ``None`` when its ``paper_splits.csv`` is absent.

    Returns:
        A frame with columns ``split, rmse, test_ll`` (from ``split, test_mc_rmse, test_ll``), one row
        per split in split order ``0, 1, ...``. Raises :class:`DataFileError` for a malformed file.
    """
    path = resolve_data_dir(data_dir) / DATASETS[name].folder / PAPER_SPLITS_FILE
    if not path.is_file():
        return None
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise DataFileError(f"cannot read {path}: {_one_line(err)}") from err
    missing = [c for c in ("split", *PAPER_COLUMNS) if c not in table.columns]
    if missing:
        raise DataFileError(
            f"{path}: missing column(s) {', '.join(missing)} (expected split, test_mc_rmse, test_ll)"
        )
    table = table[["split", *PAPER_COLUMNS]].rename(columns=PAPER_COLUMNS)
    values = table.apply(pd.to_numeric, errors="coerce")
    if values.isna().any().any() or not np.isfinite(values.to_numpy(dtype=float)).all():
        raise DataFileError(f"{path}: non-numeric or non-finite values")
    if values["split"].tolist() != list(range(len(values))):
        raise DataFileError(f"{path}: the splits must be numbered 0, 1, ... in order")
    return values.astype({"split": int})


def _one_line(err: BaseException) -> str:
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return " ".join(str(text).split())


def _parse_float(field: str) -> float | None:
    try:
        value = float(field)
    except ValueError:
        return None
    return value


def read_data_file(
    path: str | Path, target: str = "-1", features: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read a regression data file for ``--data-file``: ``(X, y, column_names)``.

    The file holds one row per example and one column per variable, separated by commas, semicolons
    or whitespace (the first non-blank line decides: a comma makes it comma-separated, else a
    semicolon, else whitespace; quoted CSV fields are allowed). Blank lines and lines starting with
    ``#`` are skipped. The first row is a header when one of its fields is not a number. Every other
    value must be a finite number: missing values are not supported.

    Args:
        path: The file.
        target: The target column: an index (``-1``: the last; negative indices count from the end)
            or, for a file with a header, a column name. A string that parses as an integer is an index.
        features: The input columns (indices or names); ``None``: every column except the target.

    Returns:
        The inputs ``(n, d)`` and target ``(n,)`` as float64 arrays, and the names of the columns of
        ``X`` (the header's, or ``col<i>`` without one). Raises :class:`DataFileError` with a one-line
        message for a file that cannot be read or used.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DataFileError(f"cannot read {path}: {_one_line(err)}") from err
    lines = [
        (number, line.strip())
        for number, line in enumerate(text.splitlines(), 1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not lines:
        raise DataFileError(f"{path}: the file has no data rows")
    first = lines[0][1]
    delimiter = "," if "," in first else ";" if ";" in first else None
    if delimiter is None:
        rows = [(number, line.split()) for number, line in lines]
    else:
        parsed = csv.reader((line for _, line in lines), delimiter=delimiter, skipinitialspace=True)
        try:
            rows = [
                (number, [f.strip() for f in fields])
                for (number, _), fields in zip(lines, parsed, strict=True)
            ]
        except (csv.Error, ValueError) as err:  # ValueError: a quoted field spanning lines
            raise DataFileError(f"cannot parse {path}: {_one_line(err)}") from err

    header: list[str] | None = None
    if any(_parse_float(field) is None for field in rows[0][1]):
        header = rows[0][1]
        rows = rows[1:]
    n_cols = len(header) if header is not None else len(rows[0][1]) if rows else 0
    names = header if header is not None else [f"col{i}" for i in range(n_cols)]
    if n_cols < 2:
        raise DataFileError(f"{path}: {n_cols} column(s); need a target and at least one input column")
    data = np.empty((len(rows), n_cols))
    for i, (number, fields) in enumerate(rows):
        if len(fields) != n_cols:
            raise DataFileError(f"{path}, line {number}: {len(fields)} fields, expected {n_cols}")
        for j, field in enumerate(fields):
            value = _parse_float(field)
            if value is None or not math.isfinite(value):
                what = "an empty field" if not field else f"{field!r} is not a finite number"
                raise DataFileError(
                    f"{path}, line {number}, column {j} ({names[j]}): {what} (missing values are not supported)"
                )
            data[i, j] = value
    if len(data) < MIN_ROWS:
        raise DataFileError(
            f"{path}: {len(data)} data row(s); the protocol needs at least {MIN_ROWS} "
            f"(a 90 % / 10 % train/test split with a few rows in each)"
        )

    def column(spec: str, option: str) -> int:
        spec = str(spec).strip()
        try:
            index = int(spec)
        except ValueError:
            if header is None:
                raise DataFileError(
                    f"{option} {spec!r} is a column name but {path} has no header row; give a column index"
                ) from None
            matches = [i for i, name in enumerate(header) if name == spec]
            if len(matches) != 1:
                problem = "no such column" if not matches else "several columns have this name"
                raise DataFileError(
                    f"{option} {spec!r}: {problem} in {path} (columns: {', '.join(header)})"
                ) from None
            return matches[0]
        if not -n_cols <= index < n_cols:
            raise DataFileError(f"{option} {index}: no such column in {path}, which has {n_cols} columns")
        return index % n_cols

    target_col = column(target, "--target")
    if features is None:
        feature_cols = [c for c in range(n_cols) if c != target_col]
    else:
        feature_cols = [column(spec, "--features") for spec in features]
        if target_col in feature_cols:
            raise DataFileError(f"--features includes the target column {names[target_col]!r}")
        if len(set(feature_cols)) != len(feature_cols):
            raise DataFileError("--features names a column twice")
    return data[:, feature_cols], data[:, target_col], [names[c] for c in feature_cols]


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


def run_protocol(
    x: np.ndarray,
    y: np.ndarray,
    cfg: UCIConfig,
    *,
    name: str,
    n_splits: int,
    epochs: int,
    n_samples: int,
    seed: int,
    torch_seed: int,
    log_every: int = 0,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Run the protocol on inputs ``x`` ``(n, d)`` and target ``y`` ``(n,)`` with ``cfg``'s p, tau, l, hidden.

    Returns:
        The per-split results (columns ``dataset, split, n_train, n_test, rmse, test_ll``) and the
        timings ``{"train_seconds", "test_seconds"}``.
    """
    splits = [standardise(x[tr], y[tr], x[te], y[te]) for tr, te in make_splits(len(y), n_splits)]
    x_train = torch.as_tensor(np.stack([s.x_train for s in splits]), dtype=torch.float32)
    y_train = torch.as_tensor(np.stack([s.y_train for s in splits]), dtype=torch.float32).unsqueeze(-1)

    torch.manual_seed(torch_seed)
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
    """Run the protocol on one of the seven sets (see :func:`run_protocol` for what it returns).

    Returns:
        The per-split results and the timings.
    """
    cfg = DATASETS[name]
    x, y = load_dataset(name, data_dir)
    return run_protocol(
        x,
        y,
        cfg,
        name=name,
        n_splits=cfg.n_splits if n_splits is None else n_splits,
        epochs=cfg.epochs if epochs is None else epochs,
        n_samples=n_samples,
        seed=seed,
        torch_seed=seed + list(DATASETS).index(name),
        log_every=log_every,
    )


# ---------------------------------------------------------------------------------------- statistics
def mean_se(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and standard error ``std / sqrt(n)`` (ddof 0, as in the paper's tables)."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std() / math.sqrt(len(arr)))


_BETACF_EPS = 1e-15
_BETACF_TINY = 1e-300
_BETACF_MAX_TERMS = 10000


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of ``I_x(a, b)`` (Numerical Recipes, 3rd ed., section 6.4), modified Lentz.

    ``I_x(a, b) = x**a (1-x)**b / (a B(a, b)) * 1 / (1 + d1 / (1 + d2 / (1 + ...)))`` with
    ``d_{2m+1} = -(a+m)(a+b+m) x / ((a+2m)(a+2m+1))`` and ``d_{2m} = m(b-m) x / ((a+2m-1)(a+2m))``;
    it converges fast for ``x < (a+1)/(a+b+2)``. Returns the fraction (without the prefactor).
    """
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _BETACF_TINY else _BETACF_TINY)
    h = d
    for m in range(1, _BETACF_MAX_TERMS + 1):
        m2 = 2 * m
        for aa in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > _BETACF_TINY else _BETACF_TINY)
            c = 1.0 + aa / c
            c = c if abs(c) > _BETACF_TINY else _BETACF_TINY
            h *= d * c
        if abs(d * c - 1.0) < _BETACF_EPS:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """``I_x(a, b)``, the regularized incomplete beta function (the CDF of a Beta(a, b) variable at x).

    Computed with the continued fraction of :func:`_beta_continued_fraction`, directly for
    ``x < (a+1)/(a+b+2)`` and through the symmetry ``I_x(a, b) = 1 - I_{1-x}(b, a)`` otherwise (where
    the fraction converges fast). Near machine precision for moderate a and b (see student_t_two_sided_p).

    Returns:
        ``I_x(a, b)`` in ``[0, 1]``.
    """
    if not (a > 0 and b > 0) or math.isnan(x):
        raise ValueError(f"regularized_incomplete_beta needs a, b > 0 and 0 <= x <= 1 (got {a}, {b}, {x})")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def student_t_two_sided_p(t: float, df: float) -> float:
    """Two-sided p-value ``P(|T| >= |t|)`` of Student's t with ``df`` degrees of freedom.

    Uses ``P(|T| >= |t|) = I_{df / (df + t**2)}(df / 2, 1 / 2)`` (Abramowitz & Stegun 26.7.1 with
    26.5.27) and :func:`regularized_incomplete_beta`, so that scipy is not needed (it is not one of
    mcdrop's dependencies). Checked in ``tests/test_example_uci.py`` against the closed forms for
    df = 1 (Cauchy), 2 and 3, against t tables, and against scipy where it is installed. Relative error
    below 1e-12 up to df = 1000 (about 1e-9 at df = 1e6, where ``lgamma(a + b) - lgamma(a)`` cancels).

    Returns:
        The p-value (NaN for a NaN ``t`` or ``df <= 0``).
    """
    if math.isnan(t) or not df > 0:
        return math.nan
    if math.isinf(t):
        return 0.0
    return regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


@dataclass(frozen=True)
class PairedComparison:
    """The paired comparison of two series of per-split results, split i against split i.

    Attributes:
        n: Number of pairs.
        mean_diff: Mean of ``ours - paper``.
        se: Its standard error, ``std(diff, ddof=1) / sqrt(n)`` (the paired t-test's).
        t: ``mean_diff / se``.
        p: Two-sided p-value of ``t`` under Student's t with ``n - 1`` degrees of freedom.
        corr: Pearson correlation of the two series (how much split-to-split spread they share).
    """

    n: int
    mean_diff: float
    se: float
    t: float
    p: float
    corr: float


def paired_comparison(
    ours: Sequence[float] | np.ndarray, paper: Sequence[float] | np.ndarray
) -> PairedComparison:
    """Paired t-test of ``ours - paper`` (same split index: same train/test rows) and their correlation.

    With fewer than 2 pairs the standard error, t, p and correlation are NaN; with identical
    differences (SE 0) t is 0 (all differences 0) or infinite, and the correlation of a constant
    series is NaN.

    Returns:
        A :class:`PairedComparison`.
    """
    a = np.asarray(ours, dtype=float)
    b = np.asarray(paper, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_comparison needs two 1-d series of one length (got {a.shape}, {b.shape})")
    n = len(a)
    if n == 0:
        return PairedComparison(0, math.nan, math.nan, math.nan, math.nan, math.nan)
    diff = a - b
    mean_diff = float(diff.mean())
    if n < 2:
        return PairedComparison(n, mean_diff, math.nan, math.nan, math.nan, math.nan)
    se = float(diff.std(ddof=1) / math.sqrt(n))
    if se > 0:
        t = mean_diff / se
    else:
        t = 0.0 if mean_diff == 0 else math.copysign(math.inf, mean_diff)
    da, db = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((da * da).sum()) * float((db * db).sum()))
    corr = float((da * db).sum()) / denom if denom > 0 else math.nan
    return PairedComparison(n, mean_diff, se, t, student_t_two_sided_p(t, n - 1), corr)


def summarise(
    name: str,
    per_split: pd.DataFrame,
    epochs: int,
    n_samples: int,
    timings: dict[str, float],
    paper: pd.DataFrame | None = None,
    cfg: UCIConfig | None = None,
) -> dict[str, object]:
    """One summary row: ours, the paper's (from its per-split results), unpaired and paired comparisons.

    Args:
        name: The set's name.
        per_split: Our per-split results (:func:`run_protocol`).
        epochs: Epochs trained.
        n_samples: MC passes T.
        timings: ``{"train_seconds", "test_seconds"}``.
        paper: The authors' per-split results (:func:`load_paper_splits`); ``None``: no comparison
            (the paper columns are NaN).
        cfg: The set's configuration (default ``DATASETS[name]``), for the ``full_protocol`` flag.

    Returns:
        A dict with the keys of :data:`SUMMARY_COLUMNS`. The paper's mean ± SE is over all its splits
        (ddof 0, as the paper reports); the paired statistics are over the splits both have, matched
        by split index.
    """
    cfg = DATASETS[name] if cfg is None else cfg
    paired = (
        per_split.merge(paper, on="split", suffixes=("", "_paper"))
        if paper is not None
        else pd.DataFrame(columns=["rmse", "rmse_paper", "test_ll", "test_ll_paper"])
    )
    row: dict[str, object] = {
        "dataset": name,
        "splits": len(per_split),
        "epochs": epochs,
        "samples": n_samples,
        "full_protocol": len(per_split) == cfg.n_splits and epochs == cfg.epochs and n_samples == 10000,
        "paper_splits": 0 if paper is None else len(paper),
        "paired_splits": len(paired),
    }
    for _, key in METRICS:
        mean, se = mean_se(per_split[key])
        paper_mean, paper_se = mean_se(paper[key]) if paper is not None else (math.nan, math.nan)
        diff = (mean - paper_mean) / math.sqrt(se**2 + paper_se**2) if paper is not None else math.nan
        test = paired_comparison(paired[key].to_numpy(float), paired[f"{key}_paper"].to_numpy(float))
        row.update(
            {
                key: mean,
                f"{key}_se": se,
                f"paper_{key}": paper_mean,
                f"paper_{key}_se": paper_se,
                f"{key}_diff_se": diff,
                f"{key}_within_2se": bool(abs(diff) <= 2.0) if paper is not None else math.nan,
                f"{key}_paired_diff": test.mean_diff,
                f"{key}_paired_diff_se": test.se,
                f"{key}_paired_t": test.t,
                f"{key}_paired_p": test.p,
                f"{key}_split_corr": test.corr,
            }
        )
    row.update(timings)
    return row


def _digits(*values: object) -> int:
    """Four decimals, six for small values (naval's RMSE is about 0.0055)."""
    finite = [abs(float(v)) for v in values if isinstance(v, (int, float)) and math.isfinite(float(v))]
    return 4 if not finite or max(finite) >= 0.1 else 6


def format_dataset_table(row: dict[str, object]) -> str:
    """The per-set table printed after each set: ours and the paper's, unpaired and paired."""
    note = "" if row["full_protocol"] else "  [NOT the full protocol: indicative only]"
    lines = [
        f"{row['dataset']}: {row['splits']} splits, {row['epochs']} epochs, T={row['samples']}; "
        f"train {row['train_seconds']:.0f} s, test {row['test_seconds']:.0f} s{note}",
    ]
    if not row["paper_splits"]:
        lines.append(f"  {'metric':<8} {'ours (mean ± SE)':>22}   (no paper comparison)")
        for label, key in METRICS:
            digits = _digits(row[key])
            lines.append(f"  {label:<8} {row[key]:>{12}.{digits}f} ± {row[f'{key}_se']:.{digits}f}")
        return "\n".join(lines)
    lines.append(f"  {'metric':<8} {'ours':>20} {'paper':>20} {'diff/SE':>8}  verdict (unpaired)")
    for label, key in METRICS:
        digits = _digits(row[f"paper_{key}"])
        ours = f"{row[key]:.{digits}f} ± {row[f'{key}_se']:.{digits}f}"
        paper = f"{row[f'paper_{key}']:.{digits}f} ± {row[f'paper_{key}_se']:.{digits}f}"
        verdict = "within 2 SE" if row[f"{key}_within_2se"] else "NOT within 2 SE"
        lines.append(f"  {label:<8} {ours:>20} {paper:>20} {row[f'{key}_diff_se']:>+8.2f}  {verdict}")
    n = row["paired_splits"]
    lines.append(f"  paired, split by split ({n} of the paper's {row['paper_splits']} splits; ours - paper):")
    lines.append(f"  {'metric':<8} {'mean diff ± SE':>22} {'t':>7} {'p':>8} {'corr':>6}  verdict")
    for label, key in METRICS:
        digits = _digits(row[f"paper_{key}"])
        diff = f"{row[f'{key}_paired_diff']:+.{digits}f} ± {row[f'{key}_paired_diff_se']:.{digits}f}"
        p = float(row[f"{key}_paired_p"])  # type: ignore[arg-type]
        verdict = (
            "too few splits"
            if math.isnan(p)
            else "differs (p < 0.05)"
            if p < 0.05
            else "no significant difference"
        )
        lines.append(
            f"  {label:<8} {diff:>22} {row[f'{key}_paired_t']:>+7.2f} {p:>8.2g} "
            f"{row[f'{key}_split_corr']:>6.3f}  {verdict}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- CLI
PROG = "uci_gal2016.py"
DATA_FILE_ONLY = ("target", "features", "p", "tau", "length_scale", "hidden")


class CommandLineError(SystemExit):
    """Exit with status 2 after a one-line ``uci_gal2016.py: error: ...`` on stderr (``str()``: the message)."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _fail(message: str) -> NoReturn:
    message = " ".join(message.split())
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise CommandLineError(message)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=None,
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
    own = parser.add_argument_group(
        "your own data (--data-file; the options below apply to it only)",
        "The same protocol on any regression file (comma-, semicolon- or whitespace-separated, header "
        "optional). There is no paper comparison for such a file.",
    )
    own.add_argument("--data-file", default=None, metavar="PATH", help="run the protocol on this file")
    own.add_argument("--target", default=None, help="target column: index (default -1, the last) or name")
    own.add_argument(
        "--features",
        nargs="+",
        default=None,
        metavar="COL",
        help="input columns (default: all but the target)",
    )
    own.add_argument("--p", type=float, default=None, help="dropout rate (required with --data-file)")
    own.add_argument(
        "--tau", type=float, default=None, help="model precision tau (required with --data-file)"
    )
    own.add_argument("--length-scale", type=float, default=None, help="prior length-scale l (default 1e-2)")
    own.add_argument("--hidden", type=int, default=None, help="hidden units (default 50)")
    return parser.parse_args(argv)


def _check_args(args: argparse.Namespace) -> None:
    """Reject inconsistent or out-of-range options with a one-line error (exit status 2)."""
    if args.data_file is None:
        given = [f"--{key.replace('_', '-')}" for key in DATA_FILE_ONLY if getattr(args, key) is not None]
        if given:
            _fail(f"{', '.join(given)} apply only with --data-file (the seven sets have fixed settings)")
    else:
        if args.datasets is not None:
            _fail("--data-file and --datasets cannot be combined")
        if args.p is None or args.tau is None:
            _fail("--data-file needs --p (dropout rate) and --tau (model precision, in the target's units)")
        if not 0.0 <= args.p < 1.0:
            _fail(f"--p {args.p}: the dropout rate must be in [0, 1)")
        for option, value in (("--tau", args.tau), ("--length-scale", args.length_scale)):
            if value is not None and not (math.isfinite(value) and value > 0):
                _fail(f"{option} {value}: must be a positive number")
        if args.hidden is not None and args.hidden < 1:
            _fail(f"--hidden {args.hidden}: must be at least 1")
    for option, value in (("--splits", args.splits), ("--epochs", args.epochs), ("--samples", args.samples)):
        if value is not None and value < 1:
            _fail(f"{option} {value}: must be at least 1")
    if args.threads < 1:
        _fail(f"--threads {args.threads}: must be at least 1")


def _jobs(
    args: argparse.Namespace,
) -> list[tuple[str, UCIConfig, Callable[[], tuple[np.ndarray, np.ndarray]], pd.DataFrame | None, int]]:
    """What to run: ``(name, config, load (x, y), paper per-split results or None, torch seed)`` per set.

    Everything that can fail on the inputs (the data folder, a paper file, a data file) fails here,
    before any training.
    """
    if args.data_file is not None:
        try:
            x, y, _ = read_data_file(
                args.data_file, "-1" if args.target is None else args.target, args.features
            )
        except DataFileError as err:
            _fail(str(err))
        cfg = UCIConfig(
            folder=str(args.data_file),
            p=args.p,
            tau=args.tau,
            lengthscale=1e-2 if args.length_scale is None else args.length_scale,
            n_hidden=50 if args.hidden is None else args.hidden,
        )
        return [(Path(args.data_file).name, cfg, lambda: (x, y), None, args.seed)]
    try:
        data_dir = resolve_data_dir(args.data_dir)
        jobs = []
        for name in args.datasets or list(DATASETS):
            data_file = data_dir / DATASETS[name].folder / "data.txt"
            if not data_file.is_file():
                raise FileNotFoundError(
                    f"{data_file} not found: the data of {name!r} are missing from the UCI folder."
                )
            jobs.append(
                (
                    name,
                    DATASETS[name],
                    functools.partial(load_dataset, name, data_dir),
                    load_paper_splits(name, data_dir),
                    args.seed + list(DATASETS).index(name),
                )
            )
    except (FileNotFoundError, DataFileError) as err:
        _fail(str(err))
    return jobs


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    """Run the selected sets (or ``--data-file``), print a table per set and a summary; return the summary."""
    args = parse_args(argv)
    _check_args(args)
    jobs = _jobs(args)
    torch.set_num_threads(args.threads)
    quick = (2, 20, 100) if args.quick else (None, None, 10000)
    n_samples = args.samples if args.samples is not None else quick[2]

    summaries, per_split_frames = [], []
    for name, cfg, load, paper, torch_seed in jobs:
        n_splits = args.splits if args.splits is not None else (quick[0] or cfg.n_splits)
        epochs = args.epochs if args.epochs is not None else (quick[1] or cfg.epochs)
        if paper is None and args.data_file is None:
            print(f"{name}: no {PAPER_SPLITS_FILE} in its folder: no paper comparison", flush=True)
        x, y = load()
        per_split, timings = run_protocol(
            x,
            y,
            cfg,
            name=name,
            n_splits=n_splits,
            epochs=epochs,
            n_samples=n_samples,
            seed=args.seed,
            torch_seed=torch_seed,
            log_every=args.log_every,
        )
        row = summarise(name, per_split, epochs, n_samples, timings, paper=paper, cfg=cfg)
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
                    "rmse_paired_t",
                    "rmse_paired_p",
                    "test_ll",
                    "test_ll_se",
                    "test_ll_diff_se",
                    "test_ll_paired_t",
                    "test_ll_paired_p",
                    "train_seconds",
                    "test_seconds",
                ]
            ].to_string(index=False, float_format=lambda v: f"{v:.6g}")
        )
    return summary


if __name__ == "__main__":
    main()
