"""Fast checks of examples/uci_gal2016.py (the Gal & Ghahramani 2016 UCI reproduction) on a tiny slice.

The full protocol takes many minutes per set; here the example's building blocks are checked against
the protocol of ``../shared/data/uci/README.md`` and one tiny end-to-end run (yacht, 1 split, a few
epochs, T=50) checks the plumbing and the output table. Skipped when the shared data are absent.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "uci"
EXAMPLE = REPO_ROOT / "examples" / "uci_gal2016.py"

pytestmark = pytest.mark.skipif(
    not (DATA_DIR / "yacht" / "data.txt").is_file(),
    reason=f"UCI data not present at {DATA_DIR} (the shared data folder of the paper reproduction)",
)


@pytest.fixture(scope="module")
def uci():
    spec = importlib.util.spec_from_file_location("uci_gal2016", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_default_data_dir_is_repo_sibling(uci):
    assert uci.DEFAULT_DATA_DIR.resolve() == DATA_DIR.resolve()
    assert uci.resolve_data_dir().resolve() == DATA_DIR.resolve()


def test_loaded_shapes_match_readme(uci):
    x, y = uci.load_dataset("yacht")
    assert x.shape == (308, 6) and y.shape == (308,)
    x, y = uci.load_dataset("naval-propulsion-plant")
    raw = np.loadtxt(DATA_DIR / "naval-propulsion-plant" / "data.txt")
    assert x.shape == (11934, 16)
    np.testing.assert_array_equal(x, raw[:, :16])  # inputs: columns 0-15
    np.testing.assert_array_equal(y, raw[:, 16])  # target: column 16 (column 17 unused)


def test_splits_follow_readme_protocol(uci):
    n = 308
    np.random.seed(1)
    first = np.random.choice(range(n), n, replace=False)
    second = np.random.choice(range(n), n, replace=False)
    np.random.seed(12345)  # make_splits must reseed with 1 itself
    splits = uci.make_splits(n, 2)
    n_train = round(0.9 * n)
    assert n_train == 277
    for (train, test), perm in zip(splits, (first, second), strict=True):
        np.testing.assert_array_equal(train, perm[:n_train])
        np.testing.assert_array_equal(test, perm[n_train:])
        assert sorted(np.concatenate([train, test]).tolist()) == list(range(n))


def test_standardisation_uses_training_split_only(uci):
    x, y = uci.load_dataset("yacht")
    train, test = uci.make_splits(len(y), 1)[0]
    split = uci.standardise(x[train], y[train], x[test], y[test])
    np.testing.assert_allclose(split.mean_x, x[train].mean(0))
    np.testing.assert_allclose(split.std_x, x[train].std(0))  # ddof 0
    assert split.mean_y == pytest.approx(y[train].mean()) and split.std_y == pytest.approx(y[train].std())
    np.testing.assert_allclose(split.x_train.mean(0), 0.0, atol=1e-12)
    np.testing.assert_allclose(split.x_train.std(0), 1.0, rtol=1e-12)
    np.testing.assert_allclose(split.x_test, (x[test] - x[train].mean(0)) / x[train].std(0))
    np.testing.assert_array_equal(split.y_test, y[test])  # the test target stays in original units
    # Changing the test data changes nothing in the statistics.
    other = uci.standardise(x[train], y[train], x[test] * 100.0 + 7.0, y[test] - 3.0)
    np.testing.assert_array_equal(other.mean_x, split.mean_x)
    np.testing.assert_array_equal(other.std_x, split.std_x)
    assert (other.mean_y, other.std_y) == (split.mean_y, split.std_y)
    # A constant column gets std 1.
    const = uci.standardise(np.ones((4, 1)), np.arange(4.0), np.full((2, 1), 3.0), np.zeros(2))
    assert const.std_x.tolist() == [1.0]
    assert const.x_test.ravel().tolist() == [2.0, 2.0]


def test_weight_decay_formula(uci):
    # reg = l**2 * (1 - p) / (2 * N * tau); the authors' code writes it as (1 - p) / (2 N (1/l)**2 tau).
    reg = uci.weight_decay(0.01, 0.541869562034, 1e-1, 277)
    assert reg == pytest.approx((1 - 0.01) / (2.0 * 277 * 1e1**2 * 0.541869562034), rel=1e-12)


def test_mc_metrics_match_hand_computation(uci):
    gen = torch.Generator().manual_seed(0)
    samples_std = torch.randn(7, 5, 1, generator=gen)  # T=7 passes, n=5 points, standardised
    y = [3.1, 2.5, 4.0, 1.2, 2.8]
    mean_y, std_y, tau = 2.9, 1.7, 0.43
    rmse, ll = uci.mc_test_metrics(samples_std, np.array(y), mean_y, std_y, tau)

    s = samples_std.double().squeeze(-1).tolist()
    yhat = [[s[t][i] * std_y + mean_y for i in range(5)] for t in range(7)]  # original units
    lls, sq = [], []
    for i in range(5):
        terms = [-0.5 * tau * (y[i] - yhat[t][i]) ** 2 for t in range(7)]
        top = max(terms)
        lse = top + math.log(sum(math.exp(v - top) for v in terms))
        lls.append(lse - math.log(7) - 0.5 * math.log(2 * math.pi) + 0.5 * math.log(tau))
        sq.append((y[i] - sum(yhat[t][i] for t in range(7)) / 7) ** 2)
    assert ll == pytest.approx(sum(lls) / 5, rel=1e-10)
    assert rmse == pytest.approx(math.sqrt(sum(sq) / 5), rel=1e-10)


def test_batched_networks_equal_their_extracted_copies(uci):
    torch.manual_seed(0)
    model = uci.SplitMLPs(3, 4, 6, p=0.1).eval()
    with torch.no_grad():
        model.b1.normal_()
        model.b2.normal_()
    x = torch.randn(3, 5, 4)
    batched = model(x)
    for i in range(3):
        net = model.network(i)
        assert isinstance(net[0], uci.Dropout) and isinstance(net[3], uci.Dropout)
        torch.testing.assert_close(net(x[i]), batched[i])
    with torch.no_grad():
        expected = float(model.w1.square().sum() + model.w2.square().sum())
        assert model.weight_penalty().item() == pytest.approx(expected)


def test_tiny_run_and_output_table(uci, tmp_path, capsys):
    per_split, timings = uci.run_dataset("yacht", n_splits=1, epochs=2, n_samples=50, seed=0)
    assert list(per_split.columns) == ["dataset", "split", "n_train", "n_test", "rmse", "test_ll"]
    assert per_split[["n_train", "n_test"]].values.tolist() == [[277, 31]]
    assert np.isfinite(per_split[["rmse", "test_ll"]].values).all()
    again, _ = uci.run_dataset("yacht", n_splits=1, epochs=2, n_samples=50, seed=0)
    pd.testing.assert_frame_equal(per_split, again)  # fixed seeds: reproducible

    out = tmp_path / "results.csv"
    summary = uci.main(
        ["--datasets", "yacht", "--splits", "1", "--epochs", "1", "--samples", "20", "--out", str(out)]
    )
    printed = capsys.readouterr().out
    assert list(summary.columns) == uci.SUMMARY_COLUMNS
    for column in (
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
    ):
        assert column in summary.columns
    row = summary.iloc[0]
    assert row["dataset"] == "yacht" and not row["full_protocol"]
    assert row["paper_rmse"] == 1.1092 and row["paper_test_ll"] == -1.5541
    expected = (row["rmse"] - 1.1092) / math.sqrt(row["rmse_se"] ** 2 + 0.0850**2)
    assert row["rmse_diff_se"] == pytest.approx(expected)
    assert "paper" in printed and "SE" in printed
    assert list(pd.read_csv(out).columns) == uci.SUMMARY_COLUMNS
    assert list(pd.read_csv(tmp_path / "results_splits.csv").columns) == list(per_split.columns)


def test_missing_data_dir_is_a_clear_error(uci, tmp_path):
    with pytest.raises(SystemExit, match="UCI data folder not found"):
        uci.main(["--datasets", "yacht", "--data-dir", str(tmp_path / "nowhere")])
