"""Streaming sufficient statistics of MC samples (private).

The engine hands chunks ``(k, b, ...)`` for arbitrary row ranges ``start:stop`` of the batch; the
accumulators here merge them into per-row running statistics with Chan et al.'s parallel update of
the mean and the sum of squared deviations (M2), so memory does not grow with the number of
samples and the result does not depend on how the samples were chunked. Statistics are kept in
float32 (float64 when the model outputs float64), whatever precision the model ran in.

For the Monte Carlo standard errors (``Prediction.standard_error``) the accumulators also stream,
where asked, the third and fourth central moment sums M3 and M4 (Pébay's pairwise update, exact
whatever the chunking, like M2), and per-row sums of the samples in ``JACKKNIFE_GROUPS`` groups
(:class:`GroupedSums`: sample ``t`` of a row goes to group ``t mod G``) for the grouped jackknife of
the entropy terms.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from mcdrop.errors import InvalidInputError, InvalidTypeError, NonFiniteError


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def aleatoric_variances(second: torch.Tensor, aleatoric: str | None) -> torch.Tensor:
    """The variances a model's second (aleatoric) output stands for, in its dtype.

    The exponential of a log-variance (``aleatoric="log_variance"``), else the output as it is.

    Raises:
        NonFiniteError: A log-variance is so large that its variance overflows the dtype.
    """
    if aleatoric != "log_variance":
        return second
    var = second.exp()
    if bool(torch.isinf(var).any()):
        raise NonFiniteError(
            "The model's log-variance output is so large that its variance overflows "
            f"{var.dtype} (max log-variance {float(second.max()):.4g}); outputs must give a finite "
            "variance. Check the variance head (e.g. clamp the log-variance while training)."
        )
    return var


def _probability_rows(x: torch.Tensor, dim: int, dtype: torch.dtype) -> bool:
    """Whether every row of ``x`` along ``dim`` is non-negative and sums to 1 to float rounding.

    The tolerance is that of a softmax rounded to ``dtype`` (the model's output precision, float32
    at best: half an ulp per probability, so half an ulp on their sum) and summed here in ``x``'s:
    ``eps(dtype) + (16 + sqrt(K)) eps(x)``: 2.4e-6 for ten float32 classes, 6e-6 for a thousand,
    so real logits that pass are practically impossible (every row, every pass).
    """
    k = x.shape[dim]
    precision = torch.finfo(dtype).eps if torch.finfo(dtype).bits < 64 else torch.finfo(torch.float32).eps
    tolerance = precision + (16 + k**0.5) * torch.finfo(x.dtype).eps
    rows = (x.amin(dim) >= 0) & ((x.sum(dim) - 1).abs() <= tolerance)
    return bool(rows.numel()) and bool(rows.all())


def _check_real_dtype(t: torch.Tensor) -> None:
    if not t.is_floating_point():
        kind = "complex" if t.is_complex() else "integer"
        raise InvalidTypeError(
            f"The selected model output has {kind} dtype {t.dtype}; MC dropout statistics need real "
            "floating-point outputs (logits, probabilities or regression values). Pick or convert the "
            "output with output=."
        )


JACKKNIFE_GROUPS = 20
"""Groups of the grouped (batch-means) jackknife of the entropy terms' standard errors.

