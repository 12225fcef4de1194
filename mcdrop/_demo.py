"""The embedded default job: a dropout MLP trained on scikit-learn's bundled digits (private).

Everything here runs offline in a few seconds on two CPU cores: the data ship with scikit-learn,
the model is small, and training is seeded, so the demo gives the same numbers on every machine
with the same library versions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import mcdrop.nn as mnn


class DigitsMLP(nn.Module):
    """64 → 128 → 128 → 10 MLP with mcdrop dropout after the input and each hidden layer."""

    def __init__(self, p: float = 0.25, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            mnn.Dropout(p / 2),
            nn.Linear(64, hidden),
            nn.ReLU(),
            mnn.Dropout(p),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            mnn.Dropout(p),
            nn.Linear(hidden, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of flattened 8×8 images scaled to [0, 1]."""
        return self.net(x)


@dataclass
class DigitsData:
    """Train/test split of the digits, plus an out-of-distribution set built from the test images."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_ood: torch.Tensor


def load_digits_data(seed: int = 0, test_fraction: float = 0.3) -> DigitsData:
    """Load scikit-learn's digits, split them, and make an OOD set of pixel-shuffled test digits.

    The OOD set permutes the 64 pixels of each test image at random: every image keeps exactly the
    intensity histogram of a real digit, but its shape is no digit any more.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    rng = np.random.default_rng(seed)
    flat_te = x_te.reshape(len(x_te), -1)
    ood = np.stack([row[rng.permutation(row.size)] for row in flat_te])
    flat = lambda a: torch.from_numpy(np.ascontiguousarray(a).reshape(len(a), -1))  # noqa: E731
    return DigitsData(flat(x_tr), torch.from_numpy(y_tr), flat(x_te), torch.from_numpy(y_te), flat(ood))


def train_digits_mlp(data: DigitsData, *, epochs: int = 40, seed: int = 0, p: float = 0.25) -> DigitsMLP:
    """Train :class:`DigitsMLP` with Adam and cross-entropy; returns it in eval mode.

    Runs on one CPU thread: with batches of 64 rows of 64 features, intra-op threads only add
    synchronisation (ten times slower on a busy two-core machine, measured).
    """
    gen = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(data, epochs=epochs, seed=seed, p=p, gen=gen)
    finally:
        torch.set_num_threads(threads)


def _train(data: DigitsData, *, epochs: int, seed: int, p: float, gen: torch.Generator) -> DigitsMLP:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsMLP(p=p)
        opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
        loss_fn = nn.CrossEntropyLoss()
        n = len(data.x_train)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, 64):
                idx = order[start : start + 64]
                opt.zero_grad()
                loss = loss_fn(model(data.x_train[idx]), data.y_train[idx])
                loss.backward()
                opt.step()
    return model.eval()
