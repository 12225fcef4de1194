"""``MCDropout``: the one object a user needs, a thin face over its options, the policy and the engine.

The wrapper holds a validated :class:`~mcdrop.options.SamplingOptions`, the model's
:class:`~mcdrop.StochasticPolicy`, and what it learns while sampling (the engine's decisions per
input signature, the gate checks done, its seeded random stream). Per batch it prepares the inputs,
runs the gate check once per signature (:mod:`mcdrop.engine.checks`), draws the chunks
(:func:`~mcdrop.engine.sample.sample_chunks`) and reduces them to a :class:`~mcdrop.Prediction`;
whole loaders go through :mod:`mcdrop.loop`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from mcdrop._checks import check_bool, check_choice, user_stacklevel
from mcdrop._statistics import (
    ClassificationStats,
    RegressionStats,
    SampleStore,
    aleatoric_variances,
    negligible_spread,
    resolve_reading,
)
from mcdrop.adaptive import predict_adaptively
from mcdrop.engine.checks import check_gates_on
from mcdrop.engine.discover import discover_on
from mcdrop.engine.inputs import Inputs, model_device_dtype, prepare_inputs, signature, split_errors_named
from mcdrop.engine.outputs import OutputSelector
from mcdrop.engine.rng import SeededStream, cuda_devices, rng_access, rng_untouched
from mcdrop.engine.sample import sample_chunks
from mcdrop.engine.strategies import Runner
from mcdrop.errors import (
    InvalidInputError,
    InvalidTypeError,
    McdropWarning,
    NoRandomnessWarning,
    TrainModeRandomnessWarning,
)
from mcdrop.loop import check_loader, collect, stream_metrics
from mcdrop.metrics.streaming import StreamingMetrics
from mcdrop.options import SamplingOptions
from mcdrop.policy.activate import StochasticPolicy
from mcdrop.policy.activate import describe as describe_sites
from mcdrop.policy.classify import StochasticSite
from mcdrop.predictions import ClassificationPrediction, Prediction, RegressionPrediction

__all__ = ["MCDropout"]


class MCDropout:
    """Monte Carlo dropout for any PyTorch model: N stochastic passes in batch, and their statistics.

    The model is never moved, cast or modified: on every call its dropout (and only its dropout,
    see :mod:`mcdrop.policy`) is switched on, the passes are drawn, and every module's
    ``training`` flag is restored, also when an exception interrupts.

    Args:
        model: A trained ``nn.Module`` (its device and floating dtype are used for the inputs).
        n_samples: Number of stochastic forward passes N per input (≥ 1), or ``"auto"`` for
            adaptive sampling: each input is sampled in rounds until the Monte Carlo standard
            error of its ``target`` statistic is at most ``tolerance`` (or it has ``max_samples``
            passes), and inputs that are done leave the batch (:mod:`mcdrop.adaptive`;
            ``prediction.samples_per_input`` says how many each got). Not with ``keep_samples``
            nor :meth:`sample`, which draw a fixed N.
        task: ``"classification"``, ``"regression"`` or ``"auto"``. ``"auto"`` picks regression when
            ``aleatoric`` is set, one output per input comes out (shape ``(batch,)`` or
            ``(batch, 1)``) or a Hugging Face config says ``problem_type="regression"``,
            classification otherwise, and refuses an output whose class dimension it cannot tell
            (``(batch, A, L)``, see ``class_dim``); say ``task="regression"`` for a multi-output
            regression model (a forecaster's ``(batch, 24)`` reads as 24 classes otherwise) and
            ``task="classification"`` for a one-logit binary classifier. The exact rules are in
            ``docs/outputs.md``.
        output_type: For classification, what the model returns: ``"logits"``, ``"probs"`` or
            ``"log_probs"``. One output per input means a binary classifier's positive class
            (sigmoid of the logit). Not given (``None``), outputs are read as logits, and a call
            whose outputs are all probabilities (every row of every pass non-negative and summing
            to 1, e.g. a model ending in ``nn.Softmax``) is refused naming ``output_type="probs"``;
            ``output_type="logits"`` given reads them as logits all the same.
        aleatoric: For regression models that also predict their noise: ``"variance"`` or
            ``"log_variance"``. The model must then output ``(mean, variance)`` as a pair of tensors,
            or one tensor whose last dim holds the two halves.
        class_dim: Class dimension of the model output, batch first (negative counts from the
            end). Not given (``None``), it is read from the output: the one dimension whose size is
            a Hugging Face ``model.config.num_labels`` (token classification logits
            ``(batch, T, K)``: the last), else 1 for ``(batch, K)`` and for ``(batch, K, H, W, ...)``
            maps (PyTorch's convention); an output ``(batch, A, L)`` with nothing to tell
            ``(batch, K, L)`` from ``(batch, L, K)`` or a ``(batch, H, W)`` map is refused, naming
            this option.
        batch_dim: Batch dimension of the inputs: an int for all of them, or a mapping from argument
            names / dict keys / positional indices to an int, or ``None`` for a tensor that is not
            batched (shared by all rows); ``"*"`` gives the default for the rest.
        output_batch_dim: Batch dimension of the analysed output; defaults to ``batch_dim`` when that
            is an int (or a mapping giving every batched input one dimension); for a mapping with
            several, to the output's only dimension of the batch's size, and where several have it
            (a ``(T, B, ...)`` output with ``T == B``), ``InvalidInputError`` asks for it. Results
            are always returned batch first.
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
        tolerance: With ``n_samples="auto"``: the standard error each input's ``target`` must
            reach (default 0.01; for a statistic with several values per input, such as
            ``probs``, the largest of them).
        min_samples: With ``n_samples="auto"``: passes every input gets first (default 20, or
            ``max_samples`` where that is smaller; ≥ 2;
            fewer make the stopping rule favour runs whose spread happened to be small, see
            :mod:`mcdrop.adaptive`).
        max_samples: With ``n_samples="auto"``: the most passes an input gets (default 1000).
        target: With ``n_samples="auto"``: the statistic whose standard error is watched:
            ``"confidence"`` (the top-class probability; default for classification),
            ``"probs"``, ``"predictive_entropy"``, ``"expected_entropy"``,
            ``"mutual_information"`` or ``"std"``; for regression ``"mean"`` (default),
            ``"variance"``, ``"std"`` or ``"aleatoric_variance"``.

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
        n_samples: int | str = 50,
        *,
        task: str = "auto",
        output_type: str | None = None,
        aleatoric: str | None = None,
        class_dim: int | None = None,
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
        tolerance: float | None = None,
        min_samples: int | None = None,
        max_samples: int | None = None,
        target: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise InvalidTypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        self.model = model
        #: The validated settings (frozen): read them here, or as attributes of the wrapper.
        self.options = SamplingOptions(
            n_samples=n_samples,
            task=task,
            output_type=output_type,
            aleatoric=aleatoric,
            class_dim=class_dim,
            batch_dim=batch_dim,
            output_batch_dim=output_batch_dim,
            output=output,
            max_batch_size=max_batch_size,
            memory_budget=memory_budget,
            seed=seed,
            keep_samples=keep_samples,
            drop_path=drop_path,
            include=include,
            exclude=exclude,
            strategy=strategy,
            dtype=dtype,
            tolerance=tolerance,
            min_samples=min_samples,
            max_samples=max_samples,
            target=target,
        )
        self.policy = StochasticPolicy(model, drop_path=drop_path, include=include, exclude=exclude)
        self._stream = None if self.options.seed is None else SeededStream(self.options.seed)
        self._decisions: dict[Any, Any] = {}  # the engine's, per input signature
        self._gates_checked: set[Any] = set()
        self._discovery_done: set[Any] = set()
        if not self.policy.has_randomness:
            warnings.warn(
                "Every sampled dropout site has rate 0, so all MC samples will be identical and every "
                "uncertainty estimate zero: "
                + ", ".join(s.path or "<model>" for s in self.policy.sampled_sites),
                NoRandomnessWarning,
                stacklevel=2,
            )

    def __getattr__(self, name: str) -> Any:
        """The options read as attributes: ``mc.n_samples``, ``mc.seed``, ``mc.memory_budget``, ..."""
        options = self.__dict__.get("options")
        if options is None or name.startswith("_") or name not in SamplingOptions.__dataclass_fields__:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        if name == "memory_budget":
            return options.memory_budget_bytes
        return getattr(options, name)

    @property
    def rng_state(self) -> dict[str, torch.Tensor] | None:
        """Where a seeded wrapper's own random stream stands (``None``: unseeded, or before its first call).

        Checkpoints of :meth:`predict_loader` save it and set it back on resuming, so a resumed run
        draws what an uninterrupted one would have.

        Example:
            >>> import torch, mcdrop
            >>> net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Dropout(0.5)).eval()
            >>> mc = mcdrop.MCDropout(net, n_samples=3, seed=0)
            >>> mc.rng_state is None
            True
            >>> _ = mc.predict(torch.ones(1, 2))
            >>> sorted(mc.rng_state)
            ['cpu']
        """
        return None if self._stream is None else self._stream.state

    @rng_state.setter
    def rng_state(self, state: dict[str, torch.Tensor] | None) -> None:
        if self._stream is None:
            if state is not None:
                raise InvalidInputError("rng_state can only be set on a seeded wrapper (seed=...).")
            return
        self._stream.state = state

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
            a ``(mean, variance)`` pair of such tensors for an ``aleatoric`` model (variances also
            for ``aleatoric="log_variance"``: the exponential of the model's log-variance output).

        Raises:
            NonFiniteError: A log-variance output is so large that its variance overflows.
            InvalidInputError: The wrapper samples adaptively (``n_samples="auto"``).

        Example:
            >>> import torch, mcdrop
            >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.5)).eval()
            >>> s = mcdrop.MCDropout(net, n_samples=4, seed=1).sample(torch.ones(2, 3))
            >>> s.shape, bool((s[0] != s[1]).any())
            (torch.Size([4, 2, 8]), True)
        """
        if self.options.adaptive:
            raise InvalidInputError(
                "sample() draws the same number of passes for every input, so it needs an integer "
                "n_samples; this wrapper has n_samples='auto' (adaptive sampling), which predict() and "
                "predict_loader() use. Make a wrapper with n_samples=N to draw raw samples."
            )
        store = SampleStore(self.n_samples)
        store2 = SampleStore(self.n_samples) if self.aleatoric else None
        with self._session():
            inputs = self._prepare(args, kwargs)
            self._discover(inputs)
            self._check_gates(inputs)
            for start, stop, chunk in self._chunks(inputs):
                if store2 is not None:
                    store.update(start, stop, chunk[0], inputs.batch_size)
                    store2.update(start, stop, chunk[1], inputs.batch_size)
                else:
                    store.update(start, stop, chunk, inputs.batch_size)
        assert store.data is not None
        var, mean = torch.var_mean(store.data.float(), 0, correction=0)
        if self.n_samples > 1 and self.policy.has_randomness and negligible_spread(var, mean):
            self._warn_identical()
        if store2 is None:
            return store.data
        assert store2.data is not None
        return (store.data, aleatoric_variances(store2.data, self.aleatoric))  # type: ignore[return-value]

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

    def predict_deterministic(self, *args: Any, **kwargs: Any) -> Prediction:
        """The model's prediction with dropout off: one pass in eval mode, the baseline of MC dropout.

        Every module is in eval mode for the pass (as after ``model.eval()``, whatever mode the user
        left a module in: a model left in train mode is not run in train mode), so every site
        mcdrop would sample is off; afterwards every ``training`` flag is as it was. The output is
        read as :meth:`predict` reads it (``task``, ``output``, ``output_type``, ``class_dim``,
        ``aleatoric``, ``dtype``), and reduced by the same statistics code with ``n_samples=1``:
        ``std`` (or ``variance``) is 0, ``expected_entropy`` equals ``predictive_entropy`` so the
        mutual information is exactly 0, ``variation_ratio`` is 0, and the Monte Carlo standard
        errors are 0 (there is no Monte Carlo error). ``samples`` holds the one output
        ``(1, batch, ...)`` with ``keep_samples=True``.

        The pass runs the whole batch at once, or in parts of ``max_batch_size`` rows when that is
        set, and draws nothing from the wrapper's random stream nor torch's global one: a seeded
        wrapper's MC predictions are the same whether or not deterministic passes are made between
        them. A model whose eval mode is still random (dropout written as
        ``F.dropout(x, p, training=True)``, which no flag switches off) gets a
        :class:`~mcdrop.errors.McdropWarning`: its "deterministic" output is one random draw (from
        a fixed seed, so reproducible), and its standard errors are NaN.

        Args:
            *args: Positional inputs of the model.
            **kwargs: Keyword inputs of the model.

        Returns:
            A :class:`~mcdrop.ClassificationPrediction` or :class:`~mcdrop.RegressionPrediction`
            with ``n_samples=1``.

        Raises:
            NonFiniteError: The model's output holds NaN or infinity.

        Example:
            >>> import torch, mcdrop
            >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.5),
            ...                           torch.nn.Linear(16, 3)).eval()
            >>> x = torch.randn(6, 4)
            >>> base = mcdrop.MCDropout(net, n_samples=20, seed=0).predict_deterministic(x)
            >>> torch.allclose(base.probs, torch.softmax(net(x), 1)), base.n_samples
            (True, 1)
            >>> float(base.mutual_information.max()), float(base.std.max())
            (0.0, 0.0)
        """
        device, _ = model_device_dtype(self.model)
        with (
            self.policy.activate(check_buffers=False),
            torch.no_grad(),
            rng_access(exclusive=True),
            rng_untouched(0, cuda_devices(device)),
        ):
            for module in self.model.modules():  # every flag is put back by the activation
                module.training = False
            return self._deterministic_one(args, kwargs)

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
        deterministic: bool = False,
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
            loader: Yields batches: a tensor; a tuple/list ``(inputs,)`` or ``(inputs, targets)``
                (``inputs`` itself a tuple of positional inputs, or a dict of keyword inputs); or a
                dict of model keyword inputs, from which the keys ``labels``, ``label``,
                ``targets``, ``target`` and ``y`` are taken out as targets. A tuple of three or more
                elements (``TensorDataset(input_ids, attention_mask, labels)``) is refused: say
                which are inputs with ``unpack=``.
            unpack: ``unpack(batch) -> (inputs, targets)`` for other batch layouts; ``inputs`` is a
                tensor, a tuple of positional inputs or a dict of keyword inputs; ``targets`` may be
                ``None``. For ``(input_ids, attention_mask, labels)`` batches:
                ``unpack=lambda b: ((b[0], b[1]), b[2])``.
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
            deterministic: Also make one pass per batch with dropout off
                (:meth:`predict_deterministic`), the baseline MC dropout is compared with, and
                return it as the prediction's ``deterministic`` field (with the same targets). It
                draws nothing from the random streams, so the MC prediction is the same with and
                without it. ``keep="predictions"`` only.

        Returns:
            ``keep="predictions"``: the predictions of all batches concatenated, with ``targets``
            filled in when the batches carried them (and ``deterministic`` with
            ``deterministic=True``). ``keep="metrics"``: a
            :class:`~mcdrop.metrics.streaming.StreamingMetrics`; ``.summary()`` gives the metrics.

        Raises:
            InvalidTypeError: ``loader`` is not an iterable of batches (e.g. a number, or a file
                name), or a batch cannot be unpacked.
            InvalidInputError: An empty loader, a tuple batch of more than two elements without
                ``unpack=``, targets that do not match, an unknown ``keep``, ``keep="metrics"``
                without targets, a checkpoint from another configuration, or ``task="auto"``
                reading classes where the targets are real values of the output's shape (pass
                ``task="regression"``), or ``deterministic=True`` with ``keep="metrics"``.

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
        check_loader(loader)
        keep = check_choice(keep, ("predictions", "metrics"), "keep")
        if metrics is not None:
            if not isinstance(metrics, StreamingMetrics):
                raise InvalidTypeError(
                    f"metrics must be a StreamingMetrics accumulator; got {type(metrics).__name__}."
                )
            keep = "metrics"
        if check_bool(deterministic, "deterministic") and keep == "metrics":
            raise InvalidInputError(
                "deterministic=True needs keep='predictions': the streaming accumulators of "
                "keep='metrics' hold the metrics of the MC predictions only. Predict with "
                "keep='predictions' (pred.deterministic is then the dropout-off baseline), or add "
                "predict_deterministic(inputs) of each batch to an accumulator of your own."
            )
        if keep == "predictions" and checkpoint is not None:
            raise InvalidInputError(
                "checkpoint= needs keep='metrics': a checkpoint holds the streaming accumulators, not "
                "per-input predictions."
            )
        if keep == "metrics":
            result = stream_metrics(
                self,
                loader,
                unpack=unpack,
                progress=progress,
                metrics=metrics,
                checkpoint=checkpoint,
                checkpoint_every=checkpoint_every,
            )
        else:
            result = collect(self, loader, unpack=unpack, progress=progress, deterministic=deterministic)
        if result is None:
            raise InvalidInputError("The loader yielded no batches: there is nothing to predict.")
        return result

    def describe(self) -> Any:
        """The stochastic sites of the wrapped model as a table (see :func:`mcdrop.describe`).

        The sites are found again on every call, with the wrapper's own ``drop_path``, ``include``
        and ``exclude``, so rates changed since the wrapper was built show, and so do the notes the
        gate check added while sampling (see :meth:`StochasticPolicy.current_sites`). pandas is
        imported only when this is called.

        Returns:
            A ``pandas.DataFrame`` with one row per site, in ``named_modules()`` order, and the
            columns ``path`` (``"<model>"`` for the model itself), ``kind``, ``module_type``,
            ``rate`` (float, NaN where unknown), ``sampled`` and ``note``.

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
    def _prepare(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Inputs:
        device, dtype = model_device_dtype(self.model)
        return prepare_inputs(args, kwargs, batch_dim=self.options.batch_dim, device=device, dtype=dtype)

    def _chunks(
        self, inputs: Inputs, n_samples: int | None = None, on_decision: Callable[[Any], None] | None = None
    ) -> Iterator[tuple[int, int, Any]]:
        o = self.options
        return sample_chunks(
            self.model,
            inputs,
            n_samples=o.first_round if n_samples is None else n_samples,
            max_batch_size=o.max_batch_size,
            memory_budget=o.budget,
            output=o.output,
            output_batch_dim=o.output_batch_dim,
            pair=o.pair,
            strategy=o.strategy,
            autocast_dtype=o.dtype,
            cache=self._decisions,
            on_decision=on_decision,
        )

    def _discover(self, inputs: Inputs) -> None:
        """Look once per input signature for train-gated randomness the policy did not see.

        See :mod:`mcdrop.engine.discover`: dropout found there is sampled from this call on (and
        named in ``describe()``); other train-gated randomness gets a
        :class:`~mcdrop.errors.TrainModeRandomnessWarning` naming the ``include=``/``exclude=``
        that settles it. Runs inside the policy's activation.
        """
        candidates = self.policy.unclassified_modules()
        gates = self.policy.gates_to_check()
        if (not candidates and not gates) or inputs.batch_size == 0:
            return
        key = (signature(inputs), tuple(candidates), tuple(gates))
        if key in self._discovery_done:
            return
        findings = discover_on(
            self.model,
            inputs,
            self.options.check_settings,
            candidates=candidates,
            gates=gates,
            sampled={s.path for s in self.policy.sampled_sites},
        )
        name = type(self.model).__name__
        for where, settle, what, sampled in findings.report:
            shown = where or "<model>"
            if sampled:
                message = (
                    f"{name}: in train mode, {shown} draws {what}, which is not dropout; mcdrop samples it as "
                    "it is, so every MC sample carries it and the uncertainty includes it. Keep it in eval "
                    f"mode with exclude={settle!r}, or confirm it should be sampled with include={settle!r}."
                )
            else:
                message = (
                    f"{name}: in train mode, {shown} draws {what}, which mcdrop does not sample: the scan of "
                    "the code did not see the `.training` read that switches it on, and it is not dropout mcdrop "
                    f"can sample safely. To sample it, pass include={settle!r}; to keep it off and silence "
                    f"this, exclude={settle!r}."
                )
            warnings.warn(message, TrainModeRandomnessWarning, stacklevel=user_stacklevel())
        self._discovery_done.add(key)
        if findings.sample:
            self.policy.record_discovered(findings.sample)
            # what the next call of this signature will see: the found modules are sites now
            after = (key[0], tuple(self.policy.unclassified_modules()), tuple(self.policy.gates_to_check()))
            self._discovery_done.add(after)

    def _check_gates(self, inputs: Inputs) -> None:
        """Check once per input signature that functional gates switch only randomness.

        See :mod:`mcdrop.engine.checks`. Runs inside the policy's activation (flags are put back).
        """
        gates = self.policy.gates_to_check()
        if not gates or inputs.batch_size == 0:
            return
        key = (signature(inputs), tuple(gates))
        if key in self._gates_checked:
            return
        notes = check_gates_on(self.model, gates, inputs, self.options.check_settings)
        self.policy.record_notes(notes)
        self._gates_checked.add(key)

    def _config_hints(self) -> dict[str, Any]:
        """What a Hugging Face-style ``model.config`` says of the logits: ``num_labels``, ``problem_type``.

        Only where the analysed output is the logits (``output=None`` or ``"logits"``); empty without
        such a config.
        """
        if self.options.output not in (None, "logits"):
            return {}
        config = getattr(self.model, "config", None)
        num_labels = getattr(config, "num_labels", None)
        problem_type = getattr(config, "problem_type", None)
        if isinstance(num_labels, bool) or not isinstance(num_labels, int):
            num_labels = None
        return {
            "num_labels": num_labels,
            "problem_type": problem_type if isinstance(problem_type, str) else None,
        }

    def _start_stats(self, chunk: Any) -> ClassificationStats | RegressionStats:
        """The running statistics of a call, from its first chunk (how the output is read)."""
        o = self.options
        task, class_dim = resolve_reading(o.task, o.aleatoric, o.output_type, o.class_dim, chunk, **self._config_hints())
        if task == "classification":
            return ClassificationStats(o.read_output_type, class_dim, detect_probs=o.output_type is None)
        return RegressionStats(o.aleatoric)

    @staticmethod
    def _finish(stats: ClassificationStats | RegressionStats, n: int, store: SampleStore | None = None) -> Prediction:
        """Statistics of ``n`` samples per row, finished into a prediction."""
        if isinstance(stats, ClassificationStats):
            stats.check_reading()
            return ClassificationPrediction.from_stats(stats, n, store, stats.class_dim)
        return RegressionPrediction.from_stats(stats, n, store)

    def _predict_adaptive(self, inputs: Inputs) -> Prediction:
        """``n_samples="auto"``: rounds until every input's standard error meets the tolerance."""
        pred = predict_adaptively(
            inputs,
            self.options,
            draw=lambda sub, k, note: self._chunks(sub, k, note),
            start=self._start_stats,
            finish=self._finish,
        )
        spread = pred.variance if isinstance(pred, RegressionPrediction) else pred.std.square()
        centre = pred.mean if isinstance(pred, RegressionPrediction) else pred.probs
        if self.policy.has_randomness and negligible_spread(spread, centre):
            self._warn_identical()
        return pred

    def _predict_one(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Prediction:
        o = self.options
        inputs = self._prepare(args, kwargs)
        self._discover(inputs)
        self._check_gates(inputs)
        if o.adaptive and inputs.batch_size > 0:
            return self._predict_adaptive(inputs)
        stats: ClassificationStats | RegressionStats | None = None
        store = SampleStore(o.n_samples) if o.keep_samples else None
        for start, stop, chunk in self._chunks(inputs):
            if stats is None:
                stats = self._start_stats(chunk)
            stats.update(start, stop, chunk, inputs.batch_size)
            if store is not None:
                store.update(start, stop, chunk[0] if isinstance(chunk, tuple) else chunk, inputs.batch_size)
        assert stats is not None
        pred = self._finish(stats, o.first_round, store)
        moments = stats.probs if isinstance(stats, ClassificationStats) else stats.mean
        if o.first_round > 1 and self.policy.has_randomness and negligible_spread(moments.variance, moments.mean):
            self._warn_identical()
        return pred

    def _deterministic_one(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Prediction:
        """One eval-mode pass of the batch (in ``max_batch_size`` parts), reduced with N = 1."""
        o = self.options
        inputs = self._prepare(args, kwargs)
        device, _ = model_device_dtype(self.model)
        device = device if device is not None else torch.device("cpu")
        runner = Runner(
            self.model,
            inputs,
            n_samples=1,
            output=o.output,
            output_batch_dim=o.output_batch_dim,
            pair=o.pair,
            check_finite=True,
            autocast_dtype=o.dtype,
            device=device,
            ctx=None,
        )
        watched = [torch.default_generator] + [torch.cuda.default_generators[i] for i in cuda_devices(device)]
        before = [g.get_state() for g in watched]
        stats: ClassificationStats | RegressionStats | None = None
        store = SampleStore(1) if o.keep_samples else None
        step = o.max_batch_size or max(inputs.batch_size, 1)
        with split_errors_named(inputs, o.max_batch_size):
            for start in range(0, inputs.batch_size, step):
                stop = min(start + step, inputs.batch_size)
                chunk = runner.replicate(start, stop, 1)
                if stats is None:
                    stats = self._start_stats(chunk)
                stats.update(start, stop, chunk, inputs.batch_size)
                if store is not None:
                    kept = chunk[0] if isinstance(chunk, tuple) else chunk
                    store.update(start, stop, kept, inputs.batch_size)
        runner.raise_if_bad_rows()
        if stats is None:
            raise InvalidInputError("predict_deterministic needs a batch of at least one input; got 0 rows.")
        drew = any(not torch.equal(b, g.get_state()) for b, g in zip(before, watched, strict=True))
        if drew:
            warnings.warn(
                f"{type(self.model).__name__} drew random numbers in eval mode, so its output with dropout "
                "off is not deterministic: it has randomness no training flag switches off (e.g. "
                "F.dropout(x, p, training=True)). predict_deterministic returns one draw, from a fixed "
                "seed, and NaN standard errors. Make that dropout follow the module's mode "
                "(training=self.training) for a deterministic baseline.",
                McdropWarning,
                stacklevel=user_stacklevel(),
            )
        pred = self._finish(stats, 1, store)
        if isinstance(pred, ClassificationPrediction):
            pred.expected_entropy = pred.predictive_entropy.clone()  # N = 1: the same H[p_1]
        if not drew:  # no Monte Carlo error: every pass would give this output
            for f in dataclasses.fields(pred):
                value = getattr(pred, f.name)
                if f.name.endswith("_se") and isinstance(value, torch.Tensor):
                    setattr(pred, f.name, torch.zeros_like(value))
        return pred

    def _warn_identical(self) -> None:
        warnings.warn(
            f"All {self.n_samples} MC samples are identical{' (per input)' if self.options.adaptive else ''} although the model has dropout sites "
            f"({', '.join(s.path or '<model>' for s in self.policy.sampled_sites)}): the dropout does not "
            "reach the selected output (e.g. it sits in a branch that is not used, or is applied to a "
            "tensor that is all zeros). The uncertainty estimates are all zero.",
            NoRandomnessWarning,
            stacklevel=user_stacklevel(),
        )

    @contextlib.contextmanager
    def _session(self) -> Iterator[None]:
        """Dropout on, gradients off, and the wrapper's own RNG stream when seeded.

        While a seeded wrapper samples it holds torch's generators alone (see
        :func:`mcdrop.engine.rng.rng_access`).
        """
        with self.policy.activate(), torch.no_grad(), rng_access(exclusive=self._stream is not None):
            if self._stream is None:
                yield
            else:
                device, _ = model_device_dtype(self.model)
                with self._stream.active(device):
                    yield
