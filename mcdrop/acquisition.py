"""Active-learning acquisition: which unlabelled inputs of a pool to label next.

Every function takes the :class:`~mcdrop.ClassificationPrediction` of the pool (one class vector
per input) and returns, for the scores, one number per input (higher: more worth labelling), and
for the selections, the indices (into the pool, ``int64``, on the CPU) of the ``k`` inputs to label.
``docs/acquisition.md`` gives the definitions with their formulas, when to use which, and the memory.

Definitions (natural log; ``p_t`` the class probabilities of MC sample ``t`` of N, ``p̄ = (1/N) Σ_t p_t``):

Scores (``f(pred) -> (n,)``)
    * :func:`bald`: the mutual information ``I(y; ω) = H[p̄] - (1/N) Σ_t H[p_t]`` (Houlsby et al. 2011).
    * :func:`max_entropy`: the predictive entropy ``H[p̄]``.
    * :func:`margin`: ``1 - (p̄_(1) - p̄_(2))``, one minus the gap between the two largest mean
      probabilities (in [0, 1]; 1 where the top two tie).
    * :func:`variation_ratio`: ``1 - (samples voting for the modal class) / N``.

Deterministic selection (``"bald"``, ``"max_entropy"``, ``"margin"``, ``"variation_ratio"``)
    The ``k`` highest scores; ties go to the lower pool index.

Stochastic selection (``"power_<score>"``, ``"softmax_<score>"``, ``"softrank_<score>"``, ``"random"``)
    Kirsch et al. 2023, "Stochastic Batch Acquisition: A Simple Baseline for Deep Active Learning":
    ``k`` inputs drawn without replacement, each draw with probability proportional to
    ``s_i^β`` (power), ``exp(β s_i)`` (softmax) or ``r_i^(-β)`` (softrank, ``r_i`` the rank of
    ``s_i``, 1 for the highest). Drawn exactly by the Gumbel-top-k trick: the ``k`` largest
    ``key_i + g_i`` with ``key_i = β log s_i``, ``β s_i`` or ``-β log r_i`` and ``g_i`` independent
    standard Gumbel noise. ``"random"`` draws uniformly (keys all 0). PowerBALD is ``"power_bald"``
    (also the function :func:`power_bald`).

BatchBALD (Kirsch et al. 2019)
    Greedy: each step adds the input maximising the joint mutual information
    ``I(y_1, ..., y_b; ω) = H(y_1, ..., y_b) - Σ_i (1/N) Σ_t H[p_t(y_i)]``, the joint entropy
    computed exactly over all ``K^(b-1)`` class configurations of the inputs already chosen while
    there are at most ``n_joint_samples`` of them, and estimated from ``n_joint_samples`` sampled
    configurations beyond (see :func:`batch_bald`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mcdrop._checks import check_choice, check_int, check_real
from mcdrop._statistics import ClassificationStats
from mcdrop.errors import InvalidInputError, InvalidTypeError, NonFiniteError
from mcdrop.loop import check_loader, iter_predictions
from mcdrop.predictions import ClassificationPrediction, RegressionPrediction

if TYPE_CHECKING:
    from mcdrop.wrapper import MCDropout

__all__ = [
    "METHODS",
    "BatchBALDResult",
    "StreamingSelection",
    "bald",
    "batch_bald",
    "margin",
    "max_entropy",
    "power_bald",
    "sample_probs",
    "select",
    "select_from_loader",
    "stochastic_top_k",
    "variation_ratio",
]

#: Configurations sampled per step by :func:`batch_bald` once the exact joint would have more.
DEFAULT_JOINT_SAMPLES = 10_000
# Numbers in one chunk of BatchBALD candidates ((chunk, configurations, K) float64: 64 MiB per tensor).
_CHUNK_ELEMENTS = 2**23


# ----------------------------------------------------------------------------- checks
def _check_prediction(pred: Any, what: str) -> ClassificationPrediction:
    if isinstance(pred, RegressionPrediction):
        raise InvalidInputError(
            f"{what} needs a classification prediction (class probabilities per input); got a "
            "RegressionPrediction. Acquisition supports classifiers (ClassificationPrediction: "
            "MCDropout(..., task='classification')). For a regression model, rank the pool by its "
            "predictive variance yourself, e.g. pred.variance.flatten(1).sum(1).topk(k).indices."
        )
    if not isinstance(pred, ClassificationPrediction):
        raise InvalidTypeError(
            f"{what} takes a mcdrop.ClassificationPrediction (what MCDropout.predict returns for a "
            f"classifier); got {type(pred).__name__}."
        )
    if pred.probs is None or pred.probs.dim() != 2:
        shape = None if pred.probs is None else tuple(pred.probs.shape)
        raise InvalidInputError(
            f"{what} ranks inputs by one class vector each, probs of shape (n, K); got probs of shape "
            f"{shape} (e.g. a segmentation map, a class vector per position). Reduce a score to one "
            "number per input first, e.g. pred.mutual_information.flatten(1).mean(1), and take its "
            "top k."
        )
    return pred


def _check_k(k: Any, pool: int) -> int:
    k = check_int(k, "k")
    if k <= 0:
        raise InvalidInputError(f"k (the number of inputs to select) must be at least 1; got {k}.")
    if k > pool:
        raise InvalidInputError(f"k={k} is more than the {pool} inputs of the pool.")
    return k


def _check_finite(scores: torch.Tensor, name: str) -> torch.Tensor:
    if not bool(torch.isfinite(scores).all()):
        bad = int((~torch.isfinite(scores)).sum())
        raise NonFiniteError(f"{bad} of the {scores.numel()} {name} scores are NaN or infinite.")
    return scores


# ----------------------------------------------------------------------------- scores
def bald(pred: ClassificationPrediction) -> torch.Tensor:
    """The BALD score: the mutual information between an input's label and the model weights.

    ``I(y; ω) = H[p̄] - (1/N) Σ_t H[p_t]`` (Houlsby et al. 2011), estimated from the N MC dropout
    samples: ``pred.mutual_information``. High where the samples disagree with each other.

    Args:
        pred: The prediction of the pool, one class vector per input.

    Returns:
        A tensor ``(n,)`` of scores in ``[0, log K]``.

    Raises:
        InvalidInputError: A regression prediction, or more than one class vector per input.

    Example:
        >>> import torch, mcdrop
        >>> from mcdrop import acquisition
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.5),
        ...                           torch.nn.Linear(16, 3)).eval()
        >>> pred = mcdrop.MCDropout(net, n_samples=20, seed=0).predict(torch.randn(6, 4))
        >>> scores = acquisition.bald(pred)
        >>> scores.shape, bool((scores >= 0).all())
        (torch.Size([6]), True)
    """
    return _check_prediction(pred, "bald").mutual_information


def max_entropy(pred: ClassificationPrediction) -> torch.Tensor:
    """The predictive entropy ``H[p̄] = -Σ_k p̄_k log p̄_k`` of the mean probabilities (total uncertainty).

    Args:
        pred: The prediction of the pool, one class vector per input.

    Returns:
        A tensor ``(n,)`` of scores in ``[0, log K]``.

    Raises:
        InvalidInputError: A regression prediction, or more than one class vector per input.

    Example:
        >>> import torch, mcdrop
        >>> from mcdrop import acquisition
        >>> pred = mcdrop.ClassificationPrediction(
        ...     n_samples=1, probs=torch.tensor([[0.5, 0.5], [1.0, 0.0]]),
        ...     predictive_entropy=torch.tensor([0.6931, 0.0]), expected_entropy=torch.zeros(2),
        ...     variation_ratio=torch.zeros(2))
        >>> acquisition.max_entropy(pred).tolist()
        [0.6930999755859375, 0.0]
    """
    return _check_prediction(pred, "max_entropy").predictive_entropy


def margin(pred: ClassificationPrediction) -> torch.Tensor:
    """One minus the margin between the two largest mean probabilities: ``1 - (p̄_(1) - p̄_(2))``.

    ``p̄_(1) ≥ p̄_(2)`` are the largest and second largest entries of ``pred.probs``. The score is
    in ``[0, 1]``: 1 where the top two classes tie, 0 where one class has all the probability, so
    the highest scores are the smallest margins (margin sampling, Scheffer et al. 2001).

    Args:
        pred: The prediction of the pool, one class vector per input.

    Returns:
        A tensor ``(n,)`` of scores in ``[0, 1]``.

    Raises:
        InvalidInputError: A regression prediction, or more than one class vector per input.

    Example:
        >>> import torch, mcdrop
        >>> from mcdrop import acquisition
        >>> pred = mcdrop.ClassificationPrediction(
        ...     n_samples=1, probs=torch.tensor([[0.5, 0.3, 0.2], [0.9, 0.1, 0.0]]),
        ...     predictive_entropy=torch.zeros(2), expected_entropy=torch.zeros(2),
        ...     variation_ratio=torch.zeros(2))
        >>> [round(s, 3) for s in acquisition.margin(pred).tolist()]
        [0.8, 0.2]
    """
    probs = _check_prediction(pred, "margin").probs
    if probs.shape[1] < 2:
        return torch.ones(probs.shape[0], dtype=probs.dtype, device=probs.device)
    top2 = probs.topk(2, dim=1).values
    return 1.0 - (top2[:, 0] - top2[:, 1])


def variation_ratio(pred: ClassificationPrediction) -> torch.Tensor:
    """The variation ratio ``1 - (samples voting for the modal class) / N`` (Freeman 1965).

    Takes few values (multiples of 1/N), so many inputs tie; ties go to the lower pool index.

    Args:
        pred: The prediction of the pool, one class vector per input.

    Returns:
        A tensor ``(n,)`` of scores in ``[0, 1 - 1/K]``.

    Raises:
        InvalidInputError: A regression prediction, or more than one class vector per input.

    Example:
        >>> import torch, mcdrop
        >>> from mcdrop import acquisition
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.5),
        ...                           torch.nn.Linear(16, 3)).eval()
        >>> pred = mcdrop.MCDropout(net, n_samples=20, seed=0).predict(torch.randn(6, 4))
        >>> bool(torch.equal(acquisition.variation_ratio(pred), pred.variation_ratio))
        True
    """
    return _check_prediction(pred, "variation_ratio").variation_ratio


_SCORES: dict[str, Callable[[ClassificationPrediction], torch.Tensor]] = {
    "bald": bald,
    "max_entropy": max_entropy,
    "margin": margin,
    "variation_ratio": variation_ratio,
}
_MODES = ("power", "softmax", "softrank")

#: Every method :func:`select` and :func:`select_from_loader` know.
METHODS: tuple[str, ...] = (
    *_SCORES,
    "batch_bald",
    "random",
    *(f"{mode}_{score}" for mode in _MODES for score in _SCORES),
)


def _parse_method(method: Any) -> tuple[str | None, str | None]:
    """``(mode, score)``: mode ``None`` for the deterministic top k; ``("random", None)``; ``(None, "batch_bald")``."""
    method = check_choice(method, METHODS, "method")
    if method == "random":
        return "random", None
    for mode in _MODES:
        if method.startswith(mode + "_"):
            return mode, method[len(mode) + 1 :]
    return None, method


# ----------------------------------------------------------------------------- ordering and noise
def _generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator | None:
    if seed is not None and generator is not None:
        raise InvalidInputError("Pass seed= or generator=, not both.")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise InvalidTypeError(f"generator must be a torch.Generator; got {type(generator).__name__}.")
        if generator.device.type != "cpu":
            raise InvalidInputError(
                f"generator must be a CPU torch.Generator (the noise is drawn on the CPU, so a seed "
                f"gives the same draws on every device); got one on {generator.device}."
            )
        return generator
    if seed is None:
        return None
    seed = check_int(seed, "seed", minimum=0, maximum=2**64 - 1)
    return torch.Generator().manual_seed(seed)


def _gumbel(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``n`` standard Gumbel draws, float64, drawn on the CPU in pool order (batching does not matter)."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    tiny = torch.finfo(torch.float64).tiny
    return (-torch.log(-torch.log(u.clamp(min=tiny, max=1.0 - 2**-53)))).to(device)


def _order(keys: torch.Tensor) -> torch.Tensor:
    """Positions by decreasing key, ties in increasing position."""
    return torch.sort(keys, descending=True, stable=True).indices


def _keys(scores: torch.Tensor, mode: str, beta: float) -> torch.Tensor:
    """The log-weights of the stochastic modes (module docs)."""
    scores = scores.to(torch.float64)
    if mode == "random":
        return torch.zeros_like(scores)
    if mode == "power":
        if bool((scores < 0).any()):
            raise InvalidInputError(
                "power sampling draws with probability ∝ score^β, which needs non-negative scores; "
                f"got a minimum score of {float(scores.min()):.4g}. Use a softmax_ method instead."
            )
        # score 0: a finite, very low key, so those inputs come last (in random order) rather than tie
        return beta * torch.log(scores.clamp(min=torch.finfo(torch.float64).tiny))
    if mode == "softmax":
        return beta * scores
    ranks = torch.empty_like(scores)
    ranks[_order(scores)] = torch.arange(1, scores.numel() + 1, dtype=scores.dtype, device=scores.device)
    return -beta * torch.log(ranks)


def stochastic_top_k(
    scores: torch.Tensor,
    k: int,
    *,
    mode: str = "power",
    beta: float = 1.0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw ``k`` distinct indices, each draw with probability proportional to a power, softmax or rank of the scores.

    Stochastic batch acquisition (Kirsch et al. 2023): instead of the ``k`` highest scores, which
    in a batch often pick near-duplicates, draw ``k`` inputs without replacement with probability

    * ``mode="power"``: ``∝ s_i^β`` (PowerBALD with the BALD scores; needs ``s_i ≥ 0``; inputs with
      score 0 come after all others, in random order),
    * ``mode="softmax"``: ``∝ exp(β s_i)``,
    * ``mode="softrank"``: ``∝ r_i^(-β)``, ``r_i`` the rank of ``s_i`` (1 for the highest, ties by index).

    Drawn exactly by the Gumbel-top-k trick: the ``k`` largest ``key_i + g_i``, with
    ``key_i = β log s_i``, ``β s_i`` or ``-β log r_i`` and ``g_i = -log(-log u_i)`` standard Gumbel
    noise, ``u_i`` uniform, drawn in float64 on the CPU in index order (so a seed gives the same
    draws on every device, and in one go or batch by batch). ``β → ∞`` gives the top k, ``β = 0``
    a uniform draw; Kirsch et al. recommend ``β = 1``.

    Args:
        scores: One score per input, shape ``(n,)``.
        k: How many to draw (``1 ≤ k ≤ n``).
        mode: ``"power"``, ``"softmax"`` or ``"softrank"``.
        beta: The coldness ``β ≥ 0``.
        seed: Seeds a fresh CPU generator for the noise (reproducible draws).
        generator: A CPU ``torch.Generator`` to draw from (advanced by ``n`` draws) instead of
            ``seed``. Neither given: torch's global generator.

    Returns:
        The ``k`` drawn indices, ``int64`` on the CPU, in decreasing order of ``key + noise``.

    Raises:
        InvalidInputError: ``k`` out of range, an unknown mode, ``beta < 0``, negative scores for
            ``"power"``, or both ``seed`` and ``generator``.
        NonFiniteError: A score is NaN or infinite.

    Example:
        >>> import torch
        >>> from mcdrop.acquisition import stochastic_top_k
        >>> scores = torch.tensor([0.0, 0.1, 0.9, 0.5])
        >>> picks = stochastic_top_k(scores, 2, mode="power", seed=0)
        >>> picks.dtype, len(set(picks.tolist()))
        (torch.int64, 2)
        >>> torch.equal(picks, stochastic_top_k(scores, 2, mode="power", seed=0))
        True
    """
    scores = _scores_1d(scores)
    k = _check_k(k, scores.numel())
    mode = check_choice(mode, _MODES, "mode")
    beta = check_real(beta, "beta", low=0.0)
    gen = _generator(seed, generator)
    keys = _keys(scores, mode, beta) + _gumbel(scores.numel(), gen, scores.device)
    return _order(keys)[:k].cpu()


