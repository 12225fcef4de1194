"""``MCDropout``: the one object a user needs — policy, sampling engine and predictions tied together."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mcdrop._checks import check_bool, check_choice, check_int
from mcdrop._gatecheck import CHECK_ROWS, NoDropout, check_gates, cuda_devices, eager_module, rng_untouched
from mcdrop._probe import PeakBytesMode
from mcdrop._rnglock import rng_access
from mcdrop._statistics import ClassificationStats, RegressionStats, SampleStore
from mcdrop.errors import (
    GateRandomnessWarning,
    InvalidInputError,
    InvalidTypeError,
    ModelStateError,
    NoRandomnessWarning,
)
from mcdrop.metrics.streaming import (
    StreamingClassificationMetrics,
    StreamingMetrics,
    StreamingRegressionMetrics,
)
from mcdrop.predictions import ClassificationPrediction, Prediction, RegressionPrediction, concat_predictions
from mcdrop.sampling import (
    CHECK_MARGIN,
    DEFAULT_MEMORY_BUDGET,
    STRATEGIES,
    Inputs,
    OutputSelector,
    _signature,
    autocast_context,
    check_row_count,
    holds_objects,
    input_generators_untouched,
    model_device_dtype,
    prepare_inputs,
    replicate,
    sample_chunks,
    select_output,
    slice_batch,
    split_errors_named,
)
from mcdrop.stochastic import INCLUDED_NOTE, StochasticPolicy, StochasticSite, is_rate_holder
from mcdrop.stochastic import describe as describe_sites

__all__ = ["MCDropout"]

_TARGET_KEYS = ("labels", "label", "targets", "target", "y")


class MCDropout:
    """Monte Carlo dropout for any PyTorch model: N stochastic passes in batch, and their statistics.

    The model is never moved, cast or modified: on every call its dropout (and only its dropout,
    see :mod:`mcdrop.stochastic`) is switched on, the passes are drawn, and every module's
    ``training`` flag is restored, also when an exception interrupts.

    Args:
        model: A trained ``nn.Module`` (its device and floating dtype are used for the inputs).
        n_samples: Number of stochastic forward passes N per input (≥ 1).
        task: ``"classification"``, ``"regression"`` or ``"auto"``. ``"auto"`` picks regression when
            ``aleatoric`` is set or one output per input comes out (shape ``(batch,)`` or
            ``(batch, 1)``), classification otherwise; say ``task="regression"`` for a multi-output
            regression model and ``task="classification"`` for a one-logit binary classifier.
        output_type: For classification, what the model returns: ``"logits"`` (default),
            ``"probs"`` or ``"log_probs"``. One output per input means a binary classifier's
            positive class (sigmoid of the logit).
        aleatoric: For regression models that also predict their noise: ``"variance"`` or
            ``"log_variance"``. The model must then output ``(mean, variance)`` as a pair of tensors,
            or one tensor whose last dim holds the two halves.
        class_dim: Class dimension of the model output, batch first (default 1, PyTorch's
            convention; ``(batch, K, H, W)`` segmentation maps work as they are).
        batch_dim: Batch dimension of the inputs: an int for all of them, or a mapping from argument
            names / dict keys / positional indices to an int, or ``None`` for a tensor that is not
            batched (shared by all rows); ``"*"`` gives the default for the rest.
        output_batch_dim: Batch dimension of the analysed output; defaults to ``batch_dim`` when that
            is an int, else 0. Results are always returned batch first.
        output: Which part of the model output to analyse: ``None`` (a tensor as is; the ``logits``
            of a dict or output object; the first element of a tuple), a key or attribute name, a
            tuple index, or a callable ``output(model_output) -> tensor``.
        max_batch_size: Most rows per forward pass (replicas times inputs). ``None`` chooses from
            ``memory_budget`` and the sizes of inputs, outputs and activations (on the CPU, passes
            small enough to stay fast; see ``docs/performance.md``).
        memory_budget: Bytes of tensor storage one forward pass may hold, for the automatic choice
            (default 256 MiB), as measured on a first pass of one row and on the probe pass (see
            ``docs/performance.md``). A model whose rows affect each other always gets whole batches.
        seed: An integer in ``[0, 2**64)`` that makes the samples exactly reproducible: a wrapper
            built with the same seed and the same options draws the same sequence of samples over
            the same calls. The draws depend on how the passes are cut into forward passes, so
            another ``max_batch_size``, ``memory_budget`` or ``strategy`` (or another device) gives
            other, equally distributed samples. The global RNG state is left untouched.
            ``None`` draws from (and advances) torch's global RNG. While a seeded wrapper samples
            it holds torch's process-wide generator alone: mcdrop sampling in other threads waits
            for it (unseeded calls share the generator and run together).
        keep_samples: Keep the raw outputs ``(N, batch, ...)`` in ``prediction.samples``.
        drop_path: Also sample drop-path / stochastic-depth modules.
        include: Extra modules to switch on (see :func:`mcdrop.find_stochastic_sites`).
        exclude: Modules to keep in eval mode (see :func:`mcdrop.find_stochastic_sites`).
        strategy: How the N passes are drawn: ``"auto"`` (default), ``"vmap"``, ``"replicate"`` or
            ``"loop"``. ``"vmap"`` runs the model under :func:`torch.func.vmap` over the samples,
            so whatever precedes the first dropout (a CNN's convolutions, an MLP's first layer) is
            computed once per chunk instead of once per sample; ``"replicate"`` repeats the batch
            along its batch dimension; ``"loop"`` makes one pass per sample. ``"auto"`` watches the
            first pass and uses vmap when the deterministic part holds a fifth of the FLOPs or
            more and vmap runs the model and draws fresh randomness for every sample, otherwise
            replication, otherwise the loop; the choice is remembered per input signature and
            logged (with its reason) at DEBUG level on the ``mcdrop.sampling`` logger. All draw
            the same distribution of samples. A model whose rows affect each other's outputs (a
            mean over the batch) is detected on a few rows and never replicated nor split: every
            pass holds the whole batch once, and ``"replicate"`` raises for it (see
            ``docs/performance.md``).
        dtype: ``torch.bfloat16`` or ``torch.float16`` runs the model under :func:`torch.autocast`
            in that precision (mixed precision: faster on hardware with fast low-precision
            kernels); samples and statistics are still returned and accumulated in float32.
            ``None`` (default) runs the model as it is.

    Raises:
        NoDropoutError: The model has no dropout randomness to sample.

    Example:
        >>> import torch, mcdrop
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(),
        ...                           torch.nn.Dropout(0.3), torch.nn.Linear(32, 3)).eval()
        >>> mc = mcdrop.MCDropout(net, n_samples=20, seed=0)
        >>> mc.sample(torch.randn(8, 4)).shape
        torch.Size([20, 8, 3])
        >>> pred = mc.predict(torch.randn(8, 4))
        >>> pred.probs.shape, pred.mutual_information.shape
        (torch.Size([8, 3]), torch.Size([8]))
    """

    def __init__(
        self,
        model: nn.Module,
        n_samples: int = 50,
        *,
        task: str = "auto",
        output_type: str = "logits",
        aleatoric: str | None = None,
        class_dim: int = 1,
        batch_dim: int | Mapping[Any, int | None] = 0,
        output_batch_dim: int | None = None,
        output: OutputSelector = None,
        max_batch_size: int | None = None,
        memory_budget: int | None = None,
        seed: int | None = None,
        keep_samples: bool = False,
        drop_path: bool = False,
        include: Any = None,
        exclude: Any = None,
        strategy: str = "auto",
        dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise InvalidTypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        self.model = model
        self.n_samples = check_int(n_samples, "n_samples", minimum=1)
        self.task = check_choice(task, ("auto", "classification", "regression"), "task")
        self.output_type = check_choice(output_type, ("logits", "probs", "log_probs"), "output_type")
        if aleatoric is not None:
            check_choice(aleatoric, ("variance", "log_variance"), "aleatoric")
            if self.task == "classification":
                raise InvalidInputError(
                    "aleatoric= applies to regression; it cannot be used with task='classification'."
                )
        self.aleatoric = aleatoric
        self.class_dim = check_int(class_dim, "class_dim")
        if not isinstance(batch_dim, Mapping):
            check_int(batch_dim, "batch_dim")
        self.batch_dim = batch_dim
        if output_batch_dim is None:
            output_batch_dim = batch_dim if isinstance(batch_dim, int) else 0
        self.output_batch_dim = check_int(output_batch_dim, "output_batch_dim")
        if not (output is None or callable(output) or isinstance(output, (str, int))):
            raise InvalidTypeError(
                f"output must be None, a key/attribute name, a tuple index or a callable; got {output!r}."
            )
        self.output = output
        self.max_batch_size = (
            None if max_batch_size is None else check_int(max_batch_size, "max_batch_size", minimum=1)
        )
        self.memory_budget = (
            DEFAULT_MEMORY_BUDGET
            if memory_budget is None
            else check_int(memory_budget, "memory_budget", minimum=1)
        )
        self.seed = None if seed is None else check_int(seed, "seed", minimum=0, maximum=2**64 - 1)
        self.keep_samples = check_bool(keep_samples, "keep_samples")
        self.policy = StochasticPolicy(model, drop_path=drop_path, include=include, exclude=exclude)
        self._rng_state: dict[str, torch.Tensor] | None = None
        self.strategy = check_choice(strategy, STRATEGIES, "strategy")
        if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
            raise InvalidInputError(
                f"dtype must be None, torch.bfloat16 or torch.float16 (the autocast precision); got {dtype!r}."
            )
        self.dtype = dtype
        self._auto_budget = memory_budget is None
        self._engine_cache: dict[Any, Any] = {}
        self._gates_checked: set[Any] = set()
        if not self.policy.has_randomness:
            warnings.warn(
                "Every sampled dropout site has rate 0, so all MC samples will be identical and every "
                "uncertainty estimate zero: "
                + ", ".join(s.path or "<model>" for s in self.policy.sampled_sites),
                NoRandomnessWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------ public API
    @property
    def sites(self) -> list[StochasticSite]:
        """Every stochastic site of the model as it is now (current rates), sampled or not.

        The model is scanned again on each access, so a rate changed with
        :func:`mcdrop.set_dropout_rate` after the wrapper was built shows here.
        """
        return self.policy.current_sites()

    def sample(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Draw the N stochastic outputs for one batch of inputs, samples-first.

        Args:
            *args: Positional inputs of the model (tensors are replicated along ``batch_dim``).
            **kwargs: Keyword inputs of the model.

        Returns:
            The selected output (see ``output=``) of every pass, shape ``(n_samples, batch, ...)``;
            a ``(mean, variance)`` pair of such tensors for an ``aleatoric`` model.

        Example:
            >>> import torch, mcdrop
            >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.5)).eval()
            >>> s = mcdrop.MCDropout(net, n_samples=4, seed=1).sample(torch.ones(2, 3))
            >>> s.shape, bool((s[0] != s[1]).any())
            (torch.Size([4, 2, 8]), True)
        """
        store = SampleStore(self.n_samples)
        store2 = SampleStore(self.n_samples) if self.aleatoric else None
        with self._session():
            inputs = self._prepare(args, kwargs)
            self._check_gates(inputs)
            for start, stop, chunk in self._chunks(inputs):
                if store2 is not None:
                    store.update(start, stop, chunk[0], inputs.batch_size)
                    store2.update(start, stop, chunk[1], inputs.batch_size)
                else:
                    store.update(start, stop, chunk, inputs.batch_size)
        assert store.data is not None
        self._warn_if_identical_samples(store.data)
        return store.data if store2 is None else (store.data, store2.data)  # type: ignore[return-value]

    def predict(self, *args: Any, **kwargs: Any) -> Prediction:
        """Draw N passes for one batch and reduce them to a :class:`~mcdrop.Prediction`.

        Statistics are streamed chunk by chunk, so memory does not grow with N unless
        ``keep_samples=True``.

        Args:
            *args: Positional inputs of the model.
            **kwargs: Keyword inputs of the model (or unpack a dict: ``mc.predict(**batch)``).

        Returns:
            A :class:`~mcdrop.ClassificationPrediction` or :class:`~mcdrop.RegressionPrediction`.

        Example:
            >>> import torch, mcdrop
            >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.2),
            ...                           torch.nn.Linear(16, 1)).eval()
            >>> pred = mcdrop.MCDropout(net, n_samples=25, seed=0).predict(torch.randn(6, 4))
            >>> pred.task, pred.mean.shape
            ('regression', torch.Size([6, 1]))
        """
        with self._session():
            return self._predict_one(args, kwargs)

    def predict_loader(
        self,
        loader: Iterable[Any],
        *,
        unpack: Callable[[Any], tuple[Any, Any]] | None = None,
        progress: bool = True,
        keep: str = "predictions",
        metrics: StreamingMetrics | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        checkpoint_every: int = 100,
    ) -> Any:
        """Predict a whole ``DataLoader`` (or any iterable of batches), with its targets.

        With ``keep="predictions"`` (default) the per-input statistics of every input are kept and
        returned as one :class:`~mcdrop.Prediction` (float32 unless the model runs in float64; raw
        samples only with ``keep_samples=True``), so memory grows with the number of inputs. With
        ``keep="metrics"`` only streaming metric accumulators are kept
        (:mod:`mcdrop.metrics.streaming`: calibration bins, sums for Brier score and NLL, score
        histograms for the misclassification AUROC), so memory is O(bins) whatever the size of the
        data set, and ECE, Brier score, NLL and accuracy equal those of the in-memory path to float64
        rounding. For several processes or GPUs see :func:`mcdrop.distributed.predict_loader`.

        Args:
            loader: Yields batches: a tensor; a tuple/list ``(inputs, targets, ...)``; or a dict of
                model keyword inputs, from which the keys ``labels``, ``label``, ``targets``,
                ``target`` and ``y`` are taken out as targets.
            unpack: ``unpack(batch) -> (inputs, targets)`` for other batch layouts; ``inputs`` is a
                tensor, a tuple of positional inputs or a dict of keyword inputs; ``targets`` may be
                ``None``.
            progress: Show a tqdm progress bar.
            keep: ``"predictions"`` (default) or ``"metrics"`` (needs targets in every batch).
            metrics: An accumulator to add to, e.g. ``StreamingClassificationMetrics(n_bins=20)`` for
                other bins; implies ``keep="metrics"``. ``None`` builds one with the default options.
            checkpoint: ``keep="metrics"`` only: a file where the accumulators, the number of batches
                done and the wrapper's RNG state are saved every ``checkpoint_every`` batches and at
                the end. If the file exists, the run resumes from it: the batches already done are
                read from the loader but not evaluated, and a seeded wrapper continues its random
                stream, so the result equals that of an uninterrupted run (the loader must yield the
                same batches in the same order). A finished checkpoint returns its result at once.
            checkpoint_every: Batches between two checkpoints (default 100).

        Returns:
            ``keep="predictions"``: the predictions of all batches concatenated, with ``targets``
            filled in when the batches carried them. ``keep="metrics"``: a
            :class:`~mcdrop.metrics.streaming.StreamingMetrics`; ``.summary()`` gives the metrics.

        Raises:
            InvalidInputError: An empty loader, targets that do not match, an unknown ``keep``,
                ``keep="metrics"`` without targets, or a checkpoint from another configuration.

        Example:
            >>> import torch, mcdrop
            >>> from torch.utils.data import DataLoader, TensorDataset
            >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.2),
            ...                           torch.nn.Linear(16, 3)).eval()
            >>> data = TensorDataset(torch.randn(10, 4), torch.randint(0, 3, (10,)))
            >>> pred = mcdrop.MCDropout(net, n_samples=5, seed=0).predict_loader(
            ...     DataLoader(data, batch_size=4), progress=False)
            >>> len(pred), pred.targets.shape
            (10, torch.Size([10]))
            >>> stream = mcdrop.MCDropout(net, n_samples=5, seed=0).predict_loader(
            ...     DataLoader(data, batch_size=4), progress=False, keep="metrics")
            >>> abs(stream.summary()["ECE"] - mcdrop.metrics.expected_calibration_error(
            ...     pred.probs, pred.targets)) < 1e-12
            True
        """
        keep = check_choice(keep, ("predictions", "metrics"), "keep")
        if metrics is not None:
            if not isinstance(metrics, StreamingMetrics):
                raise InvalidTypeError(
                    f"metrics must be a StreamingMetrics accumulator; got {type(metrics).__name__}."
                )
            keep = "metrics"
        if keep == "metrics":
            result = self._stream_metrics(
                loader,
                unpack=unpack,
                progress=progress,
                metrics=metrics,
                checkpoint=checkpoint,
                checkpoint_every=checkpoint_every,
            )
            if result is None:
                raise InvalidInputError("The loader yielded no batches: there is nothing to predict.")
            return result
        if checkpoint is not None:
            raise InvalidInputError(
                "checkpoint= needs keep='metrics': a checkpoint holds the streaming accumulators, not "
                "per-input predictions."
            )

        parts: list[Prediction] = []
        targets: list[torch.Tensor] = []
        has_targets = True
        with contextlib.closing(self._iter_loader(loader, unpack, progress)) as batches:
            for pred, target in batches:
                assert pred is not None
                parts.append(pred)
                if target is None:
                    has_targets = False
                elif has_targets:
                    targets.append(torch.as_tensor(target).detach().cpu())
        if not parts:
            raise InvalidInputError("The loader yielded no batches: there is nothing to predict.")
        result = concat_predictions(parts)
        if has_targets and targets:
            result.targets = torch.cat(targets, 0)
            if result.targets.shape[0] != len(result):
                raise InvalidInputError(
                    f"The loader's targets have {result.targets.shape[0]} rows for {len(result)} inputs."
                )
        return result

    def _iter_loader(
        self,
        loader: Iterable[Any],
        unpack: Callable[[Any], tuple[Any, Any]] | None,
        progress: bool,
        skip: int = 0,
    ) -> Iterator[tuple[Prediction | None, Any]]:
        """``(prediction, targets)`` per batch; the first ``skip`` batches are read, not evaluated.

        Dropout stays on and gradients off between the yields: wrap the generator in
        ``contextlib.closing`` so that an exception in the consumer restores the model at once.
        """
        from tqdm.auto import tqdm

        # The loader is iterated outside the wrapper's RNG stream: its shuffling and augmentations
        # draw from the global RNG as usual, and the dropout masks do not depend on the loader.
        # tqdm is updated by hand rather than wrapped around the loader: wrapping a DataLoader in
        # tqdm changes which global random numbers its shuffling sampler draws.
        total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
        bar = tqdm(total=total, desc="MC dropout", unit="batch", disable=not progress, leave=False)
        with bar, self.policy.activate(), torch.no_grad():
            for number, batch in enumerate(loader):
                inputs, target = (unpack or _default_unpack)(batch)
                if number < skip:
                    bar.update()
                    yield None, target
                    continue
                if isinstance(inputs, Mapping):
                    args, kwargs = (), dict(inputs)
                elif isinstance(inputs, tuple):
                    args, kwargs = inputs, {}
                else:
                    args, kwargs = (inputs,), {}
                with self._rng():
                    pred = self._predict_one(args, kwargs)
                bar.update()
                yield pred, target

    def _fingerprint(self) -> dict[str, Any]:
        """What must not change between a checkpoint and its resumption."""
        return {
            "model": type(self.model).__name__,
            "n_samples": self.n_samples,
            "task": self.task,
            "output_type": self.output_type,
            "aleatoric": self.aleatoric,
            "class_dim": self.class_dim,
            "seed": self.seed,
            "max_batch_size": self.max_batch_size,
            "memory_budget": self.memory_budget,
            # how the passes are drawn and read: another setting would mix two sets of draws
            "strategy": self.strategy,
            "dtype": str(self.dtype),
            "output": _describe_option(self.output),
            "output_batch_dim": self.output_batch_dim,
            "batch_dim": _batch_dim_option(self.batch_dim),
            # which sites are sampled, at which rates (include=, exclude=, drop_path=, set_dropout_rate)
            "sampled_sites": [f"{s.path or '<model>'}:{s.kind}:{s.rate}" for s in self.sites if s.sampled],
        }

    def _stream_metrics(
        self,
        loader: Iterable[Any],
        *,
        unpack: Callable[[Any], tuple[Any, Any]] | None,
        progress: bool,
        metrics: StreamingMetrics | None,
        checkpoint: str | os.PathLike[str] | None,
        checkpoint_every: int,
        row_filter: Callable[[], torch.Tensor | None] | None = None,
        fingerprint: Mapping[str, Any] | None = None,
    ) -> StreamingMetrics | None:
        """The ``keep="metrics"`` loop: accumulate, checkpoint, resume.

        ``row_filter()`` is called once per batch of the loader, in order (evaluated or skipped), and
        returns a bool mask of the rows to count (``None``: all). Returns ``None`` when no batch had a
        row to count.
        """
        check_int(checkpoint_every, "checkpoint_every", minimum=1)
        path = None if checkpoint is None else Path(checkpoint)
        expected = {**self._fingerprint(), **dict(fingerprint or {})}
        if hasattr(loader, "__len__"):
            expected["loader_batches"] = len(loader)  # type: ignore[arg-type]
        acc = metrics
        done = 0
        if path is not None and path.exists():
            state = _read_checkpoint(path)
            if state["fingerprint"] != expected:
                changed = sorted(
                    k
                    for k in set(expected) | set(state["fingerprint"])
                    if expected.get(k) != state["fingerprint"].get(k)
                )
                raise InvalidInputError(
                    f"the checkpoint {path} was written by another configuration (differs in "
                    f"{', '.join(changed)}: {[state['fingerprint'].get(k) for k in changed]} then, "
                    f"{[expected.get(k) for k in changed]} now). Delete it to start afresh, or resume "
                    "with the same wrapper settings and loader."
                )
            done = int(state["batches"])
            if state["metrics"] is not None:
                acc = (
                    StreamingMetrics.from_state_dict(state["metrics"])
                    if acc is None
                    else acc.load_state_dict(state["metrics"])
                )
            if self.seed is not None:
                self._rng_state = state["rng"]
            if state["complete"]:
                return acc

        def save(count: int, complete: bool) -> None:
            if path is not None:
                state = {
                    "format": _CHECKPOINT_FORMAT,
                    "version": 1,
                    "fingerprint": expected,
                    "batches": count,
                    "complete": complete,
                    "metrics": None if acc is None else acc.state_dict(),
                    "rng": self._rng_state if self.seed is not None else None,
                }
                _write_checkpoint(path, state)

        count = 0
        with contextlib.closing(self._iter_loader(loader, unpack, progress, skip=done)) as batches:
            for pred, target in batches:
                count += 1
                mask = row_filter() if row_filter is not None else None
                if pred is None:
                    continue
                if target is None:
                    raise InvalidInputError(
                        "keep='metrics' needs targets in every batch (a tuple (inputs, targets), a dict "
                        "with a 'labels'/'targets'/'y' key, or unpack=); this batch had none."
                    )
                acc = _accumulate(acc, pred, torch.as_tensor(target), mask)
                if count % checkpoint_every == 0:
                    save(count, complete=False)
        if count < done:
            raise InvalidInputError(
                f"the checkpoint {path} records {done} batches done, but the loader yielded only {count}: "
                "it is not the loader the checkpoint was written for."
            )
        save(count, complete=True)
        return acc

    def describe(self) -> Any:
        """The stochastic sites as a pandas DataFrame (path, kind, module type, rate, sampled, note).

        Example:
            >>> import torch, mcdrop
            >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1))
            >>> mcdrop.MCDropout(net).describe()[["path", "kind", "rate"]].values.tolist()
            [['1', 'dropout', 0.1]]
        """
        return describe_sites(self)

    def __repr__(self) -> str:
        sampled = len(self.policy.sampled_sites)
        return (
            f"MCDropout({type(self.model).__name__}, n_samples={self.n_samples}, task={self.task!r}, "
            f"sampled_sites={sampled})"
        )

    # ------------------------------------------------------------------ internals
    def _prepare(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        device, dtype = model_device_dtype(self.model)
        return prepare_inputs(args, kwargs, batch_dim=self.batch_dim, device=device, dtype=dtype)

    def _chunks(self, inputs: Any) -> Iterator[tuple[int, int, Any]]:
        return sample_chunks(
            self.model,
            inputs,
            n_samples=self.n_samples,
            max_batch_size=self.max_batch_size,
            memory_budget=None if self._auto_budget else self.memory_budget,
            output=self.output,
            output_batch_dim=self.output_batch_dim,
            pair=self.aleatoric is not None,
            strategy=self.strategy,
            autocast_dtype=self.dtype,
            cache=self._engine_cache,
        )

    def _check_gates(self, inputs: Inputs) -> None:
        """Check once per input signature that functional gates switch only randomness.

        See :mod:`mcdrop._gatecheck`. Runs inside the policy's activation (flags are put back).
        """
        gates = [
            s.path
            for s in self.policy.sampled_sites
            if (
                s.kind == "functional"
                or (s.kind == "attention_dropout" and s.module_type != "MultiheadAttention")
            )
            and s.note != INCLUDED_NOTE
            and not is_rate_holder(s)
        ]
        if not gates or inputs.batch_size == 0:
            return
        key = (_signature(inputs), tuple(gates))
        if key in self._gates_checked:
            return
        device, _ = model_device_dtype(self.model)
        cuda = cuda_devices(device)
        eager = eager_module(self.model)

        def run_rows(rows: Inputs) -> Any:
            args, kwargs = replicate(rows, 1)
            with autocast_context(device, self.dtype):
                return select_output(eager(*args, **kwargs), self.output, self.aleatoric is not None)

        # No more rows than a sampling pass may hold (max_batch_size) and than fit the memory budget,
        # measured on one row (that pass may fail, e.g. on batch statistics: then estimated).
        row_bytes = None
        few_rows = min(inputs.batch_size, CHECK_ROWS, self.max_batch_size or CHECK_ROWS) > 2
        if few_rows and not holds_objects(inputs):  # an object (a KV cache) needs the whole batch
            meter = PeakBytesMode()
            try:
                with input_generators_untouched(inputs), rng_untouched(0, cuda), NoDropout(), meter:
                    run_rows(slice_batch(inputs, 0, 1))
                row_bytes = float(meter.meter.peak) * CHECK_MARGIN
            except Exception:  # noqa: BLE001 - the check itself runs (and reports) on more rows
                row_bytes = None
        budget = None if self._auto_budget else self.memory_budget
        if holds_objects(inputs):  # a KV cache's batch cannot be sliced: the batch of a sampling pass
            count = min(inputs.batch_size, self.max_batch_size or inputs.batch_size)
        else:
            count = check_row_count(inputs, self.max_batch_size, budget, self.n_samples, row_bytes)
        rows = slice_batch(inputs, 0, count)
        # Generators given as inputs advance from pass to pass (as across seeds), and are put
        # back afterwards: the check's passes are not samples.
        with split_errors_named(inputs, self.max_batch_size), input_generators_untouched(inputs):
            notes, deterministic, outside_torch = check_gates(self.model, gates, lambda: run_rows(rows), cuda)

        def exclude_hint(paths: list[str]) -> str:
            names = [p for p in paths if p in gates]
            if "" in names or not names:  # the model itself: name its class
                return f"exclude=[{type(self.model).__name__}]"
            return f"exclude={names!r}"

        if deterministic:
            raise ModelStateError(
                f"{type(self.model).__name__}: in train mode, with every dropout operation made the identity, "
                "these modules still change the output, the same way from any seed: "
                + "; ".join(
                    f"{', '.join(p or '<model>' for p in paths)}{' (together)' if len(paths) > 1 else ''} "
                    f"by up to {gap:.3g}"
                    for paths, gap in deterministic
                )
                + ". "
                "Their code reads `self.training` for something that is not dropout (a different formula, "
                "batch statistics, a temperature, ...), so sampling them in train mode would put that change "
                "into every MC sample. Keep them in eval mode with "
                f"{exclude_hint([p for paths, _ in deterministic for p in paths])} (dropout that only they "
                "apply is then not sampled), or, if the train-mode behaviour is what you want to sample, "
                "name them in include= the same way. Nothing was sampled; the model is unchanged."
            )
        if outside_torch:
            warnings.warn(
                f"{type(self.model).__name__}: in train mode, the module(s) "
                f"{', '.join(p or '<model>' for p in outside_torch)} draw from numpy's or Python's global "
                "random generator, not torch's: that randomness is not a dropout operation mcdrop knows (it is "
                "often data augmentation, e.g. SpecAugment masking) and seed= cannot reproduce it. It is "
                f"sampled as it is; keep these modules in eval mode with {exclude_hint(outside_torch)} if it "
                "should not be.",
                GateRandomnessWarning,
                stacklevel=4,
            )
            notes.update(
                {p: "draws from numpy's or Python's RNG in train mode" for p in outside_torch if p in gates}
            )
        self.policy.gate_notes.update(notes)
        self._gates_checked.add(key)

    def _predict_one(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Prediction:
        inputs = self._prepare(args, kwargs)
        self._check_gates(inputs)
        stats: ClassificationStats | RegressionStats | None = None
        store = SampleStore(self.n_samples) if self.keep_samples else None
        task = self.task
        for start, stop, chunk in self._chunks(inputs):
            if stats is None:
                task = self._resolve_task(chunk)
                stats = (
                    ClassificationStats(self.output_type, self.class_dim)
                    if task == "classification"
                    else RegressionStats(self.aleatoric)
                )
            stats.update(start, stop, chunk, inputs.batch_size)
            if store is not None:
                store.update(start, stop, chunk[0] if isinstance(chunk, tuple) else chunk, inputs.batch_size)
        assert stats is not None
        if isinstance(stats, ClassificationStats):
            pred: Prediction = ClassificationPrediction.from_stats(
                stats, self.n_samples, store, self.class_dim
            )
            moments = stats.probs
        else:
            pred = RegressionPrediction.from_stats(stats, self.n_samples, store)
            moments = stats.mean
        if self.n_samples > 1 and self.policy.has_randomness and _negligible(moments.variance, moments.mean):
            self._warn_identical()
        return pred

    def _resolve_task(self, chunk: Any) -> str:
        if self.task != "auto":
            return self.task
        if self.aleatoric is not None or self.output_type != "logits":
            return "regression" if self.aleatoric is not None else "classification"
        per_input = chunk.shape[2:]
        if len(per_input) == 0 or (len(per_input) == 1 and per_input[0] == 1):
            return "regression"
        return "classification"

    def _warn_if_identical_samples(self, samples: torch.Tensor) -> None:
        var, mean = torch.var_mean(samples.float(), 0, correction=0)
        if self.n_samples > 1 and self.policy.has_randomness and _negligible(var, mean):
            self._warn_identical()

    def _warn_identical(self) -> None:
        warnings.warn(
            f"All {self.n_samples} MC samples are identical although the model has dropout sites "
            f"({', '.join(s.path or '<model>' for s in self.policy.sampled_sites)}): the dropout does not "
            "reach the selected output (e.g. it sits in a branch that is not used, or is applied to a "
            "tensor that is all zeros). The uncertainty estimates are all zero.",
            NoRandomnessWarning,
            stacklevel=3,
        )

    @contextlib.contextmanager
    def _session(self) -> Iterator[None]:
        """Dropout on, gradients off, and the wrapper's own RNG stream when seeded."""
        with self.policy.activate(), torch.no_grad(), self._rng():
            yield

    @contextlib.contextmanager
    def _rng(self) -> Iterator[None]:
        """The wrapper's own RNG stream when seeded (see :mod:`mcdrop._rnglock` for threads)."""
        with rng_access(exclusive=self.seed is not None):
            if self.seed is None:
                yield
            else:
                with self._seeded_stream():
                    yield

    @contextlib.contextmanager
    def _seeded_stream(self) -> Iterator[None]:
        device, _ = model_device_dtype(self.model)
        cuda_index = None
        if device is not None and device.type == "cuda":
            cuda_index = device.index if device.index is not None else torch.cuda.current_device()
        devices = [] if cuda_index is None else [cuda_index]
        with torch.random.fork_rng(devices=devices):
            if self._rng_state is None:
                torch.random.default_generator.manual_seed(self.seed)
                if cuda_index is not None:
                    torch.cuda.default_generators[cuda_index].manual_seed(self.seed)
            else:
                torch.set_rng_state(self._rng_state["cpu"])
                if cuda_index is not None and "cuda" in self._rng_state:
                    torch.cuda.set_rng_state(self._rng_state["cuda"], cuda_index)
            try:
                yield
            finally:
                state = {"cpu": torch.get_rng_state()}
                if cuda_index is not None:
                    state["cuda"] = torch.cuda.get_rng_state(cuda_index)
                self._rng_state = state


def _negligible(variance: torch.Tensor, mean: torch.Tensor) -> bool:
    """True when the samples differ by no more than float rounding (relative 1e-6)."""
    return bool((variance <= (1e-6 * mean.abs().clamp(min=1.0)).square()).all())


_CHECKPOINT_FORMAT = "mcdrop-predict-loader-checkpoint"


def _describe_option(value: Any) -> str:
    """A text for an option in a checkpoint fingerprint, the same in another process.

    A callable is described by what it computes: its qualified name, and for Python functions
    (lambdas included) a digest of their code, constants, names and closure values; a
    ``functools.partial`` by its function and bound arguments. Two lambdas that select other
    outputs therefore differ, and the same lambda in a new process matches. Anything that cannot
    be described so (a closure that refers to itself is described once, an object whose ``repr``
    fails) falls back to its type's qualified name.
    """
    return _describe(value, set())


def _describe(value: Any, seen: set[int]) -> str:
    """:func:`_describe_option`, with the ids of the containers and functions being described.

    A part that cannot be described falls back to its type's name alone, the rest still counts.
    """
    try:
        return _describe_part(value, seen)
    except Exception:  # noqa: BLE001 - e.g. a repr that raises: by its type, never a failed checkpoint
        return f"<{type(value).__module__}.{type(value).__qualname__}>"


def _describe_part(value: Any, seen: set[int]) -> str:
    if id(value) in seen:  # a closure or container that refers to itself
        return f"<recursive {type(value).__qualname__}>"
    if isinstance(value, functools.partial):
        inner = seen | {id(value)}
        return (
            f"partial({_describe(value.func, inner)}, {_describe(value.args, inner)}, "
            f"{_describe(value.keywords, inner)})"
        )
    if callable(value) and not isinstance(value, type):
        name = f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__name__)}"
        code = getattr(value, "__code__", None)
        if code is None:  # a builtin, or an object with __call__: its repr where that is stable
            text = repr(value)
            return name if " at 0x" in text or isinstance(value, nn.Module) else f"{name}:{text}"
        inner = seen | {id(value)}
        cells = []
        for cell in getattr(value, "__closure__", None) or ():
            try:
                contents = cell.cell_contents
            except ValueError:  # an empty cell: a name assigned after the function was made
                cells.append("<empty>")
                continue
            cells.append(_describe(contents, inner))
        defaults = getattr(value, "__defaults__", None)
        body = repr(
            (
                code.co_code,
                _code_constants(code),
                code.co_names,
                tuple(cells),
                # As written (as earlier versions did, so their checkpoints resume), unless
                # the text would hold an address.
                defaults if _plain_defaults(defaults) else _describe(defaults, inner),
            )
        )
        return f"{name}#{hashlib.sha256(body.encode()).hexdigest()[:16]}"
    if isinstance(value, Mapping):
        inner = seen | {id(value)}
        return repr(sorted((_describe(k, inner), _describe(v, inner)) for k, v in value.items()))
    if isinstance(value, (tuple, list)):
        inner = seen | {id(value)}
        return repr([_describe(v, inner) for v in value])
    if isinstance(value, (set, frozenset)):  # unordered, and ordered by hash: sorted descriptions
        inner = seen | {id(value)}
        return f"{type(value).__name__}({sorted(_describe(v, inner) for v in value)})"
    if isinstance(value, torch.Tensor):
        return _describe_tensor(value)
    text = repr(value)
    if " at 0x" in text or isinstance(value, nn.Module):  # an address or a whole model: by its type
        return f"<{type(value).__module__}.{type(value).__qualname__}>"
    return text


