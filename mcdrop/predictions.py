"""Predictions built from the sufficient statistics of N stochastic forward passes.

Definitions (natural log throughout; ``p_t`` is the class-probability vector of sample ``t`` of N,
``p̄ = (1/N) Σ_t p_t``; for regression ``y_t`` is sample ``t``'s output):

Classification (:class:`ClassificationPrediction`)
    * ``probs`` = p̄, the mean of the per-sample softmax (not the softmax of the mean logits).
    * ``predicted`` = argmax p̄; ``confidence`` = max p̄.
    * ``predictive_entropy`` = H[p̄] = -Σ_k p̄_k log p̄_k (total uncertainty).
    * ``expected_entropy`` = (1/N) Σ_t H[p_t] (the aleatoric part).
    * ``mutual_information`` = H[p̄] - (1/N) Σ_t H[p_t] ≥ 0 (the epistemic part, BALD).
    * ``variation_ratio`` = 1 - (number of samples voting for the modal class) / N.
    * ``std`` = per-class standard deviation of p_t across the N samples (divides by N).

Regression (:class:`RegressionPrediction`)
    * ``mean`` = (1/N) Σ_t y_t.
    * ``variance`` = (1/N) Σ_t (y_t - mean)² — the epistemic variance (divides by N).
    * ``aleatoric_variance`` = (1/N) Σ_t σ²_t when the model outputs a variance σ²_t per sample.
    * ``total_variance`` = ``variance`` + ``aleatoric_variance`` (law of total variance).
    * ``interval(level)`` = mean ± z_{(1+level)/2} · sqrt(total_variance): the central Gaussian interval.

Monte Carlo standard errors (:meth:`Prediction.standard_error`): how far each statistic of N passes
may lie from its value at infinitely many passes (the randomness of the dropout masks only; the
model and the input are fixed). Computed from statistics streamed while sampling, never from kept
samples, so memory does not grow with N; NaN where N < 2. With ``s²`` the unbiased sample variance
(divides by N - 1) and ``m_j = (1/N) Σ_t (x_t - x̄)^j`` the central sample moments:

    * ``probs``, ``confidence``, ``expected_entropy``, ``mean``, ``aleatoric_variance`` (means of
      the N samples): ``sqrt(s² / N)``, per class for ``probs``; ``confidence`` takes the ``probs``
      standard error of the top class (its choice not counted).
    * ``variance`` (regression) and the per-class variance behind ``std``: the large-sample formula
      ``Var(s²) = μ4/N - σ⁴ (N - 3)/(N (N - 1))`` with the plug-ins ``m4`` and ``m2²``, scaled to
      the reported variance (which divides by N): ``SE = (N - 1)/N · sqrt(max(m4 - m2² (N - 3)/(N - 1), 0)/N)``;
      ``std``: the delta method, ``SE(variance) / (2 std)`` (0 where std is 0 and N ≥ 2).
    * ``predictive_entropy`` and ``mutual_information``: a grouped (batch-means) delete-a-group
      jackknife. Sample ``t`` of an input joins group ``t mod G`` (``G = 20``,
      ``mcdrop._statistics.JACKKNIFE_GROUPS``); the sums of ``p_t`` and of ``H[p_t]`` per group are
      streamed (memory ``G · (K + 1)`` numbers per input, or per position of a map), and the
      statistic is recomputed leaving out one group at a time (Busing et al.'s delete-m_g jackknife,
      as groups may differ in size by one; with N ≤ G each group holds one sample: the delete-one
      jackknife).

Small-N behaviour: ``sqrt(s² / N)`` is nearly unbiased for the means (a ±2 SE interval covers
about 94% at N = 20 for well-behaved samples, less for skewed ones). The variance's standard error
rests on a fourth moment, which at small N is noisy and biased low for heavy-tailed samples, so ±2 SE
covers less than 95% at N = 20. The plug-in ``H[p̄]`` is biased low: to first order
``E H[p̄] - H[E p] = -Σ_k Var(p_tk) / (2 N E p_k)`` (= ``-tr(Σ diag(1/p))/(2N)``, Σ the per-pass
covariance of ``p_t``), and so is the mutual information (the expected entropy is unbiased). The
bias is O(1/N) while the standard error is O(1/√N), so it matters at small N and small standard
errors; it can be estimated as ``-Σ_k std_k² / (2 N probs_k)``. The standard errors do not include
it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import torch

from mcdrop._checks import check_real
from mcdrop._statistics import (
    ClassificationStats,
    RegressionStats,
    SampleStore,
    grouped_jackknife_se,
    mean_standard_error,
    variance_standard_error,
)
from mcdrop.errors import InvalidInputError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["Prediction", "ClassificationPrediction", "RegressionPrediction", "concat_predictions", "select_rows"]


def _per_input(t: torch.Tensor | None, name: str) -> Any:
    if t is None:
        return None
    t = t.detach().cpu()
    if t.dim() != 1:
        raise InvalidInputError(
            f"to_frame() makes one row per input, but {name} has shape {tuple(t.shape)} per batch "
            "(e.g. a segmentation map). Reduce it first, e.g. pred.predictive_entropy.mean((1, 2))."
        )
    return t.numpy()


@dataclass
class Prediction:
    """Common base of the prediction classes: the number of samples, kept samples and targets.

    Attributes:
        n_samples: Number of stochastic forward passes per input.
        samples: The raw selected model outputs, samples-first ``(N, batch, ...)``, when kept
            (``keep_samples=True``), else ``None``.
        targets: The targets collected by :meth:`mcdrop.MCDropout.predict_loader`, else ``None``.
        deterministic: The model's prediction with dropout off (one pass in eval mode, see
            :meth:`mcdrop.MCDropout.predict_deterministic`) of the same inputs, when
            ``predict_loader(..., deterministic=True)`` made one, else ``None`` (keyword-only).
        samples_per_input: With adaptive sampling (``MCDropout(n_samples="auto")``), how many
            samples each input received, an int64 tensor ``(batch,)``; ``n_samples`` is then the
            largest of them. ``None`` when every input has ``n_samples`` (keyword-only).
        max_samples: With adaptive sampling, the most samples an input could receive (an input
            that reached it stopped before its standard error met the tolerance), else ``None``.

    Example:
        >>> import torch, mcdrop
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
        >>> pred = mcdrop.MCDropout(net.eval(), n_samples=4, keep_samples=True, seed=0).predict(torch.randn(5, 3))
        >>> isinstance(pred, mcdrop.Prediction), pred.n_samples, pred.samples.shape, len(pred)
        (True, 4, torch.Size([4, 5, 2]), 5)
    """

    n_samples: int
    samples: torch.Tensor | None = field(default=None, repr=False)
    targets: torch.Tensor | None = field(default=None, repr=False)
    deterministic: Prediction | None = field(default=None, repr=False, kw_only=True)
    samples_per_input: torch.Tensor | None = field(default=None, repr=False, kw_only=True)
    max_samples: int | None = field(default=None, kw_only=True)

    @property
    def task(self) -> str:
        """``"classification"`` or ``"regression"``."""
        raise NotImplementedError

    def __len__(self) -> int:
        return int(self._first().shape[0])

    def _first(self) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def _standard_errors(self) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    def standard_error(self, name: str) -> torch.Tensor:
        """The Monte Carlo standard error of a statistic, per input, shaped like the statistic.

        How far the statistic of these N passes may lie from its value at infinitely many passes
        (the randomness of the dropout masks; the module docs and ``docs/outputs.md`` give each
        estimator and its bias at small N). Computed from statistics streamed while sampling, so
        it needs no kept samples. NaN where N < 2.

        Args:
            name: The statistic: for a classifier ``"probs"``, ``"confidence"``, ``"std"``,
                ``"predictive_entropy"``, ``"expected_entropy"`` or ``"mutual_information"``; for
                a regression model ``"mean"``, ``"variance"``, ``"std"`` or (with an aleatoric
                head) ``"aleatoric_variance"``.

        Returns:
            A tensor of the statistic's shape.

        Raises:
            InvalidInputError: ``name`` is not a statistic with a standard error, or this
                prediction carries no standard errors (built by hand rather than by sampling).

        Example:
            >>> import torch, mcdrop
            >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
            >>> pred = mcdrop.MCDropout(net.eval(), n_samples=50, seed=0).predict(torch.randn(5, 3))
            >>> se = pred.standard_error("probs")
            >>> se.shape == pred.probs.shape, pred.standard_error("mutual_information").shape
            (True, torch.Size([5]))
        """
        available = self._standard_errors()
        if name not in available:
            raise InvalidInputError(
                f"no standard error for {name!r} of a {self.task} prediction; available: "
                f"{', '.join(repr(n) for n in available)}."
            )
        se = available[name]()
        if se is None:
            raise InvalidInputError(
                f"this prediction carries no standard error for {name!r}: it was not built from the "
                "streamed statistics of sampling (e.g. made by hand), or it is a dense prediction (a "
                "class vector per position, such as a segmentation map), for which the higher moments "
                "and group sums behind the standard errors of 'std', 'predictive_entropy' and "
                "'mutual_information' are not streamed (they would take 22 times the memory of the "
                "probabilities). Predictions of MCDropout.predict and predict_loader carry them for one "
                "class vector per input."
            )
        return se

    def cpu(self) -> Prediction:
        """Return a copy with every tensor moved to the CPU.

        Returns:
            A prediction of the same class whose tensor fields (statistics, kept samples, targets)
            are on the CPU; the other fields are shared with this one.

        Example:
            >>> import torch, mcdrop
            >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
            >>> pred = mcdrop.MCDropout(net.eval(), n_samples=4, seed=0).predict(torch.randn(5, 3))
            >>> on_cpu = pred.cpu()
            >>> on_cpu.probs.device.type, torch.equal(on_cpu.probs, pred.probs)
            ('cpu', True)
        """
        moved = {
            f.name: getattr(self, f.name).cpu()
            for f in fields(self)
            if isinstance(getattr(self, f.name), (torch.Tensor, Prediction))
        }
        return replace(self, **moved)


@dataclass
class ClassificationPrediction(Prediction):
    """MC dropout prediction of a classifier (see the module docs for exact definitions).

    Per-input tensors have the batch first; ``probs`` and ``std`` keep the class dimension where the
    model had it (``(batch, K)``, or ``(batch, K, H, W)`` for segmentation). ``n_samples``,
    ``samples`` and ``targets`` are those of :class:`Prediction`.

    Attributes:
        probs: The mean class probabilities p̄ over the N samples.
        std: The per-class standard deviation of the sample probabilities (divides by N).
        predictive_entropy: H[p̄], the total uncertainty, per input.
        expected_entropy: The mean entropy of the sample probabilities (the aleatoric part), per input.
        variation_ratio: 1 - (samples voting for the modal class) / N, per input.
        class_dim: The class dimension of ``probs`` and ``std``.
        probs_se: The Monte Carlo standard error of ``probs`` (read it with
            :meth:`standard_error`), or ``None`` when not built by sampling.
        std_se: The Monte Carlo standard error of ``std``, or ``None``.
        predictive_entropy_se: The Monte Carlo standard error of ``predictive_entropy``, or ``None``.
        expected_entropy_se: The Monte Carlo standard error of ``expected_entropy``, or ``None``.
        mutual_information_se: The Monte Carlo standard error of ``mutual_information``, or ``None``.
        output_type: What the kept ``samples`` are: ``"logits"``, ``"probs"`` or ``"log_probs"``
            (as the wrapper read the model's output), or ``None`` when not known (built by hand).

    Example:
        >>> import torch, mcdrop
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(),
        ...                           torch.nn.Dropout(0.3), torch.nn.Linear(32, 3)).eval()
        >>> pred = mcdrop.MCDropout(net, n_samples=30, seed=0).predict(torch.randn(5, 4))
        >>> pred.probs.shape, pred.predicted.shape
        (torch.Size([5, 3]), torch.Size([5]))
        >>> bool((pred.mutual_information >= 0).all())
        True
    """

    probs: torch.Tensor = field(default=None, repr=False)  # type: ignore[assignment]
    std: torch.Tensor = field(default=None, repr=False)  # type: ignore[assignment]
    predictive_entropy: torch.Tensor = field(default=None, repr=False)  # type: ignore[assignment]
    expected_entropy: torch.Tensor = field(default=None, repr=False)  # type: ignore[assignment]
    variation_ratio: torch.Tensor = field(default=None, repr=False)  # type: ignore[assignment]
    class_dim: int = 1
    probs_se: torch.Tensor | None = field(default=None, repr=False)
    std_se: torch.Tensor | None = field(default=None, repr=False)
    predictive_entropy_se: torch.Tensor | None = field(default=None, repr=False)
    expected_entropy_se: torch.Tensor | None = field(default=None, repr=False)
    mutual_information_se: torch.Tensor | None = field(default=None, repr=False)
    output_type: str | None = None

    @property
    def task(self) -> str:
        """Always ``"classification"``."""
        return "classification"

    def _first(self) -> torch.Tensor:
        return self.probs

    @property
    def predicted(self) -> torch.Tensor:
        """The class with the highest mean probability, ``argmax_k p̄_k``."""
        return self.probs.argmax(self.class_dim)

    @property
    def confidence(self) -> torch.Tensor:
        """The highest mean probability, ``max_k p̄_k``."""
        return self.probs.amax(self.class_dim)

    @property
    def mutual_information(self) -> torch.Tensor:
        """H[p̄] - E_t H[p_t], clamped at 0 against rounding: the epistemic uncertainty (BALD)."""
        return (self.predictive_entropy - self.expected_entropy).clamp(min=0)

    @property
    def n_classes(self) -> int:
        """Number of classes K."""
        return int(self.probs.shape[self.class_dim])

    def _standard_errors(self) -> dict[str, Any]:
        def confidence() -> torch.Tensor | None:
            if self.probs_se is None:
                return None
            top = self.predicted.unsqueeze(self.class_dim)
            return self.probs_se.gather(self.class_dim, top).squeeze(self.class_dim)

        return {
            "probs": lambda: self.probs_se,
            "confidence": confidence,
            "std": lambda: self.std_se,
            "predictive_entropy": lambda: self.predictive_entropy_se,
            "expected_entropy": lambda: self.expected_entropy_se,
            "mutual_information": lambda: self.mutual_information_se,
        }

    @classmethod
    def from_stats(
        cls, stats: ClassificationStats, n_samples: int, store: SampleStore | None, class_dim: int
    ) -> ClassificationPrediction:
        """Finish the running statistics into a prediction (what :class:`mcdrop.MCDropout` returns).

        Args:
            stats: The running statistics of every sample of every input.
            n_samples: The number of samples N the statistics hold per input.
            store: The kept samples (``keep_samples=True``), else ``None``.
            class_dim: The class dimension of one model output ``(batch, ...)``; negative counts
                from the end.

        Returns:
            The prediction, with ``probs`` and ``std`` holding the class dimension at ``class_dim``.

        Example:
            >>> import torch
            >>> from mcdrop import ClassificationPrediction
            >>> from mcdrop._statistics import ClassificationStats
            >>> stats = ClassificationStats("logits", class_dim=1)
            >>> logits = torch.tensor([[[0.0, 0.0], [9.0, -9.0]]] * 3)  # 3 samples of 2 inputs, 2 classes
            >>> stats.update(0, 2, logits, batch_size=2)
            >>> pred = ClassificationPrediction.from_stats(stats, n_samples=3, store=None, class_dim=1)
            >>> pred.probs.round(decimals=3).tolist(), pred.variation_ratio.tolist()
            ([[0.5, 0.5], [1.0, 0.0]], [0.0, 0.0])
        """
        assert stats.probs.mean is not None and stats.entropy.mean is not None and stats.votes is not None
        mean = stats.probs.mean.clamp(min=0)
        mean = mean / mean.sum(-1, keepdim=True)
        std = stats.probs.variance.sqrt()
        predictive = torch.special.entr(mean).sum(-1)
        expected = stats.entropy.mean.clamp(min=0)
        ratio = 1.0 - stats.votes.amax(-1).to(mean.dtype) / n_samples
        out_dim = class_dim if class_dim >= 0 else mean.dim() + class_dim
        n = n_samples
        std_se = None
        if stats.probs.higher:  # not streamed for dense outputs (see ClassificationStats._dense)
            std_se = variance_standard_error(stats.probs, n)
            std_se = torch.where(std > 0, std_se / (2 * std), std_se * 0)  # NaN stays NaN (N < 2)
        se: dict[str, torch.Tensor | None] = {"predictive_entropy_se": None, "mutual_information_se": None}
        if stats.probs_groups.sums is not None and stats.entropy_groups.sums is not None:
            groups_p, groups_h = stats.probs_groups.sums, stats.entropy_groups.sums

            def plug_in(p: torch.Tensor) -> torch.Tensor:
                return torch.special.entr(p.clamp(min=0)).sum(-1)

            se["predictive_entropy_se"] = grouped_jackknife_se(plug_in, [groups_p], n)
            se["mutual_information_se"] = grouped_jackknife_se(
                lambda p, h: plug_in(p) - h, [groups_p, groups_h], n
            )
        return cls(
            n_samples=n_samples,
            samples=None if store is None else store.data,
            probs=mean.movedim(-1, out_dim),
            std=std.movedim(-1, out_dim),
            predictive_entropy=predictive,
            expected_entropy=expected,
            variation_ratio=ratio,
            class_dim=out_dim,
            probs_se=mean_standard_error(stats.probs, n).movedim(-1, out_dim),
            std_se=None if std_se is None else std_se.movedim(-1, out_dim),
            expected_entropy_se=mean_standard_error(stats.entropy, n),
            output_type=stats.output_type,
            **se,
        )

    def to_frame(self, *, standard_errors: bool = False) -> pd.DataFrame:
        """One row per input: prediction, confidence, the uncertainty scores, target and correctness.

        Args:
            standard_errors: Add the Monte Carlo standard errors (:meth:`standard_error`) as
                ``<name>_se`` columns after the others: ``confidence_se``,
                ``predictive_entropy_se``, ``expected_entropy_se``, ``mutual_information_se``,
                ``prob_0_se`` ... ``prob_{K-1}_se``.

        Returns:
            A pandas DataFrame with the columns ``predicted``, ``confidence``,
            ``predictive_entropy``, ``expected_entropy``, ``mutual_information`` and
            ``variation_ratio``; ``n_samples`` (samples of each input) with adaptive sampling;
            ``target`` and ``correct`` when there are 1-d targets; then
            ``prob_0`` ... ``prob_{K-1}``; then the standard errors when asked.

        Raises:
            InvalidInputError: A statistic has more than one value per input (a map), or standard
                errors were asked of a prediction that carries none.

        Example:
            >>> import torch, mcdrop
            >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5),
            ...                           torch.nn.Linear(8, 2)).eval()
            >>> df = mcdrop.MCDropout(net, n_samples=10, seed=0).predict(torch.randn(3, 4)).to_frame()
            >>> list(df.columns)[:3]
            ['predicted', 'confidence', 'predictive_entropy']
        """
        import pandas as pd

        data = {
            "predicted": _per_input(self.predicted, "predicted"),
            "confidence": _per_input(self.confidence, "confidence"),
            "predictive_entropy": _per_input(self.predictive_entropy, "predictive_entropy"),
            "expected_entropy": _per_input(self.expected_entropy, "expected_entropy"),
            "mutual_information": _per_input(self.mutual_information, "mutual_information"),
            "variation_ratio": _per_input(self.variation_ratio, "variation_ratio"),
        }
        if self.samples_per_input is not None:
            data["n_samples"] = self.samples_per_input.detach().cpu().numpy()
        if self.targets is not None and self.targets.dim() == 1:
            target = self.targets.detach().cpu()
            data["target"] = target.numpy()
            data["correct"] = (self.predicted.detach().cpu() == target).numpy()
        probs = self.probs.detach().cpu()
        for k in range(self.n_classes):
            data[f"prob_{k}"] = probs.select(self.class_dim, k).numpy()
        if standard_errors:
            for name in ("confidence", "predictive_entropy", "expected_entropy", "mutual_information"):
                data[f"{name}_se"] = _per_input(self.standard_error(name), f"{name}_se")
            probs_se = self.standard_error("probs").detach().cpu()
            for k in range(self.n_classes):
                data[f"prob_{k}_se"] = probs_se.select(self.class_dim, k).numpy()
        return pd.DataFrame(data)


@dataclass
class RegressionPrediction(Prediction):
    """MC dropout prediction of a regression model (see the module docs for exact definitions).

    Per-input tensors have the batch first and the shape of one model output. ``n_samples``,
    ``samples`` and ``targets`` are those of :class:`Prediction`.

    Attributes:
        mean: The mean output over the N samples.
        variance: The variance of the sample outputs (divides by N): the epistemic variance.
        aleatoric_variance: The mean of the variances the model outputs (``aleatoric=``), else
            ``None``.
        mean_se: The Monte Carlo standard error of ``mean`` (read it with :meth:`standard_error`),
            or ``None`` when not built by sampling.
        variance_se: The Monte Carlo standard error of ``variance``, or ``None``.
        aleatoric_variance_se: The Monte Carlo standard error of ``aleatoric_variance``, or
            ``None``.

    Example:
        >>> import torch, mcdrop
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.ReLU(),
        ...                           torch.nn.Dropout(0.2), torch.nn.Linear(32, 1)).eval()
        >>> pred = mcdrop.MCDropout(net, n_samples=50, task="regression", seed=0).predict(torch.randn(4, 2))
        >>> pred.mean.shape, bool((pred.std > 0).all())
        (torch.Size([4, 1]), True)
        >>> low, high = pred.interval(0.9)
        >>> bool((low < pred.mean).all() and (pred.mean < high).all())
        True
    """

    mean: torch.Tensor = field(default=None, repr=False)  # type: ignore[assignment]
    variance: torch.Tensor = field(default=None, repr=False)  # type: ignore[assignment]
    aleatoric_variance: torch.Tensor | None = field(default=None, repr=False)
    mean_se: torch.Tensor | None = field(default=None, repr=False)
    variance_se: torch.Tensor | None = field(default=None, repr=False)
    aleatoric_variance_se: torch.Tensor | None = field(default=None, repr=False)

    @property
    def task(self) -> str:
        """Always ``"regression"``."""
        return "regression"

    def _standard_errors(self) -> dict[str, Any]:
        def std() -> torch.Tensor | None:
            if self.variance_se is None:
                return None
            sd = self.std
            return torch.where(sd > 0, self.variance_se / (2 * sd), self.variance_se * 0)

        out: dict[str, Any] = {
            "mean": lambda: self.mean_se,
            "variance": lambda: self.variance_se,
            "std": std,
        }
        if self.aleatoric_variance is not None:
            out["aleatoric_variance"] = lambda: self.aleatoric_variance_se
        return out

    def _first(self) -> torch.Tensor:
        return self.mean

    @property
    def std(self) -> torch.Tensor:
        """sqrt(variance): the epistemic standard deviation."""
        return self.variance.sqrt()

    @property
    def total_variance(self) -> torch.Tensor:
        """Epistemic plus aleatoric variance (just the epistemic one without an aleatoric head)."""
        if self.aleatoric_variance is None:
            return self.variance
        return self.variance + self.aleatoric_variance

    @property
    def total_std(self) -> torch.Tensor:
        """sqrt(total_variance)."""
        return self.total_variance.sqrt()

    def interval(self, level: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
        """Central Gaussian interval ``mean ± z · sqrt(total_variance)`` with ``z = Φ⁻¹((1+level)/2)``.

        Args:
            level: Coverage probability in (0, 1).

        Returns:
            ``(lower, upper)`` tensors shaped like ``mean``.

        Example:
            >>> import torch
            >>> from mcdrop import RegressionPrediction
            >>> pred = RegressionPrediction(n_samples=10, mean=torch.tensor([1.0]), variance=torch.tensor([4.0]))
            >>> low, high = pred.interval(0.95)  # 1 ± 1.96 · 2
            >>> round(float(low), 2), round(float(high), 2)
            (-2.92, 4.92)
        """
        level = check_real(level, "level", low=0.0, high=1.0, low_open=True, high_open=True)
        z = NormalDist().inv_cdf((1 + level) / 2)
        half = z * self.total_std
        return self.mean - half, self.mean + half

    @classmethod
    def from_stats(
        cls, stats: RegressionStats, n_samples: int, store: SampleStore | None
    ) -> RegressionPrediction:
        """Finish the running statistics into a prediction (what :class:`mcdrop.MCDropout` returns).

        Args:
            stats: The running statistics of every sample of every input.
            n_samples: The number of samples N the statistics hold per input.
            store: The kept samples (``keep_samples=True``), else ``None``.

        Returns:
            The prediction; ``aleatoric_variance`` is set when the statistics hold a variance output.

        Example:
            >>> import torch
            >>> from mcdrop import RegressionPrediction
            >>> from mcdrop._statistics import RegressionStats
            >>> stats = RegressionStats(aleatoric=None)
            >>> stats.update(0, 2, torch.tensor([[[1.0], [2.0]], [[3.0], [2.0]]]), batch_size=2)  # 2 samples
            >>> pred = RegressionPrediction.from_stats(stats, n_samples=2, store=None)
            >>> pred.mean.tolist(), pred.variance.tolist()
            ([[2.0], [2.0]], [[1.0], [0.0]])
        """
        assert stats.mean.mean is not None
        return cls(
            n_samples=n_samples,
            samples=None if store is None else store.data,
            mean=stats.mean.mean,
            variance=stats.mean.variance,
            aleatoric_variance=None if stats.noise is None else stats.noise.mean,
            mean_se=mean_standard_error(stats.mean, n_samples),
            variance_se=variance_standard_error(stats.mean, n_samples),
            aleatoric_variance_se=None
            if stats.noise is None
            else mean_standard_error(stats.noise, n_samples),
        )

    def to_frame(self, level: float = 0.95, *, standard_errors: bool = False) -> pd.DataFrame:
        """One row per input: mean, std (epistemic, aleatoric, total), interval bounds, target.

        Multi-output models get one column group per output (``mean_0``, ``mean_1``, ...).

        Args:
            level: The coverage of the interval whose bounds are given (``lower_{level}``,
                ``upper_{level}``), in (0, 1).
            standard_errors: Add the Monte Carlo standard errors (:meth:`standard_error`) of the
                mean and the std as ``mean_se`` and ``std_se`` columns after the others
                (``mean_0_se``, ... for multi-output models).

        Returns:
            A pandas DataFrame with the columns ``mean``, ``std``, ``aleatoric_std`` (with an
            aleatoric head), ``total_std``, the interval bounds and ``target`` (with targets); then
            the standard errors when asked; last ``n_samples`` (samples of each input) with
            adaptive sampling.

        Raises:
            InvalidInputError: an output has more than one dimension per input (no row per input),
                or standard errors were asked of a prediction that carries none.

        Example:
            >>> import torch, mcdrop
            >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Dropout(0.2),
            ...                           torch.nn.Linear(8, 1)).eval()
            >>> df = mcdrop.MCDropout(net, n_samples=10, task="regression", seed=0).predict(
            ...     torch.randn(3, 2)).to_frame()
            >>> list(df.columns)[:3]
            ['mean', 'std', 'total_std']
        """
        import pandas as pd

        low, high = self.interval(level)
        columns = {
            "mean": self.mean,
            "std": self.std,
            "aleatoric_std": None if self.aleatoric_variance is None else self.aleatoric_variance.sqrt(),
            "total_std": self.total_std,
            f"lower_{level:g}": low,
            f"upper_{level:g}": high,
            "target": self.targets,
        }
        if standard_errors:
            columns["mean_se"] = self.standard_error("mean")
            columns["std_se"] = self.standard_error("std")
        data: dict[str, Any] = {}
        for name, t in columns.items():
            if t is None:
                continue
            t = t.detach().cpu()
            if t.dim() == 2 and t.shape[1] == 1:
                t = t[:, 0]
            if t.dim() == 1:
                data[name] = t.numpy()
            elif t.dim() == 2:
                base, suffix = (name[:-3], "_se") if name.endswith("_se") else (name, "")
                for j in range(t.shape[1]):
                    data[f"{base}_{j}{suffix}"] = t[:, j].numpy()
            else:
                raise InvalidInputError(
                    f"to_frame() makes one row per input, but {name} has shape {tuple(t.shape)}."
                )
        if self.samples_per_input is not None:
            data["n_samples"] = self.samples_per_input.detach().cpu().numpy()
        return pd.DataFrame(data)


def concat_predictions(parts: list[Prediction]) -> Prediction:
    """Concatenate predictions of consecutive batches along the batch dimension.

    Args:
        parts: Predictions of one task and one number of samples, in batch order.

    Returns:
        One prediction of the same class whose per-input fields are the parts' concatenated (kept
        samples only when every part kept them).

    Raises:
        InvalidInputError: ``parts`` is empty, or mixes tasks or numbers of samples.

    Example:
        >>> import torch, mcdrop
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3))
        >>> mc = mcdrop.MCDropout(net.eval(), n_samples=5, seed=0)
        >>> both = mcdrop.concat_predictions([mc.predict(torch.randn(2, 2)), mc.predict(torch.randn(3, 2))])
        >>> len(both)
        5
    """
    if not parts:
        raise InvalidInputError("concat_predictions needs at least one prediction.")
    first = parts[0]
    kinds = {type(p) for p in parts}
    adaptive = [p.samples_per_input is not None for p in parts]
    if len(kinds) > 1:
        raise InvalidInputError("Only predictions of the same task and number of samples can be concatenated.")
    if any(adaptive) and not all(adaptive) or len({p.max_samples for p in parts}) > 1:
        raise InvalidInputError(
            "Predictions of adaptive sampling (n_samples='auto') can be concatenated only with others of "
            "the same max_samples, not with fixed-N predictions."
        )
    if not any(adaptive) and len({p.n_samples for p in parts}) > 1:
        raise InvalidInputError(
            "Only predictions of the same task and number of samples can be concatenated."
        )
    values: dict[str, Any] = {}
    for f in fields(first):
        items = [getattr(p, f.name) for p in parts]
        if f.name == "n_samples":
            values[f.name] = max(items)
            continue
        if f.name == "samples":
            values[f.name] = None if any(i is None for i in items) else torch.cat(items, 1)
        elif isinstance(items[0], Prediction):  # the deterministic baseline: concatenated likewise
            values[f.name] = None if any(i is None for i in items) else concat_predictions(items)
        elif isinstance(items[0], torch.Tensor):
            values[f.name] = None if any(i is None for i in items) else torch.cat(items, 0)
        else:
            values[f.name] = items[0]
    return type(first)(**values)


def select_rows(pred: Prediction, rows: torch.Tensor) -> Prediction:
    """The prediction of the selected inputs.

    Args:
        pred: A prediction.
        rows: A boolean mask or int64 indices along the batch (indices may reorder or repeat rows).

    Returns:
        A prediction of the same class holding the selected rows of every per-input field (kept
        samples along their second dimension, the deterministic baseline likewise).

    Example:
        >>> import torch, mcdrop
        >>> from mcdrop.predictions import select_rows
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3))
        >>> pred = mcdrop.MCDropout(net.eval(), n_samples=5, seed=0).predict(torch.randn(4, 2))
        >>> torch.equal(select_rows(pred, torch.tensor([2, 0])).probs, pred.probs[[2, 0]])
        True
    """
    values: dict[str, Any] = {}
    for f in fields(pred):
        value = getattr(pred, f.name)
        if isinstance(value, Prediction):
            value = select_rows(value, rows)
        elif isinstance(value, torch.Tensor):
            value = value[:, rows.to(value.device)] if f.name == "samples" else value[rows.to(value.device)]
        values[f.name] = value
    return type(pred)(**values)
