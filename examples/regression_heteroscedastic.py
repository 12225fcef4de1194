"""Regression with a heteroscedastic head on scikit-learn's diabetes data: aleatoric vs epistemic.

The network predicts a mean and a log-variance per input and is trained with the Gaussian negative
log-likelihood; MC dropout then separates the two kinds of uncertainty:

* ``pred.variance`` — epistemic: how much the dropout passes disagree about the mean;
* ``pred.aleatoric_variance`` — aleatoric: the noise the model expects in the target;
* ``pred.total_variance`` — their sum (law of total variance), used for the intervals.

Run: ``python examples/regression_heteroscedastic.py [--out DIR]`` (about 20 s on 2 CPU cores).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.datasets import load_diabetes
from sklearn.model_selection import train_test_split
from torch import nn

import mcdrop
from mcdrop import metrics


class HeteroscedasticMLP(nn.Module):
    def __init__(self, d_in: int, hidden: int = 64, p: float = 0.1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(d_in, hidden),
            nn.ReLU(),
            mcdrop.nn.Dropout(p),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            mcdrop.nn.Dropout(p),
        )
        self.head = nn.Linear(hidden, 2)  # mean and log-variance

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_var = self.head(self.body(x)).chunk(2, dim=-1)
        return mean.squeeze(-1), log_var.squeeze(-1)


def main() -> None:
    torch.set_num_threads(1)  # a model this small runs fastest on one thread (no intra-op sync)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the uncertainty report to this folder")
    parser.add_argument(
        "--epochs", type=int, default=40, help="longer training overfits the variance head (watch PICP)"
    )
    args = parser.parse_args()

    torch.manual_seed(0)
    x, y = load_diabetes(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0)
    mu_x, sd_x = x_tr.mean(0), x_tr.std(0)
    mu_y, sd_y = y_tr.mean(), y_tr.std()
    to_t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    xt, yt = to_t((x_tr - mu_x) / sd_x), to_t((y_tr - mu_y) / sd_y)
    xv, yv = to_t((x_te - mu_x) / sd_x), to_t((y_te - mu_y) / sd_y)

    model = HeteroscedasticMLP(x.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    nll = nn.GaussianNLLLoss()
    model.train()
    for _ in range(args.epochs):
        for idx in torch.randperm(len(xt)).split(32):
            mean, log_var = model(xt[idx])
            loss = nll(mean, yt[idx], log_var.exp())
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()

    mc = mcdrop.MCDropout(model, n_samples=200, aleatoric="log_variance", seed=0)
    pred = mc.predict(xv)
    pred.targets = yv
    epi = pred.variance.mean().item()
    ale = pred.aleatoric_variance.mean().item()
    print(f"mean epistemic variance {epi:.4f}, mean aleatoric variance {ale:.4f} (standardised units)")
    print(f"RMSE {metrics.rmse(pred.mean, yv) * sd_y:.2f} (original units)")
    # In original units: the mean and std scale by sd_y (the NLL shifts by log(sd_y)); coverage is unitless.
    y_orig = to_t(y_te)
    mean_orig, std_orig = pred.mean * sd_y + mu_y, pred.total_std * sd_y
    print(f"Gaussian NLL {metrics.gaussian_nll(mean_orig, std_orig, y_orig):.3f} (original units)")
    print(f"95% interval coverage (PICP) {metrics.picp(pred.mean, pred.total_std, yv, level=0.95):.3f}")
    share = np.mean((pred.aleatoric_variance / pred.total_variance).numpy())
    print(f"share of the predictive variance that is aleatoric: {share:.2f}")
    if args.out:
        report = mcdrop.report(pred, title="Diabetes: heteroscedastic MLP with MC dropout", model=mc)
        report.save(args.out, overwrite=True)
        print(f"report written to {args.out}")


if __name__ == "__main__":
    main()