def _plain_defaults(defaults: Any) -> bool:
    """Whether default values read the same in full in their ``repr`` (numbers, strings, ...)."""
    if isinstance(defaults, tuple):
        return all(_plain_defaults(d) for d in defaults)
    return defaults is None or isinstance(defaults, (bool, int, float, complex, str, bytes))


_COMPRESSED_LAYOUTS = (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc)


def _describe_tensor(value: torch.Tensor) -> str:
    """Shape, dtype and a digest of the values (dense tensors of at most 2**20 elements)."""
    digest = ""
    if value.numel() <= 2**20 and value.device.type != "meta" and value.layout == torch.strided:
        flat = value.detach().cpu().reshape(-1).clone()  # 0-d and non-contiguous tensors too
        digest = hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()
    elif value.layout in _COMPRESSED_LAYOUTS and value.numel() <= 2**20 and value.device.type != "meta":
        return _describe_tensor(value.detach().cpu().to_dense())
    elif value.is_sparse and value.device.type != "meta":
        dense = value.detach().cpu().coalesce()
        digest = _describe_tensor(dense.indices()) + _describe_tensor(dense.values())
        digest = hashlib.sha256(digest.encode()).hexdigest()
    return f"tensor{tuple(value.shape)}:{value.dtype}:{digest[:16]}"