def _scores_1d(scores: Any) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor):
        raise InvalidTypeError(f"scores must be a torch.Tensor; got {type(scores).__name__}.")
    if scores.dim() != 1:
        raise InvalidInputError(
            f"scores must have one value per input, shape (n,); got {tuple(scores.shape)}."
        )
    return _check_finite(scores, "acquisition")


# ----------------------------------------------------------------------------- per-sample probabilities
def sample_probs(pred: ClassificationPrediction, *, output_type: str | None = None) -> torch.Tensor:
    """The class probabilities of every kept MC sample, samples-first ``(N, n, K)``.

    ``pred.samples`` holds the raw model outputs (``keep_samples=True``): logits, probabilities or
    log-probabilities as the wrapper's ``output_type`` said, and one value per input for a binary
    classifier (the positive class). Not given, it is the reading the prediction records (its
    ``output_type``, where it has one), else the one that reproduces ``pred.probs`` (the mean of
    the per-sample probabilities) to within ``1e-4``.

    Args:
        pred: A prediction made with ``keep_samples=True``.
        output_type: ``"logits"``, ``"probs"`` or ``"log_probs"``: how to read the samples.
            ``None``: as the prediction records, else found from ``pred.probs``.

    Returns:
        A float64 tensor ``(N, n, K)`` whose rows sum to 1.

    Raises:
        InvalidInputError: No kept samples (pass ``keep_samples=True`` to :class:`mcdrop.MCDropout`),
            samples of another shape than the prediction, inputs with different numbers of
            samples (adaptive sampling), or no reading that reproduces ``pred.probs``.

    Example:
        >>> import torch, mcdrop
        >>> from mcdrop import acquisition
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.5),
        ...                           torch.nn.Linear(16, 3)).eval()
        >>> pred = mcdrop.MCDropout(net, n_samples=8, keep_samples=True, seed=0).predict(torch.randn(5, 4))
        >>> p = acquisition.sample_probs(pred)
        >>> p.shape, bool(torch.allclose(p.mean(0).float(), pred.probs, atol=1e-6))
        (torch.Size([8, 5, 3]), True)
    """
    pred = _check_prediction(pred, "sample_probs")
    if pred.samples is None:
        adaptive = (
            " (a prediction of adaptive sampling, n_samples='auto', keeps none: each input has its own N; "
            "use an integer n_samples)"
            if pred.samples_per_input is not None
            else ""
        )
        raise InvalidInputError(
            "this needs the per-sample outputs of the pool, which the prediction did not keep"
            f"{adaptive}: build the wrapper with keep_samples=True, e.g. "
            "MCDropout(model, n_samples=100, keep_samples=True)."
        )
    per_input = pred.samples_per_input  # adaptive sampling: a count per input
    if per_input is not None and bool((per_input != pred.n_samples).any()):
        raise InvalidInputError(
            "the inputs of this prediction received different numbers of MC samples (adaptive sampling, "
            "n_samples='auto'), so their kept samples do not make one joint predictive distribution. "
            "Predict the pool with a fixed n_samples for BatchBALD."
        )
    if output_type is None:
        output_type = pred.output_type  # what the wrapper read (None for a prediction built by hand)
    samples = pred.samples
    n, n_classes = pred.probs.shape
    if samples.dim() == 2:
        samples = samples.unsqueeze(-1)
    if samples.dim() != 3 or samples.shape[1] != n or samples.shape[2] not in (n_classes, 1):
        raise InvalidInputError(
            f"pred.samples has shape {tuple(pred.samples.shape)}, which is not (N, {n}, {n_classes}) "
            f"(or (N, {n}, 1) for a binary classifier) to go with probs of shape {tuple(pred.probs.shape)}."
        )
    if samples.shape[2] == 1 and n_classes != 2:
        raise InvalidInputError(
            f"pred.samples has one value per input but probs has {n_classes} classes (expected 2)."
        )
    readings = (
        [check_choice(output_type, ("logits", "probs", "log_probs"), "output_type")]
        if output_type
        else [
            "logits",
            "probs",
            "log_probs",
        ]
    )
    target = pred.probs.to(torch.float64)
    for reading in readings:
        try:
            probs, _ = ClassificationStats(reading, class_dim=1).to_probs(samples.to(torch.float64))
        except InvalidInputError:
            if output_type:
                raise
            continue
        if output_type or bool(torch.allclose(probs.mean(0), target, rtol=0.0, atol=1e-4)):
            return probs
    raise InvalidInputError(
        "pred.samples read as logits, probabilities or log-probabilities do not average to pred.probs, "
        "so mcdrop cannot tell how to read them. Pass output_type= ('logits', 'probs' or 'log_probs'), "
        "as given to MCDropout."
    )


