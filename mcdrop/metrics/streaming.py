r"""Streaming metric accumulators: evaluate any number of inputs in O(bins) memory, batch by batch.

Each accumulator keeps sufficient statistics of fixed size (per-bin counts and sums, a few running
sums, score histograms), so its memory does not grow with the number of inputs ``n``. Accumulators
can be :meth:`~StreamingMetrics.merge`\ d (what :mod:`mcdrop.distributed` does across processes with
``all_reduce``), saved with :meth:`~StreamingMetrics.state_dict` and restored with
:meth:`~StreamingMetrics.load_state_dict` (checkpoint and resume).

Exactness. Every metric below is a function of per-bin counts and of sums of per-input terms, and the
per-input terms are computed by the very code of the in-memory metric functions:

* ECE, MCE and RMSCE (:func:`~mcdrop.metrics.expected_calibration_error`, uniform right-closed bins,
  a confidence of 1.0 in the last bin), Brier score, NLL (same ``eps`` clamp, the machine epsilon of
  the probabilities' dtype) and accuracy for classifiers;
* RMSE, MAE, Gaussian NLL, CRPS, sharpness, PICP and MPIW at fixed levels, and the interval
  calibration curve (MACE, RMSCE, miscalibration area) for regression.

Counts are exact integers and sums are float64, so the results equal the in-memory functions up to
float64 rounding of the summation order (a relative difference of order ``1e-16 · log n``), never
approximately. The one approximation is the **histogram AUROC** of misclassification detection,
computed from histograms of the uncertainty score of right and wrong predictions.

Histogram AUROC and its error bound. Scores (predictive entropy, mutual information; both lie in
``[0, ln K]``) are put into ``n_score_bins`` log-spaced bins covering ``[1e-9 ln K, ln K]`` (about 1%
relative width each with the default 2048 bins; smaller scores go to the first bin, larger to the
last) plus one bin holding exact zeros. With :math:`W_b` wrong and :math:`R_b` right predictions in bin
:math:`b`, :math:`W`, :math:`R` their totals,

.. math::

    \widehat{\mathrm{AUROC}} = \frac{1}{W R} \sum_b W_b \Big(\sum_{b' < b} R_{b'} + \tfrac12 R_b\Big),
    \qquad
    |\widehat{\mathrm{AUROC}} - \mathrm{AUROC}| \le \frac{1}{2 W R} \sum_{b \ne \text{zero}} W_b R_b.

Bins are assigned by binary search in fixed edges, which is monotone, so every pair of scores in
different bins is ordered exactly and only pairs sharing a bin (counted as ties, one half) can be
wrong, by at most one half each; exact zeros are exact ties. The bound is computed from the
histograms and reported next to the estimate (``"... error bound"``): it is a guarantee, not an
estimate, and it is small unless many right and wrong predictions have scores within 1% of each
other.

Example:
    >>> import torch
    >>> from mcdrop.metrics import expected_calibration_error
    >>> from mcdrop.metrics.streaming import StreamingClassificationMetrics
    >>> probs = torch.softmax(torch.randn(1000, 4, generator=torch.Generator().manual_seed(0)), 1)
    >>> labels = torch.randint(0, 4, (1000,), generator=torch.Generator().manual_seed(1))
    >>> acc = StreamingClassificationMetrics()
    >>> for start in range(0, 1000, 300):  # any batching gives the same counts and sums
    ...     acc.update(probs[start:start + 300], labels[start:start + 300])
    >>> abs(acc.summary()["ECE"] - expected_calibration_error(probs, labels)) < 1e-12
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal, NamedTuple

import numpy as np
import torch

from mcdrop._checks import check_choice, check_int, check_real
from mcdrop.errors import InvalidInputError
from mcdrop.metrics._binning import (
    Bins,
    bin_index,
    binned_sums,
    calibration_error,
    count_between,
    curve_area,
    score_edges,
    table_columns,
    uniform_edges,
)
from mcdrop.metrics._gaussian import central_quantiles, crps_terms, nll_terms
from mcdrop.metrics.calibration import ReliabilityTable
from mcdrop.metrics.inputs import (
    F64,
    ArrayLike,
    parse_classification,
    parse_regression,
    to_f64,
    to_tensor,
)
from mcdrop.metrics.regression import CalibrationCurve

__all__ = [
    "State",
    "StreamingMetrics",
    "StreamingClassificationMetrics",
    "StreamingRegressionMetrics",
]

Reduce = Literal["sum"]

_FORMAT_VERSION = 1
_SCORE_RANGE = 1e-9  # log-spaced score bins cover [_SCORE_RANGE * ln K, ln K]
_DEFAULT_LEVELS = (0.5, 0.8, 0.9, 0.95, 0.99)
_REDUCES = ("sum",)
_STATE_DTYPES = (torch.int64, torch.float64)


class State(NamedTuple):
    """One declared statistic of an accumulator: its tensor and how the copies of it combine.

    Attributes:
        tensor: The statistic itself (int64 counts or float64 sums, on the CPU), not a copy: the
            accumulator updates it in place, and whoever combines accumulators may write to it.
        reduce: How the statistics of several accumulators combine into one: ``"sum"``, the one
            operation today (``torch.distributed.ReduceOp.SUM`` across processes).

    Example:
        >>> from mcdrop.metrics.streaming import StreamingRegressionMetrics
        >>> state = StreamingRegressionMetrics().states()["counts"]
        >>> state.tensor.tolist(), state.reduce
        ([0, 0, 0], 'sum')
    """

    tensor: torch.Tensor
    reduce: str


class StreamingMetrics:
    """Base class of the streaming accumulators: merge, checkpoint and summary.

    Subclasses hold their statistics in a fixed set of tensors (int64 counts and float64 sums) whose
    shapes depend only on the configuration, never on the number of inputs; :attr:`nbytes` is their
    total size. Each subclass declares them once, in its ``__init__``, with :meth:`_add_state` (as
    torchmetrics' ``add_state``), and the facts about its inputs that must agree when merging with
    :meth:`_add_metadata`; :meth:`merge`, :meth:`state_dict`, :meth:`load_state_dict` and the
    reduction across processes (:func:`mcdrop.distributed.reduce_metrics`, through :meth:`states`,
    :meth:`metadata` and :meth:`merge_metadata`) work on the declarations.

    Attributes:
        n_samples: Number of MC passes per input, when the caller recorded it (reported in the
            summary), else ``None``.

    Example:
        >>> import torch
        >>> from mcdrop.metrics.streaming import StreamingMetrics, StreamingRegressionMetrics
        >>> acc = StreamingRegressionMetrics()
        >>> acc.update(torch.zeros(4), torch.ones(4), torch.tensor([0.5, -1.5, 1.9, 2.5]))
        >>> restored = StreamingMetrics.from_state_dict(acc.state_dict())
        >>> restored.summary()["PICP (95%)"], restored.n
        (0.75, 4)
    """

    task: ClassVar[str] = ""
    _KINDS: ClassVar[dict[str, type[StreamingMetrics]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.task:
            StreamingMetrics._KINDS[cls.task] = cls

    def __init__(self) -> None:
        self.n_samples: int | None = None
        self._reduces: dict[str, str] = {}  # declared statistics: name -> reduce operation
        self._metadata_names: list[str] = []

    # ------------------------------------------------------------------ declarations, for subclasses
    def _add_state(self, name: str, default: torch.Tensor, reduce: Reduce = "sum") -> None:
        """Declare a statistic: it becomes the attribute ``name``, starting at ``default``.

        Call it in the subclass's ``__init__``, once per statistic; the order of the calls is the
        order of the statistics in :meth:`state_dict` and in the reduction across processes.

        Args:
            name: The attribute and the key in the state dict.
            default: The empty statistic, an int64 or float64 CPU tensor whose shape depends only on
                the configuration (it is used as it is, not copied).
            reduce: How copies of it combine: ``"sum"`` (the only operation today).

        Raises:
            InvalidInputError: A name declared twice, another dtype, or an unknown ``reduce``.
        """
        check_choice(reduce, _REDUCES, "reduce")
        if name in self._reduces or name in self._metadata_names:
            raise InvalidInputError(f"statistic {name!r} is declared twice.")
        if default.dtype not in _STATE_DTYPES:
            raise InvalidInputError(
                f"statistic {name!r} must be int64 (counts) or float64 (sums); got {default.dtype}."
            )
        setattr(self, name, default)
        self._reduces[name] = reduce

    def _add_metadata(self, name: str, value: Any = None) -> None:
        """Declare a non-additive fact about the inputs (e.g. the number of classes): the attribute ``name``.

        ``None`` means not known yet; merging adopts a known value and refuses two different ones.

        Args:
            name: The attribute and the key in :meth:`metadata`.
            value: Its initial value (default ``None``).

        Raises:
            InvalidInputError: A name declared twice.
        """
        if name in self._reduces or name in self._metadata_names:
            raise InvalidInputError(f"metadata {name!r} is declared twice.")
        setattr(self, name, value)
        self._metadata_names.append(name)

    # ------------------------------------------------------------------ to be provided by subclasses
    def config(self) -> dict[str, Any]:
        """The configuration (bins, levels, ...) that fixes the shapes of the statistics.

        Each subclass provides it (the base class raises ``NotImplementedError``). It is what
        :meth:`state_dict` saves, what :meth:`merge` and :meth:`load_state_dict` require to be equal,
        and the keyword arguments :meth:`from_config` builds an accumulator from.

        Returns:
            The constructor's keyword arguments, as plain Python values.

        Example:
            >>> from mcdrop.metrics.streaming import StreamingMetrics, StreamingRegressionMetrics
            >>> config = StreamingRegressionMetrics(levels=[0.9], n_curve_levels=10).config()
            >>> config
            {'levels': [0.9], 'n_curve_levels': 10}
            >>> StreamingMetrics.from_config("regression", config).config() == config
            True
        """
        raise NotImplementedError

    def summary(self) -> dict[str, float]:
        """The metrics of everything accumulated so far, as a ``{name: value}`` dict.

        Each subclass provides it (the base class raises ``NotImplementedError``); the names are
        those of the summary rows of :func:`mcdrop.report`, see
        :meth:`StreamingClassificationMetrics.summary` and :meth:`StreamingRegressionMetrics.summary`.

        Returns:
            ``{metric name: float}``, ending with ``"n_inputs"`` and, when :attr:`n_samples` is
            known, ``"n_samples"``.

        Example:
            >>> import torch
            >>> from mcdrop.metrics.streaming import StreamingRegressionMetrics
            >>> acc = StreamingRegressionMetrics(levels=[0.9])
            >>> acc.update(torch.zeros(2), torch.ones(2), torch.tensor([0.5, -3.0]))
            >>> acc.n_samples = 10  # recorded by the caller, as predict_loader(keep="metrics") does
            >>> s = acc.summary()
            >>> s["MAE"], s["PICP (90%)"], s["n_inputs"], s["n_samples"]
            (1.75, 0.5, 2.0, 10.0)
        """
        raise NotImplementedError

    @property
    def n(self) -> int:
        """Number of inputs accumulated so far."""
        raise NotImplementedError

    # ------------------------------------------------------------------ declared state
    def states(self) -> dict[str, State]:
        """The declared statistics with their reduce operations, by name, in the order of declaration.

        The tensors are the accumulator's own, not copies: this is what merging and the reduction
        across processes (:func:`mcdrop.distributed.reduce_metrics`) read and write. Use
        :meth:`state_dict` for a checkpoint.

        Returns:
            ``{name: State(tensor, reduce)}``.

        Example:
            >>> import torch
            >>> from mcdrop.metrics.streaming import StreamingRegressionMetrics
            >>> acc = StreamingRegressionMetrics(levels=[0.9])
            >>> acc.update(torch.zeros(2), torch.ones(2), torch.tensor([0.5, 3.0]))
            >>> {name: (s.reduce, s.tensor.dtype) for name, s in acc.states().items()}["inside"]
            ('sum', torch.int64)
            >>> acc.states()["inside"].tensor.tolist()  # one of the two targets is inside the 90% interval
            [1]
        """
        return {name: State(getattr(self, name), reduce) for name, reduce in self._reduces.items()}

    def _tensors(self) -> dict[str, torch.Tensor]:
        """The declared statistics, by name (the tensors of :meth:`states`)."""
        return {name: getattr(self, name) for name in self._reduces}

    def metadata(self) -> dict[str, Any]:
        """The facts about the inputs that must agree when merging (e.g. the number of classes).

        ``None`` means not known yet (no input so far). Plain Python values, as in :meth:`state_dict`.

        Returns:
            ``{name: value}``, in the order of declaration.

        Example:
            >>> import torch
            >>> from mcdrop.metrics.streaming import StreamingClassificationMetrics
            >>> acc = StreamingClassificationMetrics()
            >>> acc.metadata()
            {'n_classes': None, 'has_mutual_information': None}
            >>> acc.update(torch.tensor([[0.2, 0.5, 0.3]]), torch.tensor([1]))
            >>> acc.metadata()
            {'n_classes': 3, 'has_mutual_information': False}
        """
        return {name: getattr(self, name) for name in self._metadata_names}

    def merge_metadata(self, meta: Mapping[str, Any]) -> StreamingMetrics:
        """Adopt another accumulator's :meth:`metadata`, checking that the two agree.

        A value of ``None`` on either side (not known yet) gives way to the other; keys this
        accumulator does not declare are ignored. :meth:`merge` calls it; call it directly to combine
        the statistics by other means (e.g. a collective across processes).

        Args:
            meta: What :meth:`metadata` returned on the other accumulator.

        Returns:
            ``self``.

        Raises:
            InvalidInputError: A fact known to both with different values.

        Example:
            >>> from mcdrop.metrics.streaming import StreamingClassificationMetrics
            >>> acc = StreamingClassificationMetrics()
            >>> acc.merge_metadata({"n_classes": 4, "has_mutual_information": None}).n_classes
            4
            >>> acc.merge_metadata({"n_classes": 5})  # doctest: +ELLIPSIS
            Traceback (most recent call last):
                ...
            mcdrop.errors.InvalidInputError: cannot merge accumulators whose inputs differ in n_classes: ...
        """
        merged = self.metadata()
        for key, value in meta.items():
            if value is None:
                continue
            if merged.get(key) is None:
                merged[key] = value
            elif merged[key] != value:
                raise InvalidInputError(
                    f"cannot merge accumulators whose inputs differ in {key}: {merged[key]!r} and {value!r}."
                )
        self._set_metadata(merged)
        return self

    def _set_metadata(self, meta: Mapping[str, Any]) -> None:
        """Set every declared fact to its value in ``meta`` (``None`` where missing)."""
        for name in self._metadata_names:
            setattr(self, name, meta.get(name))

    # ------------------------------------------------------------------ common behaviour
    @property
    def nbytes(self) -> int:
        """Bytes held by the statistics: fixed by the configuration, independent of ``n``."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def merge(self, other: StreamingMetrics) -> StreamingMetrics:
        """Add another accumulator's statistics to this one (in place), as if its inputs were ours.

        Args:
            other: An accumulator of the same kind and configuration.

        Returns:
            ``self``.

        Raises:
            InvalidInputError: A different kind or configuration, or inputs of a different shape
                (e.g. another number of classes).

        Example:
            >>> import torch
            >>> from mcdrop.metrics.streaming import StreamingClassificationMetrics
            >>> a, b = StreamingClassificationMetrics(), StreamingClassificationMetrics()
            >>> a.update(torch.tensor([[0.9, 0.1]]), torch.tensor([0]))
            >>> b.update(torch.tensor([[0.3, 0.7]]), torch.tensor([0]))
            >>> a.merge(b).n, a.summary()["accuracy"]
            (2, 0.5)
        """
        if type(other) is not type(self):
            raise InvalidInputError(
                f"cannot merge a {type(other).__name__} into a {type(self).__name__}: the tasks differ."
            )
        if other.config() != self.config():
            raise InvalidInputError(
                f"cannot merge accumulators with different configurations: {self.config()} and "
                f"{other.config()}. Build both with the same options."
            )
        self.merge_metadata(other.metadata())
        theirs = other._tensors()
        for name, state in self.states().items():
            # reduce == "sum", the one operation _add_state accepts
            state.tensor.add_(theirs[name].to(state.tensor.device))
        if self.n_samples is None:
            self.n_samples = other.n_samples
        return self

    def state_dict(self) -> dict[str, Any]:
        """A checkpoint of the accumulator: plain Python values and CPU tensors.

        It can be saved with ``torch.save`` and read back with ``torch.load(..., weights_only=True)``.

        Returns:
            ``{"kind", "version", "config", "metadata", "n_samples", "tensors"}``.

        Example:
            >>> import torch
            >>> from mcdrop.metrics.streaming import StreamingClassificationMetrics
            >>> acc = StreamingClassificationMetrics(n_bins=10)
            >>> sorted(acc.state_dict())
            ['config', 'kind', 'metadata', 'n_samples', 'tensors', 'version']
        """
        return {
            "kind": self.task,
            "version": _FORMAT_VERSION,
            "config": self.config(),
            "metadata": self.metadata(),
            "n_samples": self.n_samples,
            "tensors": {name: t.detach().cpu().clone() for name, t in self._tensors().items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> StreamingMetrics:
        """Replace this accumulator's statistics by those of a :meth:`state_dict` (resume).

        Args:
            state: A state dict of the same kind and configuration.

        Returns:
            ``self``.

        Raises:
            InvalidInputError: A state of another kind, version or configuration, or with tensors of
                the wrong shape.

        Example:
            >>> import torch
            >>> from mcdrop.metrics.streaming import StreamingClassificationMetrics
            >>> acc = StreamingClassificationMetrics()
            >>> acc.update(torch.tensor([[0.9, 0.1]]), torch.tensor([0]))
            >>> StreamingClassificationMetrics().load_state_dict(acc.state_dict()).n
            1
        """
        _check_state(state)
        if state["kind"] != self.task:
            raise InvalidInputError(
                f"this is a {state['kind']} accumulator's state; it cannot be loaded into a {type(self).__name__}. "
                "Use StreamingMetrics.from_state_dict(state)."
            )
        if dict(state["config"]) != self.config():
            raise InvalidInputError(
                f"the state was saved with configuration {dict(state['config'])}, this accumulator has "
                f"{self.config()}. Use StreamingMetrics.from_state_dict(state)."
            )
        tensors = self._tensors()
        saved = state["tensors"]
        if set(saved) != set(tensors):
            raise InvalidInputError(
                f"the state holds the statistics {sorted(saved)}, expected {sorted(tensors)}."
            )
        for name, value in saved.items():
            value = torch.as_tensor(value)
            if value.shape != tensors[name].shape:
                raise InvalidInputError(
                    f"statistic {name!r} has shape {tuple(value.shape)} in the state, expected "
                    f"{tuple(tensors[name].shape)}."
                )
            tensors[name].copy_(value)
        self._set_metadata(dict(state["metadata"]))
        self.n_samples = state.get("n_samples")
        return self

    @staticmethod
    def from_state_dict(state: Mapping[str, Any]) -> StreamingMetrics:
        """Build the right accumulator (classification or regression) from a :meth:`state_dict`.

        Args:
            state: What :meth:`state_dict` returned (possibly after ``torch.save``/``torch.load``).

        Returns:
            A new :class:`StreamingClassificationMetrics` or :class:`StreamingRegressionMetrics`.

        Raises:
            InvalidInputError: Not a state dict of a streaming accumulator.

        Example:
            >>> from mcdrop.metrics.streaming import StreamingMetrics, StreamingRegressionMetrics
            >>> type(StreamingMetrics.from_state_dict(StreamingRegressionMetrics().state_dict())).__name__
            'StreamingRegressionMetrics'
        """
        _check_state(state)
        cls = StreamingMetrics._KINDS[state["kind"]]
        return cls(**dict(state["config"])).load_state_dict(state)

    @staticmethod
    def from_config(kind: str, config: Mapping[str, Any]) -> StreamingMetrics:
        """An empty accumulator of the given kind and configuration.

        Args:
            kind: ``"classification"`` or ``"regression"``.
            config: What :meth:`config` returned.

        Returns:
            A new, empty accumulator.

        Example:
            >>> from mcdrop.metrics.streaming import StreamingMetrics
            >>> StreamingMetrics.from_config("classification", {"n_bins": 10, "n_score_bins": 64}).n
            0
        """
        if kind not in StreamingMetrics._KINDS:
            raise InvalidInputError(f"kind must be one of {sorted(StreamingMetrics._KINDS)}; got {kind!r}.")
        return StreamingMetrics._KINDS[kind](**dict(config))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={self.n}, {', '.join(f'{k}={v!r}' for k, v in self.config().items())})"
        )


def _check_state(state: Any) -> None:
    if not isinstance(state, Mapping) or "kind" not in state or "tensors" not in state:
        raise InvalidInputError(
            "not a streaming-metrics state dict (expected the dict StreamingMetrics.state_dict() returns)."
        )
    if state.get("version") != _FORMAT_VERSION:
        raise InvalidInputError(
            f"streaming-metrics state of format version {state.get('version')!r}; this mcdrop reads "
            f"version {_FORMAT_VERSION}."
        )
    if state["kind"] not in StreamingMetrics._KINDS:
        raise InvalidInputError(f"unknown accumulator kind {state['kind']!r} in the state dict.")


# ----------------------------------------------------------------------------------------------
# classification
# ----------------------------------------------------------------------------------------------
def _histogram_auroc(hist: torch.Tensor) -> tuple[float, float]:
    """(AUROC estimate, guaranteed bound on its error) from a (2, bins) [right, wrong] histogram."""
    right, wrong = hist[0].to(F64), hist[1].to(F64)
    n_right, n_wrong = float(right.sum()), float(wrong.sum())
    if n_right == 0 or n_wrong == 0:
        return math.nan, math.nan
    below = torch.cumsum(right, 0) - right
    pairs = n_right * n_wrong
    estimate = float((wrong * (below + 0.5 * right)).sum() / pairs)
    bound = float(0.5 * (wrong[1:] * right[1:]).sum() / pairs)  # bin 0 holds exact zeros: exact ties
    return estimate, bound


class StreamingClassificationMetrics(StreamingMetrics):
    r"""Streaming accuracy, ECE/MCE/RMSCE, Brier score, NLL and histogram misclassification AUROC.

    Definitions are those of :mod:`mcdrop.metrics` (see the module docstring for exactness and the
    AUROC error bound): top-label confidence in ``n_bins`` equal-width bins closed on the right (a
    confidence of 1.0 is in the last bin), Brier's multiclass score, the NLL clamped at the machine
    epsilon of the probabilities' dtype, and the misclassification AUROC of an uncertainty score
    (predictive entropy, and mutual information when given).

    Memory: ``3 · n_bins + 4 · (n_score_bins + 1)`` numbers plus a few sums, whatever ``n``.

    Args:
        n_bins: Number of calibration bins (default 15, as :func:`~mcdrop.metrics.expected_calibration_error`).
        n_score_bins: Number of log-spaced bins of the uncertainty histograms (default 2048); more bins
            tighten the AUROC error bound.
        n_classes: Number of classes; ``None`` (default) takes it from the first update.

    Example:
        >>> import torch
        >>> from mcdrop.metrics import brier_score, negative_log_likelihood
        >>> from mcdrop.metrics.streaming import StreamingClassificationMetrics
        >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
        >>> labels = torch.tensor([0, 1, 1, 0])
        >>> acc = StreamingClassificationMetrics(n_bins=5)
        >>> acc.update(probs[:3], labels[:3]); acc.update(probs[3:], labels[3:])
        >>> s = acc.summary()
        >>> round(s["ECE"], 4), s["accuracy"], s["n_inputs"]
        (0.25, 0.75, 4.0)
        >>> abs(s["Brier"] - brier_score(probs, labels)) < 1e-12
        True
        >>> abs(s["NLL"] - negative_log_likelihood(probs, labels)) < 1e-12
        True
    """

    task: ClassVar[str] = "classification"

    # declared statistics (see __init__)
    count: torch.Tensor
    hits: torch.Tensor
    conf_sum: torch.Tensor
    sums: torch.Tensor
    entropy_hist: torch.Tensor
    mi_hist: torch.Tensor
    # declared metadata
    n_classes: int | None
    has_mutual_information: bool | None

    def __init__(self, n_bins: int = 15, n_score_bins: int = 2048, n_classes: int | None = None) -> None:
        super().__init__()
        self.n_bins = check_int(n_bins, "n_bins", minimum=1)
        self.n_score_bins = check_int(n_score_bins, "n_score_bins", minimum=2)
        self._add_metadata(
            "n_classes", None if n_classes is None else check_int(n_classes, "n_classes", minimum=2)
        )
        self._add_metadata("has_mutual_information")
        # calibration bins: inputs, hits and summed confidences per bin
        self._add_state("count", torch.zeros(n_bins, dtype=torch.int64))
        self._add_state("hits", torch.zeros(n_bins, dtype=torch.int64))
        self._add_state("conf_sum", torch.zeros(n_bins, dtype=F64))
        # brier, nll, predictive entropy, mutual information
        self._add_state("sums", torch.zeros(4, dtype=F64))
        # [right, wrong] x bins (bin 0: exact zeros)
        self._add_state("entropy_hist", torch.zeros(2, n_score_bins + 1, dtype=torch.int64))
        self._add_state("mi_hist", torch.zeros(2, n_score_bins + 1, dtype=torch.int64))
        self._edges: tuple[int, torch.Tensor] | None = None  # (n_classes, score edges), a cache

    def config(self) -> dict[str, Any]:
        """The configuration that fixes the shapes of the statistics (see :meth:`StreamingMetrics.config`).

        ``n_classes`` is not part of it: it is metadata (see :meth:`~StreamingMetrics.metadata`),
        learnt from the first update when not given.

        Returns:
            ``{"n_bins": int, "n_score_bins": int}``.

        Example:
            >>> from mcdrop.metrics.streaming import StreamingClassificationMetrics
            >>> StreamingClassificationMetrics().config()
            {'n_bins': 15, 'n_score_bins': 2048}
        """
        return {"n_bins": self.n_bins, "n_score_bins": self.n_score_bins}

    @property
    def n(self) -> int:
        """Number of inputs accumulated so far."""
        return int(self.count.sum())

    def _score_bins(self, scores: torch.Tensor, n_classes: int) -> torch.Tensor:
        """Bin of every score: bin 0 exact zeros, then log-spaced bins up to ln K (left-closed)."""
        if self._edges is None or self._edges[0] != n_classes:
            edges = score_edges(math.log(n_classes), self.n_score_bins, _SCORE_RANGE)
            self._edges = (n_classes, edges)
        return bin_index(scores.cpu(), self._edges[1], "left")

    def _histogram_counts(
        self, hist: torch.Tensor, scores: torch.Tensor, wrong: torch.Tensor, name: str, n_classes: int
    ) -> torch.Tensor:
        """The counts a batch's scores add to ``hist`` (validated; ``hist`` is not changed here)."""
        if scores.shape != wrong.shape:
            raise InvalidInputError(
                f"{name} must have one value per input, shape {tuple(wrong.shape)}; got {tuple(scores.shape)}."
            )
        s = scores.cpu()
        if not bool(torch.isfinite(s).all()):
            raise InvalidInputError(f"{name} contains NaN or infinite values; expected finite scores.")
        index = self._score_bins(s, n_classes) + wrong.cpu().long() * (self.n_score_bins + 1)
        return torch.bincount(index, minlength=hist.numel()).view(hist.shape)

    def update(
        self,
        probs: ArrayLike,
        labels: ArrayLike,
        *,
        entropy: ArrayLike | None = None,
        mutual_information: ArrayLike | None = None,
    ) -> None:
        r"""Add a batch of predictions.

        Args:
            probs: Predicted (mean) probabilities ``(b, K)``, or ``(b,)`` positive-class probabilities.
            labels: Integer labels ``(b,)``.
            entropy: The uncertainty score of each input for the misclassification AUROC, ``(b,)``;
                ``None`` computes the predictive entropy :math:`-\sum_k p_k \ln p_k` of ``probs``.
            mutual_information: Optional second score ``(b,)`` (the epistemic part); give it in
                every update or in none.

        Raises:
            InvalidInputError: Invalid probabilities or labels (as the metric functions), another
                number of classes than before, or ``mutual_information`` given in some updates only.
            NonFiniteError: NaN or infinity in the inputs.

        Example:
            >>> import torch
            >>> from mcdrop.metrics.streaming import StreamingClassificationMetrics
            >>> acc = StreamingClassificationMetrics()
            >>> acc.update(torch.tensor([[0.9, 0.1], [0.5, 0.5]]), torch.tensor([1, 0]))
            >>> acc.n, acc.summary()["accuracy"]
            (2, 0.5)
        """
        # Everything is computed and validated first, then added: a batch that is refused leaves the
        # accumulator as it was.
        data = parse_classification(probs, labels)
        if self.n_classes is not None and data.n_classes != self.n_classes:
            raise InvalidInputError(
                f"this accumulator has seen {self.n_classes} classes; the new batch has {data.n_classes}."
            )
        has_mi = mutual_information is not None
        if self.has_mutual_information is not None and self.has_mutual_information != has_mi and self.n > 0:
            raise InvalidInputError(
                "mutual_information must be given in every update or in none; "
                f"earlier updates {'had' if self.has_mutual_information else 'had no'} it."
            )
        # calibration bins: the code of expected_calibration_error itself
        conf, hit = data.top_label()
        bins = binned_sums(conf, hit, self.n_bins, "uniform")
        # Brier score and NLL: the per-sample terms of brier_score and negative_log_likelihood
        y = data.labels
        if data.positive is not None:
            brier = 2 * (to_f64(data.positive) - to_f64(y)) ** 2
            dtype = data.positive.dtype
        else:
            assert data.probs is not None
            brier = data.sum_of_squares() - 2 * to_f64(data.true_class_prob()) + 1
            dtype = data.probs.dtype
        nll = -torch.log(to_f64(data.true_class_prob()).clamp(min=torch.finfo(dtype).eps))
        wrong = ~hit
        if entropy is None:
            p = data.probs if data.probs is not None else torch.stack([1 - data.positive, data.positive], 1)  # type: ignore[operator]
            entropy = torch.special.entr(to_f64(p).clamp(min=0)).sum(1)
        entropy_t = to_f64(to_tensor(entropy, "entropy"))
        entropy_counts = self._histogram_counts(self.entropy_hist, entropy_t, wrong, "entropy", data.n_classes)
        mi_sum = 0.0
        mi_counts = None
        if mutual_information is not None:
            mi_t = to_f64(to_tensor(mutual_information, "mutual_information"))
            mi_counts = self._histogram_counts(self.mi_hist, mi_t, wrong, "mutual_information", data.n_classes)
            mi_sum = float(mi_t.sum())
        sums = torch.tensor([float(brier.sum()), float(nll.sum()), float(entropy_t.sum()), mi_sum], dtype=F64)
        self.n_classes = data.n_classes
        if self.has_mutual_information is None or self.n == 0:
            self.has_mutual_information = has_mi
        self.count += bins.count.cpu().round().long()
        self.hits += bins.hit_sum.cpu().round().long()
        self.conf_sum += bins.conf_sum.cpu()
        self.entropy_hist += entropy_counts
        if mi_counts is not None:
            self.mi_hist += mi_counts
        self.sums += sums

    def _bins(self) -> Bins:
        return Bins.from_sums(
            uniform_edges(self.n_bins), self.count.to(F64), self.conf_sum, self.hits.to(F64)
        )

    def reliability_table(self) -> ReliabilityTable:
        """The reliability table of everything accumulated (as :func:`~mcdrop.metrics.reliability_table`).

        Returns:
            A :class:`~mcdrop.metrics.ReliabilityTable`; its ``ece`` equals ``summary()["ECE"]``.

        Example:
            >>> import torch
            >>> from mcdrop.metrics.streaming import StreamingClassificationMetrics
            >>> acc = StreamingClassificationMetrics(n_bins=5)
            >>> acc.update(torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]]),
            ...            torch.tensor([0, 1, 1, 0]))
            >>> acc.reliability_table().count.tolist()
            [0, 0, 1, 2, 1]
        """
        return ReliabilityTable(**table_columns(self._bins()))

    def summary(self) -> dict[str, float]:
        """The metrics of everything accumulated so far.

        Returns:
            ``{"accuracy", "NLL", "Brier", "ECE", "MCE", "RMSCE",
            "misclassification AUROC (entropy)", "misclassification AUROC (entropy) error bound",
            the same two for "(MI)" when mutual information was given, "mean predictive entropy",
            "mean mutual information" (when given), "n_inputs", "n_samples" (when known)}``. The
            AUROC is NaN when all predictions are right or all wrong; everything is NaN before the
            first update.

        Example:
            >>> import torch
            >>> from mcdrop.metrics.streaming import StreamingClassificationMetrics
            >>> acc = StreamingClassificationMetrics()
            >>> acc.update(torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]]), torch.tensor([0, 1, 1]),
            ...            entropy=torch.tensor([0.3, 0.7, 0.5]))
            >>> s = acc.summary()
            >>> s["misclassification AUROC (entropy)"], s["misclassification AUROC (entropy) error bound"]
            (1.0, 0.0)
        """
        n = self.n
        nan = math.nan
        out: dict[str, float] = {}
        if n == 0:
            out.update({k: nan for k in ("accuracy", "NLL", "Brier", "ECE", "MCE", "RMSCE")})
        else:
            bins = self._bins()
            out["accuracy"] = float(self.hits.sum()) / n
            out["NLL"] = float(self.sums[1] / n)
            out["Brier"] = float(self.sums[0] / n)
            out["ECE"] = calibration_error(bins, "l1")
            out["MCE"] = calibration_error(bins, "max")
            out["RMSCE"] = calibration_error(bins, "l2")
        auroc, bound = _histogram_auroc(self.entropy_hist)
        out["misclassification AUROC (entropy)"] = auroc
        out["misclassification AUROC (entropy) error bound"] = bound
        if self.has_mutual_information:
            auroc, bound = _histogram_auroc(self.mi_hist)
            out["misclassification AUROC (MI)"] = auroc
            out["misclassification AUROC (MI) error bound"] = bound
        out["mean predictive entropy"] = float(self.sums[2] / n) if n else nan
        if self.has_mutual_information:
            out["mean mutual information"] = float(self.sums[3] / n) if n else nan
        out["n_inputs"] = float(n)
        if self.n_samples is not None:
            out["n_samples"] = float(self.n_samples)
        return out


# ----------------------------------------------------------------------------------------------
# regression
# ----------------------------------------------------------------------------------------------
class StreamingRegressionMetrics(StreamingMetrics):
    r"""Streaming RMSE, MAE, Gaussian NLL, CRPS, sharpness, PICP/MPIW and the calibration curve.

    Definitions are those of :mod:`mcdrop.metrics.regression` for Gaussian predictions
    :math:`\mathcal{N}(\mu_i, \sigma_i^2)`; every element of a multi-output prediction counts as one
    prediction, as there. PICP and MPIW are kept at the fixed ``levels``; the interval calibration
    curve at ``n_curve_levels`` levels ``linspace(0, 1, n_curve_levels)`` gives MACE, RMSCE and the
    miscalibration area exactly (the curve is a vector of counts). When some ``std`` is not
    positive, the Gaussian metrics are NaN (as in :func:`mcdrop.report`), RMSE and MAE are not.

    Args:
        levels: Nominal coverages in ``(0, 1)`` at which PICP and MPIW are kept (default
            0.5, 0.8, 0.9, 0.95, 0.99).
        n_curve_levels: Number of levels of the calibration curve (default 100, as
            :func:`~mcdrop.metrics.calibration_curve`).

    Example:
        >>> import torch
        >>> from mcdrop.metrics import gaussian_nll, picp
        >>> from mcdrop.metrics.streaming import StreamingRegressionMetrics
        >>> mean, std = torch.zeros(4), torch.ones(4)
        >>> y = torch.tensor([0.5, -1.5, 1.9, 2.5])
        >>> acc = StreamingRegressionMetrics(levels=[0.95])
        >>> acc.update(mean[:2], std[:2], y[:2]); acc.update(mean[2:], std[2:], y[2:])
        >>> s = acc.summary()
        >>> s["PICP (95%)"] == picp(mean, std, y), abs(s["Gaussian NLL"] - gaussian_nll(mean, std, y)) < 1e-12
        (True, True)
    """

    task: ClassVar[str] = "regression"

    # declared statistics (see __init__)
    counts: torch.Tensor
    sums: torch.Tensor
    inside: torch.Tensor
    curve_inside: torch.Tensor

    def __init__(self, levels: Sequence[float] = _DEFAULT_LEVELS, n_curve_levels: int = 100) -> None:
        super().__init__()
        if isinstance(levels, (int, float)):
            levels = [levels]
        self.levels = tuple(
            check_real(level, "levels", low=0.0, high=1.0, low_open=True, high_open=True) for level in levels
        )
        if not self.levels:
            raise InvalidInputError("levels must hold at least one nominal coverage in (0, 1).")
        self.n_curve_levels = check_int(n_curve_levels, "n_curve_levels", minimum=2)
        # rows, elements, elements with std <= 0
        self._add_state("counts", torch.zeros(3, dtype=torch.int64))
        # squared error, absolute error, Gaussian NLL, CRPS, variance, std
        self._add_state("sums", torch.zeros(6, dtype=F64))
        # targets inside the central interval of each level, and of each level of the curve
        self._add_state("inside", torch.zeros(len(self.levels), dtype=torch.int64))
        self._add_state("curve_inside", torch.zeros(self.n_curve_levels, dtype=torch.int64))
        z_lo, z_hi = central_quantiles(torch.tensor(self.levels, dtype=F64))
        self._z = [(float(lo), float(hi)) for lo, hi in zip(z_lo, z_hi, strict=True)]
        self._mpiw_z = 2 * z_hi
        self._expected = torch.as_tensor(np.linspace(0.0, 1.0, self.n_curve_levels), dtype=F64)
        self._curve_lo, self._curve_hi = central_quantiles(self._expected)

    def config(self) -> dict[str, Any]:
        """The configuration that fixes the shapes of the statistics (see :meth:`StreamingMetrics.config`).

        Returns:
            ``{"levels": list of floats, "n_curve_levels": int}``; ``levels`` as validated by the
            constructor (a single float becomes a one-element list).

        Example:
            >>> from mcdrop.metrics.streaming import StreamingRegressionMetrics
            >>> StreamingRegressionMetrics(levels=[0.9]).config()
            {'levels': [0.9], 'n_curve_levels': 100}
        """
        return {"levels": list(self.levels), "n_curve_levels": self.n_curve_levels}

    @property
    def n(self) -> int:
        """Number of inputs (rows) accumulated so far."""
        return int(self.counts[0])

    @property
    def n_elements(self) -> int:
        """Number of predictions (elements; rows times outputs) accumulated so far."""
        return int(self.counts[1])

    def update(self, mean: ArrayLike, std: ArrayLike, targets: ArrayLike) -> None:
        """Add a batch of Gaussian predictions and their targets.

        Args:
            mean: Predictive means, ``(b,)`` or ``(b, d)``.
            std: Predictive (total) standard deviations, same shape; non-positive values make the
                Gaussian metrics NaN instead of raising, so a long run is not lost to one input.
            targets: Targets, same shape (or the same number of elements).

        Raises:
            InvalidInputError: Mismatched shapes or empty input.
            NonFiniteError: NaN or infinity in the inputs.

        Example:
            >>> import torch
            >>> from mcdrop.metrics.streaming import StreamingRegressionMetrics
            >>> acc = StreamingRegressionMetrics()
            >>> acc.update(torch.tensor([1.0, 2.0, 3.0]), torch.ones(3), torch.tensor([1.0, 2.0, 5.0]))
            >>> round(acc.summary()["RMSE"], 4)
            1.1547
        """
        m = to_tensor(mean, "mean")
        s = to_tensor(std, "std")
        y = to_tensor(targets, "targets")
        if y.shape != m.shape and y.numel() == m.numel():
            y = y.reshape(m.shape)
        if s.shape != m.shape:
            raise InvalidInputError(
                f"mean and std must have the same shape; got {tuple(m.shape)} and {tuple(s.shape)}."
            )
        mu, _, y64 = parse_regression(m, None, y)
        sigma = parse_regression(s, None, None)[0].to(mu.device)
        assert y64 is not None
        rows = int(m.shape[0]) if m.dim() > 0 else 1
        err = mu - y64
        ok = sigma > 0
        n_bad = int((~ok).sum())
        if n_bad:
            mu, sigma, y_ok = mu[ok], sigma[ok], y64[ok]
        else:
            y_ok = y64
        # the per-element terms of gaussian_nll, crps_gaussian, picp and calibration_curve
        nll = nll_terms(mu, sigma, y_ok)
        crps = crps_terms(mu, sigma, y_ok)
        r = (mu - y_ok) / sigma
        inside = [int(((r >= lo) & (r <= hi)).sum()) for lo, hi in self._z]
        curve = count_between(torch.sort(r).values.cpu(), self._curve_lo, self._curve_hi)
        self.counts += torch.tensor([rows, err.numel(), n_bad], dtype=torch.int64)
        self.sums += torch.tensor(
            [
                float((err * err).sum()),
                float(err.abs().sum()),
                float(nll.sum()),
                float(crps.sum()),
                float((sigma * sigma).sum()),
                float(sigma.sum()),
            ],
            dtype=F64,
        )
        self.inside += torch.tensor(inside, dtype=torch.int64)
        self.curve_inside += curve

    def calibration_curve(self) -> CalibrationCurve:
        """The interval calibration curve of everything accumulated (as :func:`~mcdrop.metrics.calibration_curve`).

        Returns:
            A :class:`~mcdrop.metrics.CalibrationCurve` ``(expected, observed)``; NaN observed
            proportions when some std was not positive.

        Example:
            >>> import torch
            >>> from mcdrop.metrics.streaming import StreamingRegressionMetrics
            >>> acc = StreamingRegressionMetrics(n_curve_levels=3)
            >>> acc.update(torch.zeros(4), torch.ones(4), torch.tensor([-2.0, -0.1, 0.3, 1.2]))
            >>> acc.calibration_curve().observed.tolist()
            [0.0, 0.5, 1.0]
        """
        n = self.n_elements
        if n == 0 or int(self.counts[2]) > 0:
            observed = np.full(self.n_curve_levels, np.nan)
        else:
            observed = (self.curve_inside.to(F64) / n).numpy()
        return CalibrationCurve(expected=self._expected.numpy(), observed=observed)

    def summary(self) -> dict[str, float]:
        """The metrics of everything accumulated so far.

        Returns:
            ``{"RMSE", "MAE", "Gaussian NLL", "CRPS", "PICP (p%)" and "MPIW (p%)" per level,
            "miscalibration area", "MACE", "RMSCE", "sharpness", "n_inputs", "n_samples" (when
            known)}``; the Gaussian metrics are NaN when some std was not positive, and everything
            is NaN before the first update.

        Example:
            >>> import torch
            >>> from mcdrop.metrics.streaming import StreamingRegressionMetrics
            >>> acc = StreamingRegressionMetrics(levels=[0.95])
            >>> acc.update(torch.zeros(2), torch.ones(2), torch.tensor([1.0, -1.0]))
            >>> acc.summary()["MAE"], acc.summary()["PICP (95%)"]
            (1.0, 1.0)
        """
        n = self.n_elements
        nan = math.nan
        out: dict[str, float] = {}
        out["RMSE"] = math.sqrt(float(self.sums[0]) / n) if n else nan
        out["MAE"] = float(self.sums[1]) / n if n else nan
        gaussian_ok = n > 0 and int(self.counts[2]) == 0
        out["Gaussian NLL"] = float(self.sums[2]) / n if gaussian_ok else nan
        out["CRPS"] = float(self.sums[3]) / n if gaussian_ok else nan
        for i, level in enumerate(self.levels):
            out[f"PICP ({level * 100:g}%)"] = float(self.inside[i].to(F64) / n) if gaussian_ok else nan
        for i, level in enumerate(self.levels):
            mpiw = float(self._mpiw_z[i] * (self.sums[5] / n)) if gaussian_ok else nan
            out[f"MPIW ({level * 100:g}%)"] = mpiw
        if gaussian_ok:
            expected = self._expected
            observed = self.curve_inside.to(F64) / n
            gap = observed - expected
            out["miscalibration area"] = curve_area(expected, observed)
            out["MACE"] = float(gap.abs().mean())
            out["RMSCE"] = float(torch.sqrt((gap**2).mean()))
            out["sharpness"] = float(torch.sqrt(self.sums[4] / n))
        else:
            for key in ("miscalibration area", "MACE", "RMSCE", "sharpness"):
                out[key] = nan
        out["n_inputs"] = float(self.n)
        if self.n_samples is not None:
            out["n_samples"] = float(self.n_samples)
        return out