def _code_constants(code: Any) -> tuple[Any, ...]:
    """The constants of a code object, nested code objects (inner lambdas) by their own contents.

    Frozensets (``x in {1, 2}`` compiles to one) by their sorted items: their order follows string
    hashes, which change from one process to the next.
    """
    return tuple(
        (c.co_code, _code_constants(c), c.co_names)
        if hasattr(c, "co_code")
        else repr(sorted(map(repr, c)))
        if isinstance(c, frozenset)
        else repr(c)
        for c in code.co_consts
    )


def _batch_dim_option(batch_dim: int | Mapping[Any, int | None]) -> str:
    """``batch_dim`` for a fingerprint: ``0``, ``{}`` and ``{"*": 0}`` say the same, and read the same."""
    dims = dict(batch_dim) if isinstance(batch_dim, Mapping) else {"*": batch_dim}
    dims.setdefault("*", 0)
    return _describe_option(dims)


def _read_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means "not our checkpoint"
        raise InvalidInputError(
            f"could not read the checkpoint {path} ({type(err).__name__}: {err}); delete it to start afresh."
        ) from None
    if not isinstance(state, dict) or state.get("format") != _CHECKPOINT_FORMAT:
        raise InvalidInputError(
            f"{path} is not a predict_loader checkpoint; pass another checkpoint= path or delete the file."
        )
    return state