# ----------------------------------------------------------------------------- BatchBALD
@dataclass(frozen=True)
class BatchBALDResult:
    """What :func:`batch_bald` selected, in the order it selected them.

    Attributes:
        indices: The selected pool indices, ``int64`` on the CPU, shape ``(k,)``.
        scores: ``scores[i]`` is the estimated joint mutual information
            ``I(y_1, ..., y_{i+1}; ω)`` of the first ``i + 1`` selected inputs (float64, CPU), so
            it does not decrease; ``scores[0]`` is the BALD score of the first.

    Example:
        >>> import torch
        >>> from mcdrop.acquisition import BatchBALDResult
        >>> r = BatchBALDResult(indices=torch.tensor([3, 1]), scores=torch.tensor([0.5, 0.8]))
        >>> r.indices.tolist()
        [3, 1]
    """

    indices: torch.Tensor
    scores: torch.Tensor


def _joint_entropies(
    joint: torch.Tensor, weights: torch.Tensor | None, probs: torch.Tensor, out: torch.Tensor
) -> None:
    """``out[i] = H(y_batch, y_i)`` for every candidate ``i`` of ``probs (n, N, K)``, in chunks.

    ``joint (M, N)`` holds ``Π_j p_t(y_j = m_j)`` of each configuration ``m`` of the batch under each
    sample ``t``. Exact: the ``M`` configurations are all of them and ``weights`` is ``None``.
    Sampled: configurations drawn from ``p(y_batch)`` and ``weights = 1 / (M p(m))``.
    """
    n, n_samples, n_classes = probs.shape
    configs = joint.shape[0]
    step = max(1, _CHUNK_ELEMENTS // max(1, configs * n_classes))
    joint = joint / n_samples
    for start in range(0, n, step):
        chunk = probs[start : start + step]
        pair = torch.einsum("mt,btk->bmk", joint, chunk)  # p(y_batch = m, y_i = k)
        nats = torch.special.entr(pair)
        if weights is None:
            out[start : start + step] = nats.sum((1, 2))
        else:
            out[start : start + step] = torch.einsum("bmk,m->b", nats, weights)


def _sample_configurations(
    chosen: torch.Tensor, n_configs: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(joint, weights)`` of configurations drawn from ``p(y_batch)``, for ``chosen (b, N, K)``.

    ``p(y_batch) = (1/N) Σ_t Π_j p_t(y_j)``: for each sample ``t``, ``max(1, n_configs // N)``
    configurations are drawn from ``Π_j p_t(y_j)`` (on the CPU, from ``generator``).
    """
    b, n_samples, n_classes = chosen.shape
    per = max(1, n_configs // n_samples)
    cpu = chosen.detach().to("cpu")
    # classes (b, N, per): configuration (t, r) gives input j the class classes[j, t, r]
    classes = torch.multinomial(cpu.reshape(-1, n_classes), per, replacement=True, generator=generator)
    classes = classes.reshape(b, n_samples * per).to(chosen.device)  # (b, M), M = N * per
    log_joint = torch.zeros(n_samples, n_samples * per, dtype=chosen.dtype, device=chosen.device)
    for j in range(b):
        log_joint += torch.log(chosen[j][:, classes[j]])  # (N, M): log p_t(y_j = m_j) for every t
    joint = log_joint.exp().T.contiguous()  # (M, N)
    marginal = joint.mean(1).clamp(min=torch.finfo(joint.dtype).tiny)  # p(m)
    return joint, 1.0 / (marginal * joint.shape[0])


def _greedy_batch_bald(
    probs: torch.Tensor, k: int, n_joint_samples: int, generator: torch.Generator | None
) -> BatchBALDResult:
    """BatchBALD on per-input sample probabilities ``probs (n, N, K)`` (float64)."""
    n, n_samples, n_classes = probs.shape
    conditional = torch.special.entr(probs).sum(-1).mean(-1)  # (1/N) Σ_t H[p_t(y_i)]
    joint = probs.new_ones(1, n_samples)
    weights: torch.Tensor | None = None
    taken = torch.zeros(n, dtype=torch.bool, device=probs.device)
    chosen: list[int] = []
    scores: list[float] = []
    entropies = torch.empty(n, dtype=probs.dtype, device=probs.device)
    for step in range(k):
        if step > 0:
            if n_classes**step <= n_joint_samples:  # exact: all K^step configurations
                last = probs[chosen[-1]]  # (N, K)
                joint = (joint[:, None, :] * last.T[None, :, :]).reshape(-1, n_samples)
                weights = None
            else:
                joint, weights = _sample_configurations(probs[chosen], n_joint_samples, generator)
        _joint_entropies(joint, weights, probs, entropies)
        gain = entropies - conditional - conditional[chosen].sum()
        gain = gain.masked_fill(taken, -math.inf)
        best = int(_order(gain)[0])
        chosen.append(best)
        scores.append(float(gain[best]))
        taken[best] = True
    return BatchBALDResult(
        indices=torch.tensor(chosen, dtype=torch.int64), scores=torch.tensor(scores, dtype=torch.float64)
    )


def batch_bald(
    pred: ClassificationPrediction | torch.Tensor,
    k: int,
    *,
    n_joint_samples: int = DEFAULT_JOINT_SAMPLES,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    output_type: str | None = None,
) -> BatchBALDResult:
    """BatchBALD (Kirsch et al. 2019): a batch of ``k`` inputs that are informative together.

    Greedy: step ``b`` adds the input ``i`` not yet chosen that maximises the joint mutual
    information of the batch with it,
    ``I(y_1, ..., y_{b-1}, y_i; ω) = H(y_1, ..., y_{b-1}, y_i) - Σ_j (1/N) Σ_t H[p_t(y_j)]``, where ``p(y_1, ..., y_b) = (1/N) Σ_t Π_j p_t(y_j)`` is the joint predictive distribution of the
    MC samples ``t`` (the labels are independent given the weights). Unlike the top k by BALD,
    near-duplicates add little joint information, so the batch spreads out.

    The joint entropy is exact (a sum over all ``K^(b-1) · K`` class configurations) while the
    ``K^(b-1)`` configurations of the chosen inputs number at most ``n_joint_samples``. Beyond,
    it is estimated by importance sampling: ``M = N · max(1, n_joint_samples // N)``
    configurations ``m`` of the chosen inputs are drawn from ``p(y_1, ..., y_{b-1})`` (for each
    sample ``t``, ``M / N`` from ``Π_j p_t(y_j)``), fresh at each step, and
    ``H ≈ (1/M) Σ_m Σ_k -p(m, k) log p(m, k) / p(m)``. This is the scheme of Kirsch et al.'s
    reference implementation (``batchbald_redux``). Ties go to the lower pool index.

    Memory: the per-sample probabilities of the pool in float64 (``8 · n · N · K`` bytes), the
    configurations (``8 · M · N``), and one chunk of candidates at a time: its joint
    probabilities and their entropy terms, at most 2^23 numbers (64 MiB) each, unless a single
    candidate's ``M · K`` is more. Time per step: ``O(n · M · N · K)``.

    Args:
        pred: The prediction of the pool made with ``keep_samples=True``, or the per-sample class
            probabilities themselves, samples-first ``(N, n, K)``.
        k: The batch size (``1 ≤ k ≤ n``).
        n_joint_samples: The most class configurations used per step (exact below, sampled above).
        seed: Seeds the configuration sampling (a fresh CPU generator).
        generator: A CPU ``torch.Generator`` to draw the configurations from instead of ``seed``.
            Neither given: torch's global generator. Unused while the joint is exact.
        output_type: How to read ``pred.samples`` (see :func:`sample_probs`); ``None`` finds it.

    Returns:
        A :class:`BatchBALDResult`: the selected indices in selection order and the joint mutual
        information of each prefix of the batch.

    Raises:
        InvalidInputError: A prediction without kept samples (pass ``keep_samples=True``), a
            regression prediction, ``k`` out of range, probabilities of the wrong shape.

    Example:
        >>> import torch, mcdrop
        >>> from mcdrop import acquisition
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.5),
        ...                           torch.nn.Linear(16, 3)).eval()
        >>> mc = mcdrop.MCDropout(net, n_samples=20, keep_samples=True, seed=0)
        >>> pred = mc.predict(torch.randn(30, 4))
        >>> result = acquisition.batch_bald(pred, 3, seed=0)
        >>> result.indices.shape, bool((result.scores.diff() >= -1e-9).all())
        (torch.Size([3]), True)
        >>> int(result.indices[0]) == int(acquisition.bald(pred).argmax())
        True
    """
    if isinstance(pred, torch.Tensor):
        probs = _check_probs_tensor(pred)
    else:
        probs = sample_probs(pred, output_type=output_type)
    k = _check_k(k, probs.shape[1])
    n_joint_samples = check_int(n_joint_samples, "n_joint_samples", minimum=1)
    gen = _generator(seed, generator)
    return _greedy_batch_bald(probs.permute(1, 0, 2).contiguous(), k, n_joint_samples, gen)


def _check_probs_tensor(probs: torch.Tensor) -> torch.Tensor:
    if probs.dim() != 3:
        raise InvalidInputError(
            f"per-sample probabilities must be samples-first (N, n, K); got shape {tuple(probs.shape)}."
        )
    probs = _check_finite(probs, "probability").to(torch.float64)
    if bool((probs < 0).any()) or not bool(
        torch.allclose(probs.sum(-1), torch.ones((), dtype=probs.dtype), atol=1e-4)
    ):
        raise InvalidInputError(
            "per-sample probabilities must be non-negative and sum to 1 over the last (class) dimension; "
            "for logits pass their softmax, or pass the prediction itself (keep_samples=True)."
        )
    return probs


# ----------------------------------------------------------------------------- selection
def select(
    pred: ClassificationPrediction,
    k: int,
    method: str = "bald",
    *,
    beta: float = 1.0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    n_joint_samples: int = DEFAULT_JOINT_SAMPLES,
    prefilter: int | None = None,
    output_type: str | None = None,
) -> torch.Tensor:
    """The indices of the ``k`` pool inputs to label next, by any acquisition method.

    Methods (definitions in the module docs and ``docs/acquisition.md``):

    * ``"bald"``, ``"max_entropy"``, ``"margin"``, ``"variation_ratio"``: the ``k`` highest scores
      (:func:`bald`, ...), ties to the lower index.
    * ``"power_<score>"``, ``"softmax_<score>"``, ``"softrank_<score>"`` for each score above
      (``"power_bald"`` is PowerBALD): ``k`` drawn by :func:`stochastic_top_k` with ``beta``.
    * ``"random"``: ``k`` drawn uniformly without replacement (the baseline).
    * ``"batch_bald"``: :func:`batch_bald` (needs ``keep_samples=True``); with ``prefilter=m``
      on the ``m`` inputs of highest BALD only (Kirsch et al. 2019 do this for large pools).

    Args:
        pred: The prediction of the pool, one class vector per input.
        k: How many inputs to select (``1 ≤ k ≤ n``).
        method: One of :data:`METHODS`.
        beta: The coldness of the stochastic methods.
        seed: Seeds the stochastic methods and BatchBALD's sampled regime (a fresh CPU generator).
        generator: A CPU ``torch.Generator`` to draw from instead of ``seed``.
        n_joint_samples: BatchBALD's configurations per step (see :func:`batch_bald`).
        prefilter: ``"batch_bald"`` only: run BatchBALD on the ``prefilter`` inputs of highest BALD
            (``k ≤ prefilter``); ``None``: on the whole pool.
        output_type: ``"batch_bald"`` only: how to read ``pred.samples`` (see :func:`sample_probs`).

    Returns:
        The ``k`` selected pool indices, ``int64`` on the CPU, best (or first drawn) first.

    Raises:
        InvalidInputError: ``k < 1`` or larger than the pool, an unknown method (the message
            lists them), a regression prediction, ``"batch_bald"`` without kept samples,
            ``prefilter`` for another method or smaller than ``k``.

    Example:
        >>> import torch, mcdrop
        >>> from mcdrop import acquisition
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.5),
        ...                           torch.nn.Linear(16, 3)).eval()
        >>> pred = mcdrop.MCDropout(net, n_samples=20, seed=0).predict(torch.randn(50, 4))
        >>> top = acquisition.select(pred, 5, "bald")
        >>> torch.equal(top, acquisition.bald(pred).topk(5).indices)
        True
        >>> acquisition.select(pred, 5, "power_bald", seed=0).shape
        torch.Size([5])
    """
    selection = StreamingSelection(
        k,
        method,
        beta=beta,
        seed=seed,
        generator=generator,
        n_joint_samples=n_joint_samples,
        prefilter=prefilter,
        output_type=output_type,
        whole_pool=True,
    )
    selection.update(pred)
    return selection.result()


def power_bald(
    pred: ClassificationPrediction,
    k: int,
    *,
    beta: float = 1.0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PowerBALD (Kirsch et al. 2023): ``k`` pool inputs drawn with probability ``∝ BALD^β``.

    The same as ``select(pred, k, "power_bald", ...)``: ``k`` inputs drawn without replacement, each
    draw choosing among those left with probability proportional to :func:`bald` to the power
    ``beta`` (exactly, by the Gumbel-top-k trick of :func:`stochastic_top_k`). Inputs whose BALD is
    exactly 0 come after all others, in random order.

    Args:
        pred: The prediction of the pool, one class vector per input.
        k: How many inputs to select (``1 ≤ k ≤ n``).
        beta: The coldness (default 1, the paper's recommendation): ``β → ∞`` gives the top ``k``
            BALD scores, ``β = 0`` a uniform draw.
        seed: Seeds the draw (a fresh CPU generator): the same seed gives the same indices on every
            device.
        generator: A CPU ``torch.Generator`` to draw from instead of ``seed``.

    Returns:
        The ``k`` drawn pool indices, ``int64`` on the CPU, in the order drawn.

    Raises:
        InvalidInputError: ``k < 1`` or larger than the pool, a negative ``beta``, or a regression
            prediction.

    Example:
        >>> import torch, mcdrop
        >>> from mcdrop import acquisition
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.5),
        ...                           torch.nn.Linear(16, 3)).eval()
        >>> pred = mcdrop.MCDropout(net, n_samples=20, seed=0).predict(torch.randn(50, 4))
        >>> drawn = acquisition.power_bald(pred, 5, seed=0)
        >>> torch.equal(drawn, acquisition.select(pred, 5, "power_bald", seed=0))
        True
        >>> drawn.shape, len(set(drawn.tolist()))
        (torch.Size([5]), 5)
    """
    return select(pred, k, "power_bald", beta=beta, seed=seed, generator=generator)


