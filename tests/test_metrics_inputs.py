"""Input handling shared by every metric: accepted kinds, clear errors, no heavy imports."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mcdrop import metrics
from mcdrop.errors import InvalidInputError, InvalidTypeError, McdropError, NonFiniteError

ROOT = Path(__file__).resolve().parents[1]

PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4], [0.05, 0.05, 0.9]])
LABELS = np.array([0, 2, 2, 2])
CLASSIFICATION = [
    metrics.expected_calibration_error,
    metrics.classwise_calibration_error,
    metrics.reliability_table,
    metrics.brier_score,
    metrics.negative_log_likelihood,
    metrics.accuracy,
]


# ----------------------------------------------------------------------------------------------
# classification inputs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", CLASSIFICATION)
def test_rows_not_summing_to_one(fn) -> None:
    bad = PROBS.copy()
    bad[1, 1] = 0.9
    with pytest.raises(InvalidInputError, match=r"row 1 sums to 1\.3.*probs / probs\.sum"):
        fn(bad, LABELS)


@pytest.mark.parametrize("fn", CLASSIFICATION)
def test_logits_get_a_softmax_hint(fn) -> None:
    logits = np.log(PROBS) + 1.0
    with pytest.raises(InvalidInputError, match=r"look like logits.*softmax"):
        fn(logits, LABELS)


def test_binary_logits_get_a_sigmoid_hint() -> None:
    with pytest.raises(InvalidInputError, match="sigmoid"):
        metrics.brier_score(np.array([-2.0, 0.5, 3.0]), np.array([0, 1, 1]))


@pytest.mark.parametrize("fn", CLASSIFICATION)
def test_labels_out_of_range(fn) -> None:
    with pytest.raises(InvalidInputError, match=r"class indices in \[0, 2\].*got values in \[0, 3\]"):
        fn(PROBS, np.array([0, 1, 3, 2]))
    with pytest.raises(InvalidInputError, match=r"\[-1, 2\]"):
        fn(PROBS, np.array([0, -1, 2, 2]))


def test_one_based_labels_get_a_hint() -> None:
    with pytest.raises(InvalidInputError, match="1-based"):
        metrics.accuracy(PROBS, LABELS + 1)


def test_labels_kinds() -> None:
    expected = metrics.accuracy(PROBS, LABELS)
    assert metrics.accuracy(PROBS, LABELS.astype(float)) == expected  # integral floats are fine
    assert metrics.accuracy(PROBS, torch.from_numpy(LABELS).to(torch.int32)) == expected
    assert metrics.accuracy([0.2, 0.9], np.array([False, True])) == 1.0
    with pytest.raises(InvalidInputError, match="integer class indices"):
        metrics.accuracy(PROBS, LABELS + 0.5)
    with pytest.raises(InvalidInputError, match="one-hot"):
        metrics.accuracy(PROBS, np.eye(3)[LABELS])


@pytest.mark.parametrize("fn", CLASSIFICATION)
def test_shape_mismatch(fn) -> None:
    with pytest.raises(InvalidInputError, match=r"labels must have shape \(4,\)"):
        fn(PROBS, LABELS[:3])


def test_probability_shape_errors_have_hints() -> None:
    with pytest.raises(InvalidInputError, match=r"probs\.mean\(0\)"):
        metrics.accuracy(np.stack([PROBS, PROBS]), LABELS)
    with pytest.raises(InvalidInputError, match="single column"):
        metrics.accuracy(PROBS[:, :1], LABELS)
    with pytest.raises(InvalidInputError, match=r"reshape\(-1, K\)"):
        metrics.accuracy(np.zeros((2, 3, 4, 5)), LABELS)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("fn", CLASSIFICATION)
def test_non_finite_probabilities(fn, bad: float) -> None:
    probs = PROBS.copy()
    probs[2, 1] = bad
    with pytest.raises(NonFiniteError, match=r"first at index \(2, 1\)"):
        fn(probs, LABELS)


def test_non_finite_labels() -> None:
    with pytest.raises(NonFiniteError, match="labels"):
        metrics.accuracy(PROBS, np.array([0.0, np.nan, 1.0, 2.0]))


@pytest.mark.parametrize("fn", CLASSIFICATION)
def test_empty_input(fn) -> None:
    with pytest.raises(InvalidInputError, match="empty"):
        fn(np.zeros((0, 3)), np.zeros(0, dtype=int))


def test_non_finite_error_is_an_invalid_input_and_a_value_error() -> None:
    with pytest.raises(ValueError):
        metrics.accuracy([np.nan, 0.5], [0, 1])
    assert issubclass(NonFiniteError, InvalidInputError) and issubclass(NonFiniteError, McdropError)


def test_wrong_types() -> None:
    with pytest.raises(InvalidTypeError, match="torch.Tensor, a numpy.ndarray"):
        metrics.accuracy("0.5", [1])
    with pytest.raises(InvalidTypeError, match="real numbers"):
        metrics.accuracy(np.array(["a", "b"]), [1, 0])
    with pytest.raises(InvalidTypeError, match="complex"):
        metrics.accuracy(torch.ones(2, 2, dtype=torch.complex64) / 2, [1, 0])
    with pytest.raises(InvalidInputError, match="rectangular"):
        metrics.accuracy([[0.5, 0.5], [1.0]], [1, 0])


def test_tolerance_follows_the_dtype() -> None:
    # float32 softmax rows are off by ~1e-7; float16 rows by ~1e-3: both accepted
    logits = torch.randn(1000, 100, generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(1000, dtype=torch.long)
    for dtype in (torch.float32, torch.float16):
        assert 0 <= metrics.expected_calibration_error(torch.softmax(logits, -1).to(dtype), labels) <= 1
    # float64 still accepts float32-accurate rows, but not a 1e-3 error
    p64 = torch.softmax(logits, -1).double()
    metrics.brier_score(p64, labels)
    p64[0] *= 1.001
    with pytest.raises(InvalidInputError, match="sum to 1"):
        metrics.brier_score(p64, labels)


def test_read_only_numpy_arrays_are_used_without_warnings() -> None:
    probs, labels = PROBS.copy(), LABELS.copy()
    probs.flags.writeable = False
    labels.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics.expected_calibration_error(probs, labels)


def test_big_endian_and_unsigned_arrays() -> None:
    expected = metrics.brier_score(PROBS, LABELS)
    assert metrics.brier_score(PROBS.astype(">f8"), LABELS.astype(np.uint16)) == pytest.approx(expected)


def test_tensors_requiring_grad_are_accepted_and_untouched() -> None:
    probs = torch.tensor(PROBS, requires_grad=True)
    assert metrics.brier_score(probs, torch.from_numpy(LABELS)) == pytest.approx(
        metrics.brier_score(PROBS, LABELS)
    )
    assert probs.grad is None


# ----------------------------------------------------------------------------------------------
# regression and score inputs
# ----------------------------------------------------------------------------------------------
def test_std_must_be_positive_with_a_hint() -> None:
    with pytest.raises(InvalidInputError, match=r"1 value\(s\) <= 0.*clamp_min"):
        metrics.crps_gaussian([0.0, 1.0], [1.0, 0.0], [0.0, 0.0])
    with pytest.raises(InvalidInputError, match="strictly positive"):
        metrics.mpiw([-1.0])


def test_regression_non_finite_and_empty() -> None:
    with pytest.raises(NonFiniteError, match="targets"):
        metrics.gaussian_nll([0.0, 0.0], [1.0, 1.0], [0.0, np.inf])
    with pytest.raises(InvalidInputError, match="empty"):
        metrics.rmse([], [])


def test_regression_shape_mismatch_lists_the_shapes() -> None:
    with pytest.raises(InvalidInputError, match=r"mean \(3,\), std \(3, 1\), targets \(3,\)"):
        metrics.gaussian_nll(np.zeros(3), np.ones((3, 1)), np.zeros(3))


def test_selective_and_ood_non_finite() -> None:
    with pytest.raises(NonFiniteError, match="uncertainty"):
        metrics.aurc([0.1, np.nan], [0, 1])
    with pytest.raises(NonFiniteError, match="scores_out"):
        metrics.ood_auroc([0.1, 0.2], [np.inf])


# ----------------------------------------------------------------------------------------------
# every metric: numpy and torch agree, results are floats
# ----------------------------------------------------------------------------------------------
def _calls():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=60)
    labels = rng.integers(0, 4, size=60)
    mean, std = rng.normal(size=60), rng.uniform(0.5, 2, size=60)
    targets = mean + std * rng.normal(size=60)
    u, wrong = rng.random(60), rng.random(60) < 0.4
    samples = rng.normal(size=(8, 60))
    return [
        (metrics.expected_calibration_error, (probs, labels)),
        (metrics.classwise_calibration_error, (probs, labels)),
        (metrics.brier_score, (probs, labels)),
        (metrics.negative_log_likelihood, (probs, labels)),
        (metrics.accuracy, (probs, labels)),
        (metrics.aurc, (u, wrong)),
        (metrics.e_aurc, (u, wrong)),
        (metrics.misclassification_auroc, (u, wrong)),
        (metrics.ood_auroc, (u[:30], u[30:] + 0.2)),
        (metrics.ood_aupr, (u[:30], u[30:] + 0.2)),
        (metrics.fpr_at_tpr, (u[:30], u[30:] + 0.2)),
        (metrics.gaussian_nll, (mean, std, targets)),
        (metrics.crps_gaussian, (mean, std, targets)),
        (metrics.rmse, (mean, targets)),
        (metrics.mae, (mean, targets)),
        (metrics.sharpness, (std,)),
        (metrics.picp, (mean, std, targets)),
        (metrics.mpiw, (std,)),
        (metrics.miscalibration_area, (mean, std, targets)),
        (metrics.mean_absolute_calibration_error, (mean, std, targets)),
        (metrics.root_mean_squared_calibration_error, (mean, std, targets)),
        (metrics.interval_score, (mean, std, targets)),
        (metrics.check_score, (mean, std, targets)),
        (metrics.mc_log_likelihood, (samples, targets, 2.0)),
    ]


@pytest.mark.parametrize(("fn", "args"), _calls(), ids=lambda x: getattr(x, "__name__", ""))
def test_numpy_and_torch_inputs_agree_and_give_floats(fn, args) -> None:
    from_numpy = fn(*args)
    as_tensors = [torch.from_numpy(np.asarray(a)) if isinstance(a, np.ndarray) else a for a in args]
    from_torch = fn(*as_tensors)
    assert type(from_numpy) is float and type(from_torch) is float
    assert from_torch == pytest.approx(from_numpy, abs=1e-12)


def test_all_public_names_are_exported_and_documented() -> None:
    for name in metrics.__all__:
        obj = getattr(metrics, name)
        assert obj.__doc__ and "Example:" in obj.__doc__ and ">>>" in obj.__doc__, name
    docs = (ROOT / "docs" / "metrics.md").read_text()
    missing = [name for name in metrics.__all__ if f"`{name}" not in docs]
    assert not missing, f"docs/metrics.md does not mention {missing}"


def _module_level_imports(path: Path) -> set[str]:
    """Top-level package names imported when the module is imported (TYPE_CHECKING blocks excluded)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
            elif isinstance(node, ast.If):
                if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)

    visit(tree.body)
    return found


@pytest.mark.parametrize(
    "path",
    sorted((ROOT / "mcdrop" / "metrics").glob("*.py")) + [ROOT / "mcdrop" / "recalibration.py"],
    ids=str,
)
def test_metrics_modules_import_no_heavy_dependencies_and_respect_layers(path: Path) -> None:
    # pandas, matplotlib and seaborn belong to the report layer; scikit-learn and scipy are
    # imported lazily inside the functions that need them; metrics never import higher layers
    allowed_ours = ("mcdrop.errors", "mcdrop._checks", "mcdrop.metrics")
    if path.name == "recalibration.py":  # it also recalibrates predictions (layer 4: docs/architecture.md)
        allowed_ours += ("mcdrop._statistics", "mcdrop.predictions")
    for name in _module_level_imports(path):
        root = name.split(".")[0]
        assert root not in {"pandas", "matplotlib", "seaborn", "sklearn", "scipy"}, (
            f"{path.name} imports {name}"
        )
        if root == "mcdrop":
            assert name.startswith(allowed_ours), f"{path.name} imports {name}"