def _write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a temporary file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, str(tmp))
    os.replace(tmp, path)


def _select_rows(pred: Prediction, rows: torch.Tensor) -> Prediction:
    """The prediction of the selected inputs (``rows``: a bool mask or indices along the batch)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(pred):
        value = getattr(pred, f.name)
        if isinstance(value, torch.Tensor):
            value = value[:, rows] if f.name == "samples" else value[rows]
        values[f.name] = value
    return type(pred)(**values)


def _accumulate(
    acc: StreamingMetrics | None, pred: Prediction, target: torch.Tensor, mask: torch.Tensor | None
) -> StreamingMetrics | None:
    """Add a batch's prediction (the rows in ``mask``) to the streaming accumulator."""
    if mask is not None:
        mask = mask.to(torch.bool).cpu()
        if mask.shape != (len(pred),):
            raise InvalidInputError(
                f"a batch of {len(pred)} inputs came with {mask.shape[0]} data-set indices; the loader's "
                "collate_fn must keep one row per index."
            )
        if not bool(mask.any()):
            return acc
        if not bool(mask.all()):
            pred = _select_rows(pred.cpu(), mask)
            target = target.cpu()[mask]
    if isinstance(pred, ClassificationPrediction):
        if acc is None:
            acc = StreamingClassificationMetrics(n_classes=pred.n_classes)
        if not isinstance(acc, StreamingClassificationMetrics):
            raise InvalidInputError(
                f"a classifier's predictions cannot be added to a {type(acc).__name__}; use "
                "StreamingClassificationMetrics."
            )
        probs, entropy, mi = pred.probs, pred.predictive_entropy, pred.mutual_information
        if probs.dim() > 2:  # dense predictions: every position is one prediction
            probs = probs.movedim(pred.class_dim, -1).reshape(-1, pred.n_classes)
            entropy, mi, target = entropy.reshape(-1), mi.reshape(-1), target.reshape(-1)
        acc.update(probs, target.to(probs.device), entropy=entropy, mutual_information=mi)
    else:
        assert isinstance(pred, RegressionPrediction)
        if acc is None:
            acc = StreamingRegressionMetrics()
        if not isinstance(acc, StreamingRegressionMetrics):
            raise InvalidInputError(
                f"a regression model's predictions cannot be added to a {type(acc).__name__}; use "
                "StreamingRegressionMetrics."
            )
        acc.update(pred.mean, pred.total_std, target.to(pred.mean.device))
    acc.n_samples = pred.n_samples
    return acc


def _default_unpack(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k not in _TARGET_KEYS}
        target = next((batch[k] for k in _TARGET_KEYS if k in batch), None)
        return inputs, target
    if isinstance(batch, (tuple, list)):
        if len(batch) == 0:
            raise InvalidInputError("The loader yielded an empty batch tuple.")
        if len(batch) == 1:
            return batch[0], None
        return batch[0], batch[1]
    raise InvalidTypeError(
        f"Cannot unpack a batch of type {type(batch).__name__}; pass unpack=lambda batch: (inputs, targets)."
    )
