"""Fast checks of examples/uci_gal2016.py (the Gal & Ghahramani 2016 UCI reproduction) on a tiny slice.

The full protocol takes many minutes per set; here the example's building blocks are checked against
the protocol of ``../shared/data/uci/README.md`` and tiny end-to-end runs (yacht, 1-3 splits, a few
epochs, T=50) check the plumbing and the output table. The paired comparison with the authors'
per-split results (mean difference, SE, t, p, correlation) is checked on a hand-computed fixture, the
Student t p-value against closed forms and t tables, and ``--data-file`` on temporary files (its
error paths and a tiny end-to-end run). The tests that read the shared data are skipped when the data
are absent; the others always run.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "uci"
EXAMPLE = REPO_ROOT / "examples" / "uci_gal2016.py"

needs_data = pytest.mark.skipif(
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


@needs_data
def test_default_data_dir_is_repo_sibling(uci):
    assert uci.DEFAULT_DATA_DIR.resolve() == DATA_DIR.resolve()
    assert uci.resolve_data_dir().resolve() == DATA_DIR.resolve()


@needs_data
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


@needs_data
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


@needs_data
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
    # The paper's values come from paper_splits.csv (README table: 1.1092 ± 0.0850, -1.5541 ± 0.0269).
    assert row["paper_rmse"] == pytest.approx(1.1092, abs=5e-5)
    assert row["paper_test_ll"] == pytest.approx(-1.5541, abs=5e-5)
    paper_rmse_se = row["paper_rmse_se"]
    assert paper_rmse_se == pytest.approx(0.0850, abs=5e-5)
    expected = (row["rmse"] - row["paper_rmse"]) / math.sqrt(row["rmse_se"] ** 2 + paper_rmse_se**2)
    assert row["rmse_diff_se"] == pytest.approx(expected)
    # One split: it is paired with the paper's split 0, but has no standard error, t or p.
    assert row["paper_splits"] == 20 and row["paired_splits"] == 1
    paper0 = pd.read_csv(DATA_DIR / "yacht" / "paper_splits.csv").iloc[0]
    assert row["rmse_paired_diff"] == pytest.approx(row["rmse"] - paper0["test_mc_rmse"])
    assert math.isnan(row["rmse_paired_diff_se"]) and math.isnan(row["rmse_paired_p"])
    assert "paper" in printed and "SE" in printed
    assert list(pd.read_csv(out).columns) == uci.SUMMARY_COLUMNS
    assert list(pd.read_csv(tmp_path / "results_splits.csv").columns) == list(per_split.columns)


def test_missing_data_dir_is_a_clear_error(uci, tmp_path):
    with pytest.raises(SystemExit, match="UCI data folder not found"):
        uci.main(["--datasets", "yacht", "--data-dir", str(tmp_path / "nowhere")])


# ------------------------------------------------------------------------- paired comparison (issue 22)
# Fixture: paper = [1, 2, 3, 4], ours = [1.1, 2.3, 2.9, 4.5]. By hand:
#   differences d = [0.1, 0.3, -0.1, 0.5], mean 0.2, deviations [-0.1, 0.1, -0.3, 0.3],
#   sum of squares 0.2, var(ddof 1) = 0.2 / 3, SE = sqrt(0.2 / 3) / 2 = sqrt(1 / 60) = 0.129099...,
#   t = 0.2 / SE = 0.2 sqrt(60) = 1.549193..., df = 3;
#   correlation: paper deviations [-1.5, -0.5, 0.5, 1.5] (SS 5), ours mean 2.7, deviations
#   [-1.6, -0.4, 0.2, 1.8] (SS 6), cross products 2.4 + 0.2 + 0.1 + 2.7 = 5.4, r = 5.4 / sqrt(30);
#   p: Student t with 3 df has the closed form P(|T| >= t) = 1 - (2/pi) (theta + sin theta cos theta),
#   theta = atan(t / sqrt(3)) = atan(sqrt(0.8)); sin cos = tan / (1 + tan^2) = sqrt(0.8) / 1.8,
#   so p = 1 - (2/pi) (atan(sqrt(0.8)) + sqrt(0.8) / 1.8) = 0.219102...
PAPER = [1.0, 2.0, 3.0, 4.0]
OURS = [1.1, 2.3, 2.9, 4.5]
EXPECTED_P = 1 - 2 / math.pi * (math.atan(math.sqrt(0.8)) + math.sqrt(0.8) / 1.8)


def test_paired_comparison_matches_hand_computation(uci):
    test = uci.paired_comparison(OURS, PAPER)
    assert test.n == 4
    assert test.mean_diff == pytest.approx(0.2, rel=1e-12)
    assert test.se == pytest.approx(math.sqrt(1 / 60), rel=1e-12)
    assert test.t == pytest.approx(0.2 * math.sqrt(60), rel=1e-12)
    assert test.corr == pytest.approx(5.4 / math.sqrt(30), rel=1e-12)
    assert test.p == pytest.approx(EXPECTED_P, rel=1e-12)
    assert EXPECTED_P == pytest.approx(0.219102, abs=1e-6)
    swapped = uci.paired_comparison(PAPER, OURS)  # the sign flips, nothing else changes
    assert (swapped.mean_diff, swapped.t) == pytest.approx((-0.2, -0.2 * math.sqrt(60)))
    assert (swapped.se, swapped.p, swapped.corr) == pytest.approx((test.se, test.p, test.corr))


def test_paired_comparison_degenerate_cases(uci):
    one = uci.paired_comparison([1.5], [1.0])
    assert one.n == 1 and one.mean_diff == 0.5
    assert all(math.isnan(v) for v in (one.se, one.t, one.p, one.corr))
    same = uci.paired_comparison(PAPER, PAPER)  # identical: no difference at all
    assert (same.mean_diff, same.se, same.t, same.p, same.corr) == (0.0, 0.0, 0.0, 1.0, 1.0)
    shifted = uci.paired_comparison([v + 1 for v in PAPER], PAPER)  # a constant offset: SE 0
    assert shifted.t == math.inf and shifted.p == 0.0
    assert math.isnan(uci.paired_comparison([1.0, 1.0], [0.0, 2.0]).corr)  # a constant series
    with pytest.raises(ValueError, match="one length"):
        uci.paired_comparison([1.0, 2.0], [1.0])


def test_summary_pairs_by_split_index_and_takes_paper_values_from_splits(uci):
    paper = pd.DataFrame({"split": range(5), "rmse": PAPER + [9.0], "test_ll": [-v for v in PAPER] + [0.0]})
    # Ours: splits 0-3 of the paper's 5, in a shuffled order; pairing is by split index.
    ours = pd.DataFrame(
        {"split": [2, 0, 3, 1], "rmse": [2.9, 1.1, 4.5, 2.3], "test_ll": [-2.9, -1.1, -4.5, -2.3]}
    )
    cfg = uci.UCIConfig("fixture", 0.05, 1.0, n_splits=5)
    row = uci.summarise("fixture", ours, 400, 10000, {"train_seconds": 1.0, "test_seconds": 2.0}, paper, cfg)
    assert list(row) == uci.SUMMARY_COLUMNS
    assert row["paper_splits"] == 5 and row["paired_splits"] == 4 and not row["full_protocol"]
    # The paper's mean ± SE is over all its splits, ddof 0: [1, 2, 3, 4, 9] -> 3.8 ± sqrt(38.8 / 5 / 5).
    assert row["paper_rmse"] == pytest.approx(3.8)
    assert row["paper_rmse_se"] == pytest.approx(math.sqrt(7.76) / math.sqrt(5))
    assert row["rmse"] == pytest.approx(2.7) and row["rmse_se"] == pytest.approx(math.sqrt(6 / 4) / 2)
    expected = (2.7 - 3.8) / math.sqrt(6 / 16 + 7.76 / 5)
    assert row["rmse_diff_se"] == pytest.approx(expected) and row["rmse_within_2se"]
    assert row["rmse_paired_diff"] == pytest.approx(0.2)
    assert row["rmse_paired_diff_se"] == pytest.approx(math.sqrt(1 / 60))
    assert row["rmse_paired_t"] == pytest.approx(0.2 * math.sqrt(60))
    assert row["rmse_paired_p"] == pytest.approx(EXPECTED_P)
    assert row["rmse_split_corr"] == pytest.approx(5.4 / math.sqrt(30))
    assert row["test_ll_paired_diff"] == pytest.approx(-0.2)  # LL = -RMSE here: the sign flips
    assert row["test_ll_paired_t"] == pytest.approx(-0.2 * math.sqrt(60))
    assert row["test_ll_paired_p"] == pytest.approx(EXPECTED_P)
    table = uci.format_dataset_table(row)
    assert "paired, split by split (4 of the paper's 5 splits" in table
    assert "+0.2000 ± 0.1291" in table and "+1.55" in table and "0.22" in table and "0.986" in table
    # No paper file: no comparison, NaN paper columns.
    alone = uci.summarise("fixture", ours, 400, 10000, {"train_seconds": 1.0, "test_seconds": 2.0}, None, cfg)
    assert alone["paper_splits"] == 0 and alone["paired_splits"] == 0
    assert math.isnan(alone["paper_rmse"]) and math.isnan(alone["rmse_paired_t"])
    assert "no paper comparison" in uci.format_dataset_table(alone)


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, 10.0, 1e3, -4.0])
def test_student_t_p_matches_closed_forms(uci, t):
    # df = 1 (Cauchy): P(|T| >= t) = 1 - (2/pi) atan|t|; df = 2: 1 - |t| / sqrt(2 + t^2).
    assert uci.student_t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(abs(t)), rel=1e-12)
    assert uci.student_t_two_sided_p(t, 2) == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t), rel=1e-12)
    theta = math.atan(abs(t) / math.sqrt(3))  # df = 3, as in the fixture above
    p3 = 1 - 2 / math.pi * (theta + math.sin(theta) * math.cos(theta))
    assert uci.student_t_two_sided_p(t, 3) == pytest.approx(p3, rel=1e-10, abs=1e-15)


@pytest.mark.parametrize(
    ("t", "df", "p"),
    [  # two-sided critical values: printed t tables' (12.706, 4.303, 2.776, ...) to more digits
        (12.7062047362, 1, 0.05),
        (4.30265272975, 2, 0.05),
        (2.77644510520, 4, 0.05),
        (4.60409487142, 4, 0.01),
        (2.09302405441, 19, 0.05),
        (2.86093460645, 19, 0.01),
        (3.88340585259, 19, 0.001),
        (1.72913281152, 19, 0.10),
        (1.96020123989, 10**4, 0.05),  # near the normal limit (1.95996...)
    ],
)
def test_student_t_p_matches_t_tables(uci, t, df, p):
    assert uci.student_t_two_sided_p(t, df) == pytest.approx(p, rel=1e-8)
    assert uci.student_t_two_sided_p(-t, df) == pytest.approx(p, rel=1e-8)


def test_student_t_p_edge_cases_and_incomplete_beta(uci):
    assert uci.student_t_two_sided_p(math.inf, 5) == 0.0
    assert math.isnan(uci.student_t_two_sided_p(math.nan, 5))
    assert math.isnan(uci.student_t_two_sided_p(1.0, 0))
    beta = uci.regularized_incomplete_beta
    for x in (0.0, 0.01, 0.3, 0.5, 0.77, 0.999, 1.0):
        assert beta(1.0, 1.0, x) == pytest.approx(x, abs=1e-14)  # uniform
        assert beta(3.0, 1.0, x) == pytest.approx(x**3, abs=1e-14)
        assert beta(1.0, 4.0, x) == pytest.approx(1 - (1 - x) ** 4, abs=1e-14)
        assert beta(2.5, 7.0, x) + beta(7.0, 2.5, 1 - x) == pytest.approx(1.0, abs=1e-14)  # symmetry
    with pytest.raises(ValueError):
        beta(0.0, 1.0, 0.5)


def test_student_t_p_matches_scipy_where_installed(uci):
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 7.5, 19, 50, 1000):
        for t in (0.01, 0.5, 1.0, 2.0, 3.0, 6.0, 15.0, 40.0):
            expected = float(2 * stats.t.sf(t, df))
            assert uci.student_t_two_sided_p(t, df) == pytest.approx(expected, rel=1e-9, abs=1e-300)


@needs_data
def test_paper_values_come_from_the_per_split_files(uci):
    readme = {  # the README's table (rounded to 4 decimals), which the per-split files must give
        "yacht": (1.1092, 0.0850, -1.5541, 0.0269),
        "energy": (1.6634, 0.0433, -1.9853, 0.0198),
        "wine-quality-red": (0.6202, 0.0087, -0.9334, 0.0142),
        "kin8nm": (0.0965, 0.0007, 0.9509, 0.0057),
        "power-plant": (4.0221, 0.0411, -2.7952, 0.0104),
        "naval-propulsion-plant": (0.0055, 0.0001, 3.8046, 0.0111),
        "protein-tertiary-structure": (4.3555, 0.0195, -2.8912, 0.0043),
    }
    assert set(readme) == set(uci.DATASETS)
    for name, (rmse, rmse_se, ll, ll_se) in readme.items():
        paper = uci.load_paper_splits(name)
        assert paper is not None and len(paper) == uci.DATASETS[name].n_splits
        assert list(paper.columns) == ["split", "rmse", "test_ll"]
        got = (*uci.mean_se(paper["rmse"]), *uci.mean_se(paper["test_ll"]))
        assert got == pytest.approx((rmse, rmse_se, ll, ll_se), abs=5.01e-5)
    naval = uci.load_paper_splits("naval-propulsion-plant")["rmse"]
    assert uci.mean_se(naval) == pytest.approx((0.005467, 0.000072), abs=5e-7)  # the unrounded values


def _copy_yacht(tmp_path, paper_text=None):
    folder = tmp_path / "uci" / "yacht"
    folder.mkdir(parents=True)
    (folder / "data.txt").write_text((DATA_DIR / "yacht" / "data.txt").read_text())
    if paper_text is not None:
        (folder / "paper_splits.csv").write_text(paper_text)
    return tmp_path / "uci"


@needs_data
def test_paired_run_and_missing_or_broken_paper_file(uci, tmp_path, capsys):
    summary = uci.main(["--datasets", "yacht", "--splits", "3", "--epochs", "1", "--samples", "20"])
    printed = capsys.readouterr().out
    row = summary.iloc[0]
    assert row["paired_splits"] == 3 and "paired, split by split (3 of the paper's 20 splits" in printed
    per_split, _ = uci.run_dataset("yacht", n_splits=3, epochs=1, n_samples=20, seed=0)
    paper = pd.read_csv(DATA_DIR / "yacht" / "paper_splits.csv").iloc[:3]
    test = uci.paired_comparison(per_split["rmse"], paper["test_mc_rmse"])
    assert (row["rmse_paired_diff"], row["rmse_paired_diff_se"], row["rmse_paired_t"]) == pytest.approx(
        (test.mean_diff, test.se, test.t)
    )
    assert (row["rmse_paired_p"], row["rmse_split_corr"]) == pytest.approx((test.p, test.corr))

    bare = _copy_yacht(tmp_path / "bare")  # no paper_splits.csv: the run goes on without a comparison
    summary = uci.main(
        ["--datasets", "yacht", "--data-dir", str(bare), "--splits", "1", "--epochs", "1", "--samples", "5"]
    )
    assert "no paper_splits.csv" in capsys.readouterr().out
    assert summary.iloc[0]["paper_splits"] == 0 and math.isnan(summary.iloc[0]["paper_rmse"])

    for text, message in (
        ("split,rmse\n0,1.0\n", "missing column"),
        ("split,test_mc_rmse,test_ll\n0,1.0,x\n", "non-numeric"),
        ("split,test_mc_rmse,test_ll\n1,1.0,-1.0\n", "numbered 0, 1"),
    ):
        broken = _copy_yacht(tmp_path / message.replace(" ", "_"), text)
        with pytest.raises(SystemExit, match=message) as excinfo:
            uci.main(["--datasets", "yacht", "--data-dir", str(broken), "--splits", "1", "--epochs", "1"])
        assert excinfo.value.code == 2


@needs_data
def test_data_file_run_equals_the_built_in_set(uci, tmp_path):
    # yacht's data.txt through --data-file with yacht's settings: the same numbers (yacht's torch seed
    # is seed + 0, the data file's is seed).
    summary = uci.main(
        ["--data-file", str(DATA_DIR / "yacht" / "data.txt"), "--p", "0.01", "--tau", "0.541869562034",
         "--length-scale", "0.1", "--splits", "2", "--epochs", "2", "--samples", "30",
         "--out", str(tmp_path / "own.csv")]
    )  # fmt: skip
    per_split, _ = uci.run_dataset("yacht", n_splits=2, epochs=2, n_samples=30, seed=0)
    own = pd.read_csv(tmp_path / "own_splits.csv")
    np.testing.assert_array_equal(
        own[["rmse", "test_ll"]].to_numpy(), per_split[["rmse", "test_ll"]].to_numpy()
    )
    assert summary.iloc[0]["dataset"] == "data.txt" and summary.iloc[0]["paper_splits"] == 0


# ---------------------------------------------------------------------------------- --data-file
def _regression_file(path, n=60, header=True, sep=","):
    gen = np.random.default_rng(0)
    x = gen.normal(size=(n, 3))
    y = 1.5 * x[:, 0] - 2.0 * x[:, 2] + 0.1 * gen.normal(size=n)
    lines = [sep.join(["a", "b", "c", "y"])] if header else []
    lines += [sep.join(f"{v:.6f}" for v in (*row, target)) for row, target in zip(x, y, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return x, y


def test_read_data_file_formats(uci, tmp_path):
    x, y = _regression_file(tmp_path / "h.csv")
    got_x, got_y, names = uci.read_data_file(tmp_path / "h.csv", "y")
    np.testing.assert_allclose(got_x, x, atol=1e-6) and np.testing.assert_allclose(got_y, y, atol=1e-6)
    assert names == ["a", "b", "c"]
    _regression_file(tmp_path / "w.txt", header=False, sep="  ")  # whitespace, no header, last column
    got_x2, got_y2, names2 = uci.read_data_file(tmp_path / "w.txt")
    np.testing.assert_array_equal(got_x2, got_x) and np.testing.assert_array_equal(got_y2, got_y)
    assert names2 == ["col0", "col1", "col2"]
    by_index, target, _ = uci.read_data_file(tmp_path / "w.txt", "0", ["-1", "2"])
    np.testing.assert_array_equal(target, got_x[:, 0])
    np.testing.assert_array_equal(by_index, np.column_stack([got_y, got_x[:, 2]]))
    # Semicolons, quoted names, comments and blank lines.
    text = '# a comment\n"x one";"the target"\n\n' + "".join(f"{i};{2 * i}\n" for i in range(12))
    (tmp_path / "s.csv").write_text(text)
    sx, sy, snames = uci.read_data_file(tmp_path / "s.csv", "the target")
    assert snames == ["x one"] and sy.tolist() == [2.0 * i for i in range(12)]


def _rows(n, cols=3):
    return "".join(" ".join(str(float(i + j)) for j in range(cols)) + "\n" for i in range(n))


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        (None, [], "no such file"),
        ("", [], "no data rows"),
        ("# only a comment\n", [], "no data rows"),
        (_rows(12, cols=1), [], "1 column"),
        (_rows(5) + "1 2\n" + _rows(6), [], "line 6: 2 fields, expected 3"),
        (
            _rows(5) + "1 x 2\n" + _rows(6),
            [],
            re.escape("line 6, column 1 (col1): 'x' is not a finite number"),
        ),
        (
            "a,b,c\n" + "1,2,3\n" * 5 + "1,,3\n" + "1,2,3\n" * 6,
            [],
            re.escape("line 7, column 1 (b): an empty field"),
        ),
        (_rows(4) + "1 nan 2\n" + _rows(6), [], "'nan' is not a finite number"),
        (_rows(4) + "inf 1 2\n" + _rows(6), [], "'inf' is not a finite number"),
        (_rows(9), [], re.escape("9 data row(s); the protocol needs at least 10")),
        ("a b c\n" + _rows(3), [], re.escape("3 data row(s)")),
        (_rows(12), ["--target", "3"], "--target 3: no such column"),
        (_rows(12), ["--target", "-4"], "--target -4: no such column"),
        (_rows(12), ["--target", "y"], "is a column name but"),
        (
            "a b c\n" + _rows(12),
            ["--target", "y"],
            "--target 'y': no such column in .* \\(columns: a, b, c\\)",
        ),
        ("a b a\n" + _rows(12), ["--target", "a"], "several columns have this name"),
        ("a b c\n" + _rows(12), ["--target", "c", "--features", "a", "c"], "includes the target column 'c'"),
        ("a b c\n" + _rows(12), ["--features", "a", "0"], "names a column twice"),
        ('"a,b\n' + "1,2\n" * 12, [], "cannot parse"),
    ],
)
def test_data_file_errors_are_one_line_exit_2(uci, tmp_path, capsys, content, extra, message):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit, match=message) as excinfo:
        uci.main(["--data-file", str(path), "--p", "0.05", "--tau", "1.0", *extra])
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("uci_gal2016.py: error: ") and err.count("\n") == 1


def test_data_file_unreadable_and_bad_options(uci, tmp_path, capsys):
    (tmp_path / "binary.dat").write_bytes(b"\xff\xfe\x00\x81" * 10)
    (tmp_path / "ok.csv").write_text(_rows(12))
    cases = [
        (["--data-file", str(tmp_path / "binary.dat"), "--p", "0.1", "--tau", "1"], "cannot read"),
        (["--data-file", str(tmp_path), "--p", "0.1", "--tau", "1"], "not a regular file"),
        (["--p", "0.1"], "--p apply only with --data-file"),
        (["--target", "2", "--hidden", "8"], "--target, --hidden apply only with --data-file"),
        (["--data-file", str(tmp_path / "ok.csv")], "needs --p .* and --tau"),
        (
            ["--data-file", str(tmp_path / "ok.csv"), "--p", "0.1", "--tau", "1", "--datasets", "yacht"],
            "cannot be combined",
        ),
        (["--data-file", str(tmp_path / "ok.csv"), "--p", "1.0", "--tau", "1"], "in \\[0, 1\\)"),
        (
            ["--data-file", str(tmp_path / "ok.csv"), "--p", "0.1", "--tau", "0"],
            "--tau 0.0: must be a positive",
        ),
        (
            ["--data-file", str(tmp_path / "ok.csv"), "--p", "0.1", "--tau", "1", "--length-scale", "-1"],
            "--length-scale",
        ),
        (
            ["--data-file", str(tmp_path / "ok.csv"), "--p", "0.1", "--tau", "1", "--hidden", "0"],
            "--hidden 0",
        ),
        (
            ["--data-file", str(tmp_path / "ok.csv"), "--p", "0.1", "--tau", "1", "--epochs", "0"],
            "--epochs 0",
        ),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message) as excinfo:
            uci.main(argv)
        assert excinfo.value.code == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("uci_gal2016.py: error: ") and err.count("\n") == 1, err


def test_data_file_tiny_end_to_end(uci, tmp_path, capsys):
    _regression_file(tmp_path / "mine.csv", n=40)
    out = tmp_path / "mine_results.csv"
    argv = ["--data-file", str(tmp_path / "mine.csv"), "--target", "y", "--p", "0.05", "--tau", "20",
            "--length-scale", "0.05", "--hidden", "8", "--splits", "2", "--epochs", "3", "--samples", "25",
            "--out", str(out)]  # fmt: skip
    summary = uci.main(argv)
    printed = capsys.readouterr().out
    assert list(summary.columns) == uci.SUMMARY_COLUMNS and len(summary) == 1
    row = summary.iloc[0]
    assert row["dataset"] == "mine.csv" and row["splits"] == 2 and not row["full_protocol"]
    assert row["paper_splits"] == 0 and row["paired_splits"] == 0
    assert math.isnan(row["paper_rmse"]) and math.isnan(row["test_ll_paired_p"])
    assert np.isfinite([row["rmse"], row["rmse_se"], row["test_ll"], row["test_ll_se"]]).all()
    assert "mine.csv: 2 splits, 3 epochs, T=25" in printed and "no paper comparison" in printed
    per_split = pd.read_csv(tmp_path / "mine_results_splits.csv")
    assert per_split[["n_train", "n_test"]].values.tolist() == [[36, 4], [36, 4]]
    again = uci.main(argv)  # fixed seeds: reproducible
    pd.testing.assert_frame_equal(summary.drop(columns=["train_seconds", "test_seconds"]),
                                  again.drop(columns=["train_seconds", "test_seconds"]))  # fmt: skip