class StreamingSelection:
    """Selection over a pool seen batch by batch, holding only the best candidates so far.

    Feed the predictions of consecutive batches of the pool with :meth:`update` (pool indices
    count on from batch to batch), then read :meth:`result`. For the score methods it keeps the
    ``k`` best keys (score, or score-derived key plus Gumbel noise) and their indices: memory
    ``O(k)`` whatever the size of the pool, and the result equals :func:`select` on the
    concatenated prediction with the same ``seed`` (the noise is drawn in pool order). For
    ``"batch_bald"`` it keeps the ``prefilter`` inputs of highest BALD with their per-sample
    probabilities (``O(prefilter · N · K)``) and runs :func:`batch_bald` on them at the end.
    ``"softrank_*"`` needs the ranks within the whole pool and is refused here; ``"batch_bald"``
    needs ``prefilter`` (the kept samples of a whole pool is what streaming avoids).

    Args:
        k: How many inputs to select.
        method: One of :data:`METHODS` except the ``softrank_`` ones.
        beta: The coldness of the stochastic methods.
        seed: Seeds the noise (a fresh CPU generator).
        generator: A CPU ``torch.Generator`` to draw from instead of ``seed``.
        n_joint_samples: BatchBALD's configurations per step.
        prefilter: ``"batch_bald"``: how many inputs of highest BALD to keep for BatchBALD.
        output_type: ``"batch_bald"``: how to read ``pred.samples`` (see :func:`sample_probs`).
        whole_pool: Allow ``softrank_`` methods and ``"batch_bald"`` without ``prefilter`` (one
            :meth:`update` with the whole pool, as :func:`select` does).

    Attributes:
        keys: The retained keys, best first (at most ``k``; ``prefilter`` for BatchBALD).
        indices: Their pool indices.
        probs: BatchBALD: the retained per-sample probabilities ``(N, m, K)``, else ``None``.
        n_seen: The number of pool inputs seen so far.

    Example:
        >>> import torch, mcdrop
        >>> from mcdrop.acquisition import StreamingSelection, select
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.5),
        ...                           torch.nn.Linear(16, 3)).eval()
        >>> mc = mcdrop.MCDropout(net, n_samples=20, seed=0)
        >>> parts = [mc.predict(torch.randn(10, 4)) for _ in range(3)]
        >>> stream = StreamingSelection(4, "bald")
        >>> for part in parts:
        ...     stream.update(part)
        >>> stream.keys.shape, stream.n_seen
        (torch.Size([4]), 30)
        >>> torch.equal(stream.result(), select(mcdrop.concat_predictions(parts), 4, "bald"))
        True
    """

    def __init__(
        self,
        k: int,
        method: str = "bald",
        *,
        beta: float = 1.0,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        n_joint_samples: int = DEFAULT_JOINT_SAMPLES,
        prefilter: int | None = None,
        output_type: str | None = None,
        whole_pool: bool = False,
    ) -> None:
        self.k = check_int(k, "k")
        if self.k <= 0:
            raise InvalidInputError(f"k (the number of inputs to select) must be at least 1; got {k}.")
        self.method = method
        self.mode, self.score = _parse_method(method)
        self.beta = check_real(beta, "beta", low=0.0)
        self.n_joint_samples = check_int(n_joint_samples, "n_joint_samples", minimum=1)
        self.output_type = output_type
        self.whole_pool = whole_pool
        self._generator = _generator(seed, generator)
        if prefilter is not None:
            if method != "batch_bald":
                raise InvalidInputError(f"prefilter= is for method='batch_bald' only; got method={method!r}.")
            prefilter = check_int(prefilter, "prefilter")
            if prefilter < self.k:
                raise InvalidInputError(f"prefilter={prefilter} must be at least k={self.k}.")
        elif method == "batch_bald" and not whole_pool:
            raise InvalidInputError(
                "batch_bald over a loader needs prefilter=m: BatchBALD compares every candidate with the "
                "batch chosen so far, so it needs the kept samples of every candidate at once, which a "
                "stream does not hold. With prefilter=m the m inputs of highest BALD are kept (with their "
                "samples) and BatchBALD picks among them, as Kirsch et al. (2019) do for large pools; or "
                "predict the pool with keep_samples=True and call select(pred, k, 'batch_bald')."
            )
        if self.mode == "softrank" and not whole_pool:
            raise InvalidInputError(
                f"method={method!r} draws by the rank of each score within the whole pool, which a stream "
                "does not know until its end. Use a power_ or softmax_ method, or predict the pool and "
                "call select()."
            )
        self.prefilter = prefilter
        self.keys: torch.Tensor | None = None
        self.indices: torch.Tensor | None = None
        self.probs: torch.Tensor | None = None
        self.n_seen = 0

    @property
    def _retain(self) -> int:
        if self.score == "batch_bald":
            return self.prefilter if self.prefilter is not None else -1  # -1: everything
        return self.k

    def update(self, pred: ClassificationPrediction) -> None:
        """Add the next batch of the pool.

        Args:
            pred: The prediction of the next ``len(pred)`` pool inputs (one class vector each).

        Raises:
            InvalidInputError: A regression prediction, more than one class vector per input,
                ``"batch_bald"`` without kept samples.

        Example:
            >>> import torch, mcdrop
            >>> from mcdrop.acquisition import StreamingSelection
            >>> pred = mcdrop.ClassificationPrediction(
            ...     n_samples=1, probs=torch.tensor([[0.5, 0.5], [0.9, 0.1]]),
            ...     predictive_entropy=torch.zeros(2), expected_entropy=torch.zeros(2),
            ...     variation_ratio=torch.zeros(2))
            >>> stream = StreamingSelection(1, "margin")
            >>> stream.update(pred)
            >>> stream.indices.tolist()
            [0]
        """
        pred = _check_prediction(pred, "acquisition")
        if self.whole_pool and self.n_seen:
            raise InvalidInputError(
                "A StreamingSelection made with whole_pool=True takes the whole pool in one update()."
            )
        n = len(pred)
        index = torch.arange(self.n_seen, self.n_seen + n, dtype=torch.int64, device=pred.probs.device)
        self.n_seen += n
        probs = None
        if self.score == "batch_bald":
            keys = _check_finite(bald(pred), "bald").to(torch.float64)
            probs = sample_probs(pred, output_type=self.output_type)
        elif self.mode == "random":
            keys = _gumbel(n, self._generator, pred.probs.device)
        else:
            assert self.score is not None
            scores = _check_finite(_SCORES[self.score](pred), self.score).to(torch.float64)
            keys = scores if self.mode is None else _keys(scores, self.mode, self.beta)
            if self.mode is not None:
                keys = keys + _gumbel(n, self._generator, keys.device)
        if self.keys is not None:
            keys = torch.cat([self.keys.to(keys.device), keys])
            index = torch.cat([self.indices.to(index.device), index])  # type: ignore[union-attr]
            if probs is not None:
                assert self.probs is not None
                probs = torch.cat([self.probs.to(probs.device), probs], 1)
        keep = _order(keys)
        if self._retain >= 0:
            keep = keep[: self._retain]
        self.keys, self.indices = keys[keep], index[keep]
        self.probs = None if probs is None else probs[:, keep]

    def result(self) -> torch.Tensor:
        """The ``k`` selected pool indices, ``int64`` on the CPU, best (or first drawn) first.

        Returns:
            The indices.

        Raises:
            InvalidInputError: Nothing was added, or fewer than ``k`` inputs.

        Example:
            >>> import torch, mcdrop
            >>> from mcdrop.acquisition import StreamingSelection
            >>> pred = mcdrop.ClassificationPrediction(
            ...     n_samples=1, probs=torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.6, 0.4]]),
            ...     predictive_entropy=torch.zeros(3), expected_entropy=torch.zeros(3),
            ...     variation_ratio=torch.zeros(3))
            >>> stream = StreamingSelection(2, "margin")
            >>> stream.update(pred)
            >>> stream.result().tolist()
            [0, 2]
        """
        if self.keys is None or self.indices is None:
            raise InvalidInputError("No pool inputs were added: there is nothing to select from.")
        k = _check_k(self.k, self.n_seen)
        if self.score != "batch_bald":
            return self.indices[:k].cpu()
        assert self.probs is not None
        # BatchBALD's candidates in pool order, so its ties go to the lower pool index as in select()
        order = torch.argsort(self.indices)
        chosen = _greedy_batch_bald(
            self.probs[:, order].permute(1, 0, 2).contiguous(), k, self.n_joint_samples, self._generator
        )
        return self.indices[order][chosen.indices.to(order.device)].cpu()