Memory: ``JACKKNIFE_GROUPS`` sums per row and class (and per row for the per-sample entropy), at
any N. Sample ``t`` of a row (0-based, in drawing order) belongs to group ``t mod JACKKNIFE_GROUPS``.
"""


def _sqrt_tiny(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).tiny) ** 0.5


class RunningMoments:
    """Per-row running mean and M2 of chunks ``(k, b, *shape)`` written into rows ``start:stop``.

    With ``higher=True`` also the third and fourth central moment sums ``m3`` and ``m4``
    (Pébay 2008's pairwise formulas, exact whatever the chunking).
    """

    def __init__(self, *, higher: bool = False) -> None:
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None
        self.m3: torch.Tensor | None = None
        self.m4: torch.Tensor | None = None
        self.count: torch.Tensor | None = None
        self.higher = higher
        self._seen = torch.zeros(0, dtype=torch.bool)

    def update(self, start: int, stop: int, chunk: torch.Tensor, batch_size: int) -> None:
        """Merge ``chunk`` (``k`` samples of rows ``start:stop``) into the running moments."""
        chunk = chunk.to(_acc_dtype(chunk))
        k = chunk.shape[0]
        if self.mean is None:
            shape = (batch_size, *chunk.shape[2:])
            self.mean = chunk.new_zeros(shape)
            self.m2 = chunk.new_zeros(shape)
            if self.higher:
                self.m3 = chunk.new_zeros(shape)
                self.m4 = chunk.new_zeros(shape)
            self.count = torch.zeros(batch_size, dtype=torch.int64, device=chunk.device)
            self._seen = torch.zeros(batch_size, dtype=torch.bool)  # on the host: no device sync
        assert self.m2 is not None and self.count is not None
        c_mean = chunk[0] if k == 1 else chunk.mean(0)
        c_m2 = c_m3 = c_m4 = None
        if k > 1 and not self.higher:
            c_m2 = (chunk - c_mean).square_().sum(0)
        elif k > 1:
            # Two chunk-sized buffers, reused in place (the chunk-sized passes are what cost).
            dev = chunk - c_mean
            dev2 = dev * dev
            c_m2 = dev2.sum(0)
            c_m3 = dev.mul_(dev2).sum(0)
            c_m4 = dev2.square_().sum(0)
        seen = self._seen[start:stop]
        if not bool(seen.any()):
            # The first samples of these rows: the merge reduces to taking the chunk's moments.
            self.mean[start:stop] = c_mean
            if c_m2 is not None:
                self.m2[start:stop] = c_m2
            if self.higher and c_m3 is not None and c_m4 is not None:
                assert self.m3 is not None and self.m4 is not None
                self.m3[start:stop] = c_m3
                self.m4[start:stop] = c_m4
            self.count[start:stop] += k
            seen.fill_(True)
            return
        n_a = self.count[start:stop].to(chunk.dtype)
        n = n_a + k
        view = (-1,) + (1,) * (chunk.dim() - 2)
        delta = c_mean - self.mean[start:stop]
        all_seen = bool(seen.all())
        if self.higher:
            self._merge_higher(start, stop, delta, n_a.view(view), k, c_m2, c_m3, c_m4, all_seen)
        self.mean[start:stop] += delta * (k / n).view(view)
        weight = (n_a * k / n).view(view)
        if all_seen:
            cross = delta.square_().mul_(weight)
        else:
            # Rows seen for the first time take the chunk's M2 as it is: delta² · 0 would overflow to
            # NaN for outputs beyond sqrt(float max), although every sample fits.
            cross = torch.where(weight > 0, delta.square() * weight, torch.zeros_like(delta))
        self.m2[start:stop] += cross if c_m2 is None else c_m2 + cross
        self.count[start:stop] += k
        seen.fill_(True)

    def _merge_higher(
        self,
        start: int,
        stop: int,
        delta: torch.Tensor,
        n_a: torch.Tensor,
        k: int,
        c_m2: torch.Tensor | None,
        c_m3: torch.Tensor | None,
        c_m4: torch.Tensor | None,
        all_seen: bool,
    ) -> None:
        """Pébay's merge of M3 and M4 (before M2 and the mean are updated: it reads the old M2, M3)."""
        assert self.m2 is not None and self.m3 is not None and self.m4 is not None
        m2a, m3a = self.m2[start:stop], self.m3[start:stop]
        n = n_a + k
        floor = _sqrt_tiny(delta.dtype)
        # A difference of means below sqrt(tiny) would make denormal products (many times slower on
        # CPUs) below the precision of any sum they join: it counts as 0 in M3 and M4.
        delta = delta.masked_fill(delta.abs() < floor, 0)
        d2 = delta.square()
        zero = torch.zeros_like(delta)
        m2b = zero if c_m2 is None else c_m2
        m3b = zero if c_m3 is None else c_m3
        m4b = zero if c_m4 is None else c_m4
        cross4 = (
            d2.square() * (n_a * k * (n_a.square() - n_a * k + k * k) / n**3)
            + 6 * d2 * (n_a.square() * m2b + k * k * m2a) / n.square()
            + 4 * delta * (n_a * m3b - k * m3a) / n
        )
        cross3 = d2 * delta * (n_a * k * (n_a - k) / n.square()) + 3 * delta * (n_a * m2b - k * m2a) / n
        if not all_seen:  # rows seen for the first time: the chunk's sums as they are (see M2)
            fresh = (n_a == 0).expand_as(delta)
            cross4 = torch.where(fresh, zero, cross4)
            cross3 = torch.where(fresh, zero, cross3)
        self.m4[start:stop] += m4b + cross4
        self.m3[start:stop] += m3b + cross3

    def take_rows(self, rows: torch.Tensor) -> RunningMoments:
        """The moments of the rows ``rows`` (indices), in that order, as a new object."""
        out = RunningMoments(higher=self.higher)
        if self.mean is None:
            return out
        assert self.count is not None
        on_device = rows.to(self.mean.device)
        for name in ("mean", "m2", "m3", "m4", "count"):
            value = getattr(self, name)
            setattr(out, name, None if value is None else value.index_select(0, on_device))
        out._seen = self._seen.index_select(0, rows.cpu())
        return out

    @property
    def variance(self) -> torch.Tensor:
        """Population variance (divides by N): the variance of the N samples themselves."""
        assert self.m2 is not None and self.count is not None
        view = (-1,) + (1,) * (self.m2.dim() - 1)
        return (self.m2 / self.count.to(self.m2.dtype).view(view)).clamp_(min=0)


class GroupedSums:
    """Per-row sums of the samples in ``groups`` groups: sample ``t`` of a row goes to ``t mod groups``.

    ``sums`` has shape ``(groups, batch, *shape)``; the groups' sizes follow from the number of
    samples alone (:func:`group_sizes`), so the result does not depend on the chunking.
    """

    def __init__(self, groups: int = JACKKNIFE_GROUPS) -> None:
        self.groups = groups
        self.sums: torch.Tensor | None = None
        self._count = torch.zeros(0, dtype=torch.int64)  # on the host: no device sync

    def update(self, start: int, stop: int, chunk: torch.Tensor, batch_size: int) -> None:
        """Add ``chunk`` (``k`` samples of rows ``start:stop``) to the rows' group sums."""
        chunk = chunk.to(_acc_dtype(chunk))
        k = chunk.shape[0]
        if self.sums is None:
            self.sums = chunk.new_zeros((self.groups, batch_size, *chunk.shape[2:]))
            self._count = torch.zeros(batch_size, dtype=torch.int64)
        counts = self._count[start:stop]
        g = self.groups
        first = int(counts[0])
        # Sample j of the chunk joins group (count + j) mod G: one strided sum per group touched, in
        # a fixed order, so the sums are deterministic on every device (no atomic adds).
        if bool((counts == first).all()):
            for j in range(min(k, g)):
                part = chunk[j::g]
                self.sums[(first + j) % g, start:stop] += part[0] if part.shape[0] == 1 else part.sum(0)
        else:  # rows at different sample counts (a probe's pass of the first rows): rarely
            for c in torch.unique(counts).tolist():
                rows = torch.nonzero(counts == c).flatten().to(chunk.device)
                for j in range(min(k, g)):
                    self.sums[(c + j) % g, start + rows] += chunk[j::g][:, rows].sum(0)
        counts += k

    def take_rows(self, rows: torch.Tensor) -> GroupedSums:
        """The group sums of the rows ``rows`` (indices), in that order, as a new object."""
        out = GroupedSums(self.groups)
        if self.sums is not None:
            out.sums = self.sums.index_select(1, rows.to(self.sums.device))
            out._count = self._count.index_select(0, rows.cpu())
        return out


def group_sizes(n_samples: int, groups: int = JACKKNIFE_GROUPS) -> list[int]:
    """How many of ``n_samples`` samples each group holds (round-robin by sample index)."""
    return [n_samples // groups + (g < n_samples % groups) for g in range(groups)]


def grouped_jackknife_se(estimate: Any, sums: list[torch.Tensor], n_samples: int) -> torch.Tensor:
    """Delete-a-group jackknife standard error of ``estimate(*means)`` from grouped sums.

    ``sums`` holds ``(G, batch, ...)`` group sums of each streamed quantity; ``estimate`` maps their
    means (full or leave-one-group-out) to the statistic. Groups may differ in size by one, so this
    is the delete-m_g jackknife of Busing, Meijer and van der Leeden (1999): with ``h_g = N / m_g``,
    pseudo-values ``ψ_g = h_g θ̂ − (h_g − 1) θ̂_(−g)``, ``θ_J = G' θ̂ − Σ_g (1 − m_g/N) θ̂_(−g)`` and
    ``Var = (1/G') Σ_g (ψ_g − θ_J)² / (h_g − 1)`` over the ``G'`` non-empty groups (the textbook
    ``(G−1)/G Σ (θ̂_(−g) − mean)²`` for equal groups). NaN for ``n_samples < 2``.
    """
    sizes = [m for m in group_sizes(n_samples, sums[0].shape[0]) if m > 0]
    used = len(sizes)
    first = sums[0]
    if n_samples < 2:
        return torch.full(
            estimate(*[s[0] for s in sums]).shape, float("nan"), dtype=first.dtype, device=first.device
        )
    totals = [s[:used].sum(0) for s in sums]
    full = estimate(*[t / n_samples for t in totals])
    # One group left out at a time: the temporaries are one group's size, not G times it.
    leave_out = torch.stack(
        [
            estimate(*[(t - s[g]) / (n_samples - m) for t, s in zip(totals, sums, strict=True)])
            for g, m in enumerate(sizes)
        ]
    )  # (G', batch, ...)
    m = torch.tensor(sizes, dtype=first.dtype, device=first.device)
    view = (-1,) + (1,) * full.dim()
    h = (n_samples / m).view(view)
    pseudo = h * full - (h - 1) * leave_out
    theta_j = used * full - ((1 - m / n_samples).view(view) * leave_out).sum(0)
    var = ((pseudo - theta_j).square() / (h - 1)).sum(0) / used
    return var.clamp_(min=0).sqrt_()


class SampleStore:
    """Keeps raw samples ``(N, B, *shape)`` when the user asked for them."""

    def __init__(self, n_samples: int) -> None:
        self.n_samples = n_samples
        self.data: torch.Tensor | None = None
        self.filled: list[int] = []

    def update(self, start: int, stop: int, chunk: torch.Tensor, batch_size: int) -> None:
        """Write ``chunk`` into the next free sample slots of rows ``start:stop``."""
        if self.data is None:
            self.data = chunk.new_empty((self.n_samples, batch_size, *chunk.shape[2:]))
            self.filled = [0] * batch_size
        at = self.filled[start]
        k = chunk.shape[0]
        self.data[at : at + k, start:stop] = chunk
        for i in range(start, stop):
            self.filled[i] = at + k


class ClassificationStats:
    """Running statistics of per-sample class probabilities.

    Args:
        output_type: ``"logits"``, ``"probs"`` or ``"log_probs"``.
        class_dim: Class dimension of one model output ``(b, ...)`` (so 1 for ``(b, K)``).
        prob_tolerance: Allowed deviation of declared probabilities from summing to 1.
        detect_probs: Watch logits (``output_type`` not given, so ``"logits"`` by default) for rows
            that are probabilities; :meth:`check_reading` then refuses them.
    """

    def __init__(
        self, output_type: str, class_dim: int, prob_tolerance: float = 1e-3, *, detect_probs: bool = False
    ) -> None:
        self.output_type = output_type
        self.class_dim = class_dim
        self.prob_tolerance = prob_tolerance
        self.probs = RunningMoments(higher=True)
        self.entropy = RunningMoments()
        # Group sums of p_t and H[p_t] for the jackknife standard errors of H[p̄] and the mutual
        # information: JACKKNIFE_GROUPS · (K + 1) numbers per row, at any N.
        self.probs_groups = GroupedSums()
        self.entropy_groups = GroupedSums()
        self.votes: torch.Tensor | None = None
        self.binary = False
        #: Whether the higher moments and group sums are streamed: for one class vector per input,
        #: not for dense outputs (a segmentation map's every position), where they would take
        #: JACKKNIFE_GROUPS + 2 times the memory of the probabilities (see :meth:`_dense`).
        self.detailed = True
        # None: nothing seen yet; True while every row seen is a probability vector (see check_reading).
        self.looks_like_probs: bool | None = None if detect_probs and output_type == "logits" else False

    def to_probs(self, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample probabilities and log-probabilities, class dimension last."""
        _check_real_dtype(chunk)
        per_sample = chunk.dim() - 1  # one model output (batch, ...)
        if not -per_sample <= self.class_dim < per_sample or self.class_dim % per_sample == 0:
            raise InvalidInputError(
                f"class_dim={self.class_dim} does not name a class dimension of a model output of shape "
                f"{tuple(chunk.shape[1:])} (batch first, so the batch is dim 0). Set class_dim= to the "
                "class dimension, e.g. 1 for (batch, K) or (batch, K, H, W)."
            )
        dim = self.class_dim % per_sample + 1
        tolerance = max(self.prob_tolerance, float(torch.finfo(chunk.dtype).eps) ** 0.5)
        x = chunk.movedim(dim, -1).to(_acc_dtype(chunk))
        if x.shape[-1] == 1:
            # One output per input: a binary classifier, the positive-class logit / probability.
            self.binary = True
            if self.output_type == "logits":
                logp1 = torch.nn.functional.logsigmoid(x)
                logp0 = torch.nn.functional.logsigmoid(-x)
                logp = torch.cat([logp0, logp1], -1)
                return logp.exp(), logp
            p1 = x if self.output_type == "probs" else x.exp()
            self._check_unit_interval(p1, tolerance)
            p1 = p1.clamp(0.0, 1.0)  # rounding within the tolerance, not a different law
            p = torch.cat([1 - p1, p1], -1)
            return p, torch.log(p)
        if self.output_type == "logits":
            if bool((x == float("-inf")).all(-1).any()):
                raise NonFiniteError(
                    "A model output row has every logit at -inf (every class masked), so its class "
                    "probabilities are undefined. Leave at least one class unmasked per input."
                )
            logp = torch.log_softmax(x, -1)
            return logp.exp(), logp
        p = x if self.output_type == "probs" else x.exp()
        self._check_unit_interval(p, tolerance)
        sums = p.sum(-1)
        worst = (sums - 1).abs().max()
        if worst > tolerance:
            raise InvalidInputError(
                f"output_type='{self.output_type}' was declared, but the model's outputs do not sum to 1 "
                f"over class_dim={self.class_dim} (worst row sums to {float(sums.flatten()[(sums - 1).abs().flatten().argmax()]):.4g}). "
                "If the model returns logits, use output_type='logits'; otherwise check class_dim."
            )
        # Accepted rows are off by rounding at most (e.g. a float16 softmax): normalised here, so
        # every per-pass distribution sums to 1 and its entropy stays within [0, ln K].
        if self.output_type == "log_probs":
            logp = x - torch.logsumexp(x, -1, keepdim=True)
            return logp.exp(), logp
        p = p.clamp(min=0.0)
        p = p / p.sum(-1, keepdim=True)
        return p, torch.log(p)

    def _check_unit_interval(self, p: torch.Tensor, tolerance: float) -> None:
        if bool((p < -tolerance).any()) or bool((p > 1 + tolerance).any()):
            what = "outputs" if self.output_type == "probs" else "exp(outputs)"
            raise InvalidInputError(
                f"output_type='{self.output_type}' was declared, but the model's {what} fall outside "
                f"[0, 1] (min {float(p.min()):.4g}, max {float(p.max()):.4g}). If the model returns "
                "logits, use output_type='logits'."
            )

    def check_reading(self) -> None:
        """Refuse logits that were probabilities: every row of every pass non-negative, summing to 1.

        Read as logits they would go through a second softmax (a model ending in ``nn.Softmax``),
        which flattens every distribution. Only with ``detect_probs`` (``output_type`` not given).

        Raises:
            InvalidInputError: Every row seen in this call was a probability vector.
        """
        if self.looks_like_probs:
            raise InvalidInputError(
                "The model's outputs look like probabilities, not logits: in every pass every row is "
                f"non-negative and sums to 1 over class_dim={self.class_dim} (e.g. the model ends in "
                "nn.Softmax). Read as logits (output_type's default) they would go through a second "
                "softmax, and every probability and uncertainty would be wrong. Pass "
                "output_type='probs' (or 'log_probs' for log-probabilities); if these really are "
                "logits, pass output_type='logits' to say so."
            )

    def _dense(self, p_last: torch.Tensor) -> None:
        """On the first chunk: dense outputs ``(k, b, ..., K)`` stream no higher moments nor groups.

        A segmentation map has one class vector per position; streaming M3, M4 and the jackknife
        group sums there would hold ``JACKKNIFE_GROUPS + 2`` times the memory of the
        probabilities (and slow every chunk), so the standard errors that need them (of ``std``,
        ``predictive_entropy``, ``mutual_information``) are not available for such outputs.
        """
        if self.probs.mean is None and p_last.dim() > 3:
            self.detailed = False
            self.probs.higher = False

    def update(self, start: int, stop: int, chunk: torch.Tensor, batch_size: int) -> None:
        """Merge a chunk of raw model outputs for rows ``start:stop``."""
        if self._update_logits(start, stop, chunk, batch_size):
            return
        p, logp = self.to_probs(chunk)
        self._dense(p)
        self.probs.update(start, stop, p, batch_size)
        if self.detailed:
            self.probs_groups.update(start, stop, p, batch_size)
        ent = -(p * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)
        ent = torch.where(torch.isfinite(ent), ent, torch.zeros_like(ent)).clamp_(min=0)
        self.entropy.update(start, stop, ent, batch_size)
        if self.detailed:
            self.entropy_groups.update(start, stop, ent, batch_size)
        # Votes: how many samples put each class first. Scattered straight into the counts, so a
        # chunk costs one int64 index per sample and position, not a one-hot tensor K times larger.
        top = p.argmax(-1).movedim(0, -1)  # (b, ..., k_samples)
        if self.votes is None:
            shape = (batch_size, *p.shape[2:])
            self.votes = torch.zeros(shape, dtype=torch.int32, device=p.device)
        self.votes[start:stop].scatter_add_(-1, top, torch.ones_like(top, dtype=torch.int32))

    def take_rows(self, rows: torch.Tensor) -> ClassificationStats:
        """The statistics of the rows ``rows`` (indices), in that order, as a new object.

        What adaptive sampling uses to keep the inputs still sampled a contiguous block, and to
        finish the inputs that stopped at one number of samples together.
        """
        out = copy.copy(self)
        out.probs = self.probs.take_rows(rows)
        out.entropy = self.entropy.take_rows(rows)
        out.probs_groups = self.probs_groups.take_rows(rows)
        out.entropy_groups = self.entropy_groups.take_rows(rows)
        out.votes = None if self.votes is None else self.votes.index_select(0, rows.to(self.votes.device))
        return out

    def _update_logits(self, start: int, stop: int, chunk: torch.Tensor, batch_size: int) -> bool:
        """The common case (logits, two or more classes), computed in the output's own layout.

        Softmax, entropy and votes run along the class dimension where it is (contiguous memory,
        so a segmentation map ``(k, b, K, H, W)`` is not walked with a stride of ``H * W``); only
        the probabilities are laid out class-last, once, for their running moments. Returns False
        when the general path must handle the chunk.
        """
        if self.output_type != "logits" or chunk.is_complex() or not chunk.is_floating_point():
            return False
        per_sample = chunk.dim() - 1
        if not -per_sample <= self.class_dim < per_sample or self.class_dim % per_sample == 0:
            return False
        dim = self.class_dim % per_sample + 1
        if chunk.shape[dim] < 2:
            return False
        x = chunk.to(_acc_dtype(chunk))
        if bool((x.amax(dim) == float("-inf")).any()):
            raise NonFiniteError(
                "A model output row has every logit at -inf (every class masked), so its class "
                "probabilities are undefined. Leave at least one class unmasked per input."
            )
        if self.looks_like_probs is not False:
            self.looks_like_probs = _probability_rows(x, dim, chunk.dtype)
        logp = torch.log_softmax(x, dim)
        p = logp.exp()
        # -inf log-probabilities (masked classes) have p = 0: clamped, they add 0, not NaN.
        ent = (p * logp.clamp_(min=torch.finfo(logp.dtype).min)).sum(dim).neg_().clamp_(min=0)
        p_last = p.movedim(dim, -1).contiguous()
        self._dense(p_last)
        self.probs.update(start, stop, p_last, batch_size)
        self.entropy.update(start, stop, ent, batch_size)
        if self.detailed:
            self.probs_groups.update(start, stop, p_last, batch_size)
            self.entropy_groups.update(start, stop, ent, batch_size)
        top = p_last.argmax(-1).movedim(0, -1)  # (b, ..., k_samples)
        if self.votes is None:
            shape = (batch_size, *p_last.shape[2:])
            self.votes = torch.zeros(shape, dtype=torch.int32, device=p.device)
        self.votes[start:stop].scatter_add_(-1, top, torch.ones_like(top, dtype=torch.int32))
        return True


class RegressionStats:
    """Running statistics of regression outputs, with an optional per-sample aleatoric variance.

    Args:
        aleatoric: ``None``, ``"variance"`` or ``"log_variance"`` (what the second output is).
    """

    def __init__(self, aleatoric: str | None) -> None:
        self.aleatoric = aleatoric
        self.mean = RunningMoments(higher=True)
        self.noise = RunningMoments() if aleatoric else None

    def update(
        self, start: int, stop: int, chunk: torch.Tensor | tuple[torch.Tensor, torch.Tensor], batch_size: int
    ) -> None:
        """Merge a chunk (or a ``(mean, variance)`` pair of chunks) for rows ``start:stop``."""
        for part in chunk if isinstance(chunk, tuple) else (chunk,):
            _check_real_dtype(part)
            if bool(torch.isinf(part).any()):
                raise NonFiniteError(
                    "The model produced infinite regression outputs while dropout was on; outputs must "
                    "be finite (check for overflow, e.g. exp of a large log-variance, or float16 range)."
                )
        if self.noise is None:
            assert isinstance(chunk, torch.Tensor)
            self.mean.update(start, stop, chunk, batch_size)
            return
        mean, second = chunk
        var = aleatoric_variances(second.to(_acc_dtype(second)), self.aleatoric)
        if self.aleatoric != "log_variance" and bool((var < 0).any()):
            raise InvalidInputError(
                "aleatoric='variance' was declared, but the model's variance output has negative values "
                f"(min {float(var.min()):.4g}). If it is a log-variance, use aleatoric='log_variance'."
            )
        if mean.shape != var.shape:
            raise InvalidInputError(
                f"The model's mean {tuple(mean.shape[1:])} and variance {tuple(var.shape[1:])} outputs "
                "must have the same shape."
            )
        self.mean.update(start, stop, mean, batch_size)
        self.noise.update(start, stop, var, batch_size)

    def take_rows(self, rows: torch.Tensor) -> RegressionStats:
        """The statistics of the rows ``rows`` (indices), in that order, as a new object."""
        out = RegressionStats(self.aleatoric)
        out.mean = self.mean.take_rows(rows)
        out.noise = None if self.noise is None else self.noise.take_rows(rows)
        return out


def resolve_reading(
    task: str,
    aleatoric: str | None,
    output_type: str | None,
    class_dim: int | None,
    chunk: Any,
    *,
    num_labels: int | None = None,
    problem_type: str | None = None,
) -> tuple[str, int]:
    """How a call reads its output: the task and, for classification, the class dimension.

    Read from the options and the first chunk ``(k, b, ...)``; ``output_type`` and ``class_dim``
    are ``None`` where the user did not give them, ``num_labels`` and ``problem_type`` what a
    Hugging Face-style ``model.config`` says of the logits (``None``: nothing). The first rule that
    applies decides (docs/outputs.md, "How an output is read").

    The task, for ``task="auto"``: regression when ``aleatoric`` is set; classification when
    ``output_type`` is ``"probs"`` or ``"log_probs"``; regression for one value per input (a chunk
    ``(k, b)`` or ``(k, b, 1)``) or a config whose ``problem_type`` is ``"regression"``;
    classification otherwise, where the class dimension below can be told.

    The class dimension of one output ``(b, ...)`` when ``class_dim`` is not given: the one
    non-batch dimension whose size is ``num_labels``; else 1 for ``(b, K)`` and for three or more
    non-batch dimensions ``(b, K, d1, d2, ...)`` (PyTorch's layout of dense predictions, as
    ``nn.CrossEntropyLoss`` takes them). Two non-batch dimensions ``(b, A, L)`` are refused:
    ``(b, K, L)``, ``(b, L, K)`` (token classification) and ``(b, H, W)`` (a map) are all common.

    Returns:
        ``("classification", class_dim)`` or ``("regression", 1)`` (the class dimension unused).

    Raises:
        InvalidInputError: The class dimension cannot be told (the message names ``class_dim=``
            and ``task=``).
    """
    if task == "regression" or (task == "auto" and aleatoric is not None):
        return "regression", 1
    if task == "auto" and output_type not in ("probs", "log_probs"):
        per_input = tuple(chunk.shape[2:])
        if per_input in ((), (1,)) or problem_type == "regression":
            return "regression", 1
    if class_dim is not None:
        return "classification", class_dim
    return "classification", _class_dim_of(tuple(chunk.shape[2:]), num_labels, task)


def _class_dim_of(per_input: tuple[int, ...], num_labels: int | None, task: str) -> int:
    """The class dimension of one output ``(b, *per_input)`` when ``class_dim`` was not given."""
    if len(per_input) <= 1:
        return 1
    named = [d + 1 for d, size in enumerate(per_input) if size == num_labels]
    if len(named) == 1:
        return named[0]
    if len(per_input) >= 3 and (not named or 1 in named):
        return 1
    shape = ", ".join(["batch", *map(str, per_input)])
    if len(named) > 1:
        why = (
            f"the model's config says num_labels={num_labels}, which is the size of dimensions "
            f"{named}, so the class dimension is not known"
        )
    else:
        why = "nothing says which dimension holds the classes"
        if num_labels is not None:
            why += f" (the model's config says num_labels={num_labels}, the size of none)"
        why += ": (batch, K, length), (batch, length, K) as in token classification, and (batch, H, W) "
        why += "maps are all common"
    whether = ", or whether it holds classes at all (task='auto')" if task == "auto" else ""
    raise InvalidInputError(
        f"The model's output has shape ({shape}) and {why}{whether}. Say how to read it: "
        "class_dim=-1 for classes last (batch, length, K), class_dim=1 for (batch, K, ...), "
        "task='regression' for real values (a forecast, a regression map); for one logit per "
        "position (a squeezed binary segmentation map (batch, H, W)), "
        "output=lambda out: out.unsqueeze(1) with class_dim=1."
    )


def negligible_spread(variance: torch.Tensor, mean: torch.Tensor) -> bool:
    """True when samples differ by no more than float rounding (relative 1e-6): identical samples."""
    return bool((variance <= (1e-6 * mean.abs().clamp(min=1.0)).square()).all())


def mean_standard_error(moments: RunningMoments, n_samples: int) -> torch.Tensor:
    """The standard error of the mean of N samples, ``sqrt(s² / N)``.

    With the unbiased ``s² = M2 / (N − 1)``. NaN for ``N < 2``.
    """
    assert moments.m2 is not None
    if n_samples < 2:
        return torch.full_like(moments.m2, float("nan"))
    return (moments.m2.clamp(min=0) / ((n_samples - 1) * n_samples)).sqrt_()


def variance_standard_error(moments: RunningMoments, n_samples: int) -> torch.Tensor:
    """The large-sample standard error of the population variance ``v = M2 / N`` of N samples.

    ``Var(s²) = μ4/N − σ⁴ (N − 3) / (N (N − 1))`` for the unbiased ``s²`` (``v = (N − 1)/N · s²``),
    with ``μ4`` and ``σ⁴`` estimated by the plug-ins ``m4 = M4/N`` and ``m2² = (M2/N)²``:
    ``SE(v) = (N − 1)/N · sqrt(max(m4 − m2² (N − 3)/(N − 1), 0) / N)``. NaN for ``N < 2``.
    """
    assert moments.m2 is not None and moments.m4 is not None
    if n_samples < 2:
        return torch.full_like(moments.m2, float("nan"))
    n = n_samples
    m2 = moments.m2.clamp(min=0) / n
    m4 = moments.m4.clamp(min=0) / n
    return ((m4 - m2.square() * ((n - 3) / (n - 1))).clamp_(min=0) / n).sqrt_().mul_((n - 1) / n)