def select_from_loader(
    mc: MCDropout,
    loader: Iterable[Any],
    k: int,
    method: str = "bald",
    *,
    unpack: Callable[[Any], tuple[Any, Any]] | None = None,
    progress: bool = False,
    beta: float = 1.0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    n_joint_samples: int = DEFAULT_JOINT_SAMPLES,
    prefilter: int | None = None,
) -> torch.Tensor:
    """Score a pool batch by batch through the wrapper and keep only the best candidates.

    Each batch of ``loader`` is predicted by ``mc`` (as :meth:`mcdrop.MCDropout.predict_loader`
    does, batches in the layouts it reads) and folded into a :class:`StreamingSelection`, so
    memory holds the ``k`` best candidates (``O(k)``), not the pool's predictions. The indices
    count the pool's inputs in the loader's order (use an unshuffled loader). With the same
    seeded wrapper and loader, the result equals :func:`select` on
    ``mc.predict_loader(loader)``.

    ``"batch_bald"`` needs ``prefilter=m`` (and a wrapper with ``keep_samples=True``): the ``m``
    inputs of highest BALD are kept with their per-sample probabilities, and BatchBALD selects
    among them at the end. ``"softrank_*"`` methods are refused (they rank the whole pool).

    Args:
        mc: The wrapper of the classifier.
        loader: Yields the pool's batches, in a fixed order.
        k: How many inputs to select.
        method: One of :data:`METHODS` except the ``softrank_`` ones.
        unpack: ``unpack(batch) -> (inputs, targets)`` for other batch layouts (as in
            :meth:`mcdrop.MCDropout.predict_loader`).
        progress: Show a tqdm progress bar.
        beta: The coldness of the stochastic methods.
        seed: Seeds the noise of the stochastic methods and BatchBALD (not the dropout masks: seed
            the wrapper for those).
        generator: A CPU ``torch.Generator`` to draw from instead of ``seed``.
        n_joint_samples: BatchBALD's configurations per step.
        prefilter: ``"batch_bald"``: how many inputs of highest BALD to keep for BatchBALD.

    Returns:
        The ``k`` selected pool indices, ``int64`` on the CPU.

    Raises:
        InvalidInputError: An empty loader, ``k`` out of range, an unknown or unstreamable method,
            ``"batch_bald"`` without ``prefilter`` or without ``keep_samples=True``, a regression
            model.
        InvalidTypeError: ``loader`` is not an iterable of batches.

    Example:
        >>> import torch, mcdrop
        >>> from mcdrop import acquisition
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.5),
        ...                           torch.nn.Linear(16, 3)).eval()
        >>> pool = torch.randn(40, 4)
        >>> loader = torch.utils.data.DataLoader(pool, batch_size=16)
        >>> picked = acquisition.select_from_loader(mcdrop.MCDropout(net, n_samples=10, seed=0), loader, 5)
        >>> full = mcdrop.MCDropout(net, n_samples=10, seed=0).predict_loader(loader, progress=False)
        >>> torch.equal(picked, acquisition.select(full, 5))
        True
    """
    check_loader(loader)
    selection = StreamingSelection(
        k,
        method,
        beta=beta,
        seed=seed,
        generator=generator,
        n_joint_samples=n_joint_samples,
        prefilter=prefilter,
        output_type=mc.options.read_output_type,
    )
    if selection.score == "batch_bald" and not mc.options.keep_samples:
        raise InvalidInputError(
            "batch_bald needs the per-sample outputs of the candidates: build the wrapper with "
            "keep_samples=True, e.g. MCDropout(model, n_samples=..., keep_samples=True)."
        )
    for pred, _ in iter_predictions(mc, loader, unpack=unpack, progress=progress):
        assert pred is not None
        selection.update(pred)
    if selection.n_seen == 0:
        raise InvalidInputError("The loader yielded no inputs: there is nothing to select from.")
    return selection.result()
