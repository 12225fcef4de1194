"""Lightning: MC dropout metrics (and reports) of the model at every validation and test.

:class:`MCDropoutCallback` is a ``lightning.pytorch`` callback. At the end of a validation epoch
(every ``every_n_epochs`` epochs of ``trainer.fit``, and every ``trainer.validate``) and of a test
(``trainer.test``, unless ``on_test=False``) it wraps the LightningModule in
:class:`mcdrop.MCDropout`, predicts every input of the trainer's validation (test) dataloaders with
``n_samples`` stochastic passes, and logs the metrics as ``mc/<metric>`` through the module's
``self.log``: they reach every logger attached to the trainer and ``trainer.callback_metrics``
(so ``ModelCheckpoint(monitor="mc/ECE", mode="min")`` works). With ``report_dir`` it also writes
the full :func:`mcdrop.report` of each evaluation (``report_dir/epoch=003/``; ``report_dir/test/``).

Importing this module imports Lightning (``lightning.pytorch``, else the older ``pytorch_lightning``):
importing it is opting in. Without either, the import raises
:class:`~mcdrop.errors.MissingDependencyError` naming ``pip install "mcdrop[lightning]"``;
``import mcdrop`` never imports it.

Example:
    >>> from mcdrop.integrations.lightning import MCDropoutCallback
    >>> callback = MCDropoutCallback(n_samples=20, every_n_epochs=2, report_dir=None, seed=0)
    >>> callback.n_samples, callback.every_n_epochs, callback.prefix
    (20, 2, 'mc/')
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import random
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mcdrop import distributed
from mcdrop._checks import check_bool, check_int, import_optional, user_stacklevel
from mcdrop.errors import InvalidInputError, InvalidTypeError, McdropWarning, NoDropoutError
from mcdrop.options import SamplingOptions
from mcdrop.wrapper import MCDropout

__all__ = ["MCDropoutCallback"]


def _import_lightning() -> Any:
    """``lightning.pytorch``, else ``pytorch_lightning``, else a MissingDependencyError naming the extra."""
    try:
        return importlib.import_module("lightning.pytorch")
    except ImportError:
        pass
    try:
        return importlib.import_module("pytorch_lightning")
    except ImportError:
        pass
    return import_optional("lightning.pytorch", extra="lightning", feature="mcdrop.integrations.lightning")


pl = _import_lightning()

#: the keyword arguments passed on to MCDropout (its options but the ones the callback sets itself)
_MC_OPTIONS = frozenset(f.name for f in dataclasses.fields(SamplingOptions)) - {"n_samples", "seed"}


class _Untouched:
    """Remember the module's ``training`` flags and the global RNG states; put them back on exit.

    The RNGs: torch's CPU generator, every initialised CUDA device's, Python's ``random`` and NumPy's
    global state. Iterating a ``DataLoader`` draws its base seed from torch's global generator, so
    without this the callback would shift the training run's random numbers.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.flags = [(m, m.training) for m in self.module.modules()]
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self.python = random.getstate()
        self.numpy = np.random.get_state()

    def __exit__(self, *exc: object) -> None:
        for m, flag in self.flags:
            m.training = flag
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        random.setstate(self.python)
        np.random.set_state(self.numpy)


class MCDropoutCallback(pl.Callback):
    """MC dropout metrics of the LightningModule on the validation (and test) data, logged as ``mc/...``.

    **What is predicted.** The LightningModule itself: ``pl_module(*inputs)`` (its ``forward``), with
    its dropout switched on for the MC passes only. Point at another module with ``model``: an
    attribute name (``model="net"``, dotted paths work: ``"backbone.head"``) or a callable
    ``model(pl_module) -> nn.Module``. Batches are read as mcdrop reads them everywhere
    (:meth:`MCDropout.predict_loader <mcdrop.MCDropout.predict_loader>`): ``(inputs, targets)``,
    ``(inputs,)``, a dict with a ``labels``/``targets``/``y`` key; anything else with
    ``unpack=lambda batch: (inputs, targets)`` (inputs as a tuple are positional arguments, as a dict
    keyword arguments). The whole dataloader is evaluated (``limit_val_batches`` is Lightning's
    loop's and does not apply), on the module's device, outside Lightning's precision context.

    **What is logged.** Without ``report_dir``: the streaming metrics of
    ``predict_loader(keep="metrics")`` (memory O(bins); for a classifier accuracy, NLL, Brier, ECE,
    MCE, RMSCE, misclassification AUROC and its error bound, mean entropy and MI, counts). With
    ``report_dir``: the summary metrics of :func:`mcdrop.report` (also adaptive and classwise ECE,
    AURC...), and the report saved. Keys are ``prefix + metric_key(name)``
    (:func:`mcdrop.report.trackers.metric_key`: ``mc/ECE``, ``mc/misclassification_AUROC_entropy``);
    at a test ``prefix + "test/"`` (``mc/test/ECE``); with several dataloaders each key ends in
    ``/dataloader_idx_<i>``, as Lightning's own. With ``report_dir`` and ``baseline`` (the default)
    the report also holds the dropout-off prediction, one extra pass per batch, and its metrics are
    logged as ``mc/deterministic/<metric>`` (the scheme of :mod:`mcdrop.report.trackers`). Metrics that are NaN (undefined for the data) are
    not logged, as in :meth:`UncertaintyReport.log_to <mcdrop.UncertaintyReport.log_to>`.

    **Seeds.** Every evaluation draws its masks from a fresh ``MCDropout(seed=seed)``: epochs are
    compared on the same masks (common random numbers), so their differences are the model's.

    **Nothing else changes.** The module's ``training`` flags, parameters and buffers, and the global
    RNG states (torch CPU and CUDA, ``random``, NumPy) are as before each evaluation, also after an
    error, so a run with the callback trains bit for bit as without it.

    **DDP.** Under a distributed strategy every rank predicts its shard of the (distributed-sampler)
    dataloader through :mod:`mcdrop.distributed` (rank ``r`` seeded with ``derive_seed(seed, r)``);
    streaming metrics are all-reduced, predictions gathered to rank 0, which writes the one report
    and sends its metrics to the other ranks, so all log the same values.

    **Errors.** A module (or ``model``) without dropout raises
    :class:`~mcdrop.errors.NoDropoutError` at ``setup``, before any training, rather than warn every
    epoch: the callback would measure nothing. A ``trainer.fit`` that ends without the callback ever
    running (no validation dataloader, ``limit_val_batches=0``, ``every_n_epochs`` larger than the
    epochs run) warns (:class:`~mcdrop.errors.McdropWarning`) saying why.

    Args:
        n_samples: MC passes per input, or ``"auto"``: adaptive sampling, each input stops at its own
            N (``tolerance``, ``min_samples``, ``max_samples``, ``target`` go in ``mc_kwargs``; see
            :class:`mcdrop.MCDropout`).
        every_n_epochs: Evaluate at the end of every ``every_n_epochs``-th epoch of ``fit``
            (epochs ``every_n_epochs - 1``, ``2 * every_n_epochs - 1``... counted from 0, as
            Lightning's ``check_val_every_n_epoch``). ``trainer.validate`` always evaluates.
        report_dir: Folder for one :func:`mcdrop.report` per evaluation: ``epoch=003/`` (a second
            validation in the same epoch replaces it), ``test/``, with ``/dataloader_idx_<i>`` below
            for several dataloaders. ``None``: metrics only.
        seed: Seed of the MC dropout masks (``None``: the global RNG, whose state is restored after).
        on_test: Also evaluate at the end of ``trainer.test``.
        model: What to wrap: ``None`` (the LightningModule), an attribute path of it, or a callable
            ``model(pl_module) -> nn.Module``.
        unpack: ``unpack(batch) -> (inputs, targets)`` for other batch layouts.
        prefix: Put before every logged key (default ``"mc/"``).
        report_kwargs: Keyword arguments of :func:`mcdrop.report` (``n_bins``, ``n_resamples``...).
        baseline: With ``report_dir``: also make one pass per batch with dropout off (one extra
            forward pass per batch, on top of the ``n_samples`` MC ones), so each report shows the
            dropout-off column beside MC dropout, and log its metrics as
            ``prefix + "deterministic/" + metric`` (``mc/deterministic/ECE``). No effect without
            ``report_dir`` (the streaming metrics are MC dropout's only).
        **mc_kwargs: Keyword arguments of :class:`mcdrop.MCDropout` (``task``, ``output_type``,
            ``output``, ``max_batch_size``...).

    Raises:
        InvalidInputError: A bad value (``n_samples`` below 1 and not ``"auto"``, ``every_n_epochs``
            below 1, an option of :class:`mcdrop.MCDropout` out of range, ...).
        InvalidTypeError: An argument of the wrong type, or a keyword argument that neither the
            callback nor :class:`mcdrop.MCDropout` takes (the message names it).

    Example:
        >>> import torch, lightning.pytorch as L
        >>> from mcdrop.integrations.lightning import MCDropoutCallback
        >>> class Net(L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3))
        ...     def forward(self, x):
        ...         return self.net(x)
        ...     def training_step(self, batch, i):
        ...         return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])
        ...     def validation_step(self, batch, i):
        ...         pass
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,)))
        >>> loader = torch.utils.data.DataLoader(data, batch_size=16)
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[MCDropoutCallback(n_samples=10)], logger=False,
        ...                     enable_progress_bar=False, enable_model_summary=False,
        ...                     enable_checkpointing=False, num_sanity_val_steps=0)
        >>> trainer.fit(Net(), loader, loader)
        >>> round(float(trainer.callback_metrics["mc/n_inputs"]))
        32
    """

    def __init__(
        self,
        n_samples: int | str = 30,
        *,
        every_n_epochs: int = 1,
        report_dir: str | os.PathLike[str] | None = None,
        seed: int | None = 0,
        on_test: bool = True,
        model: str | Callable[[Any], nn.Module] | None = None,
        unpack: Callable[[Any], tuple[Any, Any]] | None = None,
        prefix: str = "mc/",
        report_kwargs: Mapping[str, Any] | None = None,
        baseline: bool = True,
        **mc_kwargs: Any,
    ) -> None:
        super().__init__()
        # a whole number of passes or "auto" (adaptive sampling); SamplingOptions below validates it
        self.n_samples = n_samples
        self.every_n_epochs = check_int(every_n_epochs, "every_n_epochs", minimum=1)
        if seed is not None:
            seed = check_int(seed, "seed", minimum=0, maximum=2**64 - 1)
        self.seed = seed
        self.on_test = check_bool(on_test, "on_test")
        if report_dir is not None and not isinstance(report_dir, (str, os.PathLike)):
            raise InvalidTypeError(
                f"report_dir must be a folder path or None; got {type(report_dir).__name__}."
            )
        self.report_dir = None if report_dir is None else Path(report_dir)
        if model is not None and not (isinstance(model, str) or callable(model)):
            raise InvalidTypeError(
                f"model must be None (the LightningModule), an attribute name of it such as 'net', or a "
                f"callable pl_module -> nn.Module; got {type(model).__name__}."
            )
        self.model = model
        if unpack is not None and not callable(unpack):
            raise InvalidTypeError(
                f"unpack must be a callable batch -> (inputs, targets); got {type(unpack).__name__}."
            )
        self.unpack = unpack
        if not isinstance(prefix, str):
            raise InvalidTypeError(f"prefix must be a str (e.g. 'mc/'); got {type(prefix).__name__}.")
        self.prefix = prefix
        if report_kwargs is not None and not isinstance(report_kwargs, Mapping):
            raise InvalidTypeError(f"report_kwargs must be a dict; got {type(report_kwargs).__name__}.")
        self.report_kwargs = dict(report_kwargs or {})
        self.baseline = check_bool(baseline, "baseline")
        self.mc_kwargs = dict(mc_kwargs)
        self._ran_in_fit = False
        unknown = sorted(set(self.mc_kwargs) - _MC_OPTIONS)
        if unknown:
            raise InvalidTypeError(
                f"MCDropoutCallback got the keyword argument{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(map(repr, unknown))}, which it does not take. Its own arguments are listed in "
                "help(MCDropoutCallback); every other keyword is passed to mcdrop.MCDropout, whose "
                "arguments are listed in help(mcdrop.MCDropout) (task, output_type, max_batch_size, "
                "memory_budget, tolerance, ...)."
            )
        # the wrapper's options, validated now rather than at the first validation; mcdrop's own
        # errors (a bad value or type) come through unchanged
        SamplingOptions(n_samples=self.n_samples, seed=self.seed, **self.mc_kwargs)

    # ------------------------------------------------------------------ what is wrapped
    def _target(self, pl_module: nn.Module) -> nn.Module:
        if self.model is None:
            target: Any = pl_module
        elif isinstance(self.model, str):
            target = pl_module
            for part in self.model.split("."):
                if not hasattr(target, part):
                    raise InvalidInputError(
                        f"MCDropoutCallback(model={self.model!r}): {type(pl_module).__name__} has no attribute "
                        f"path {self.model!r} ({part!r} is missing on {type(target).__name__})."
                    )
                target = getattr(target, part)
        else:
            target = self.model(pl_module)
        if not isinstance(target, nn.Module):
            raise InvalidTypeError(
                f"MCDropoutCallback(model=...) must lead to a torch.nn.Module; got {type(target).__name__}."
            )
        return target

    def _wrapper(self, pl_module: nn.Module) -> MCDropout:
        try:
            return MCDropout(
                self._target(pl_module), n_samples=self.n_samples, seed=self.seed, **self.mc_kwargs
            )
        except NoDropoutError as err:
            raise NoDropoutError(
                f"MCDropoutCallback has nothing to sample in {type(pl_module).__name__}"
                f"{'' if self.model is None else f' (model={self.model!r})'}: {err} Add dropout to the "
                "model, point model= at the part that has it, or remove the callback."
            ) from err

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Check, before anything runs, that the module has dropout to sample (Lightning calls it).

        Args:
            trainer: The Trainer.
            pl_module: The LightningModule.
            stage: ``"fit"``, ``"validate"``, ``"test"`` or ``"predict"``.

        Raises:
            NoDropoutError: The module (or ``model``) has no dropout.

        Example:
            >>> import torch, lightning.pytorch as L
            >>> from mcdrop.integrations.lightning import MCDropoutCallback
            >>> class NoDropout(L.LightningModule):
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.layer = torch.nn.Linear(2, 2)
            >>> MCDropoutCallback().setup(None, NoDropout(), "fit")  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            mcdrop.errors.NoDropoutError: MCDropoutCallback has nothing to sample in NoDropout: ...
        """
        self._wrapper(pl_module)
        if stage == "fit":
            self._ran_in_fit = False

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Evaluate on the validation dataloaders and log (Lightning calls it; see the class docstring).

        Args:
            trainer: The Trainer.
            pl_module: The LightningModule.

        Example:
            >>> from mcdrop.integrations.lightning import MCDropoutCallback
            >>> MCDropoutCallback.on_validation_epoch_end.__name__  # see the class example
            'on_validation_epoch_end'
        """
        if trainer.sanity_checking:
            return
        fn = getattr(trainer.state, "fn", None)
        fitting = getattr(fn, "value", fn) == "fit"
        if fitting and (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        self._evaluate(trainer, pl_module, trainer.val_dataloaders, test=False)
        if fitting:
            self._ran_in_fit = True

    def on_test_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Evaluate on the test dataloaders and log as ``mc/test/...`` (Lightning calls it).

        Args:
            trainer: The Trainer.
            pl_module: The LightningModule.

        Example:
            >>> from mcdrop.integrations.lightning import MCDropoutCallback
            >>> MCDropoutCallback(on_test=False).on_test  # then trainer.test() leaves it out
            False
        """
        if self.on_test:
            self._evaluate(trainer, pl_module, trainer.test_dataloaders, test=True)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Warn when a whole ``fit`` ran without the callback evaluating once (Lightning calls it).

        Args:
            trainer: The Trainer.
            pl_module: The LightningModule.

        Example:
            >>> from mcdrop.integrations.lightning import MCDropoutCallback
            >>> MCDropoutCallback.on_fit_end.__name__
            'on_fit_end'
        """
        if self._ran_in_fit or trainer.current_epoch == 0 and trainer.global_step == 0:
            return
        warnings.warn(
            f"MCDropoutCallback did not run during trainer.fit ({trainer.current_epoch} epoch(s)): the "
            "validation loop never ended an epoch it could use. Give fit a validation dataloader "
            "(val_dataloaders= or the module's val_dataloader()), check limit_val_batches and "
            f"check_val_every_n_epoch, and every_n_epochs={self.every_n_epochs}.",
            McdropWarning,
            stacklevel=user_stacklevel(),
        )

    # ------------------------------------------------------------------ the evaluation
    def _evaluate(self, trainer: Any, pl_module: Any, loaders: Any, *, test: bool) -> None:
        named = list(_loaders(loaders))
        if not named:
            where = "test" if test else "validation"
            raise InvalidInputError(
                f"MCDropoutCallback found no {where} dataloader on the trainer; pass one to "
                f"trainer.{'test' if test else 'fit'}(...) or define {'test' if test else 'val'}_dataloader()."
            )
        prefix = self.prefix + ("test/" if test else "")
        many = len(named) > 1
        to_log: dict[str, float] = {}
        with _Untouched(pl_module), torch.inference_mode(False), torch.no_grad():
            for index, loader in named:
                suffix = f"/dataloader_idx_{index}" if many else ""
                folder = None
                if self.report_dir is not None:
                    folder = self.report_dir / ("test" if test else f"epoch={trainer.current_epoch:03d}")
                    if many:
                        folder = folder / f"dataloader_idx_{index}"
                title = f"{type(pl_module).__name__}, " + (
                    "test" if test else f"epoch {trainer.current_epoch}"
                )
                if many:
                    title += f", dataloader {index}"
                metrics = self._metrics(pl_module, loader, folder, title)
                from mcdrop.report.trackers import metric_key

                for name, value in metrics.items():
                    if np.isfinite(value):
                        to_log[metric_key(name, prefix) + suffix] = float(value)
        # every rank holds the same values (all-reduced, or sent by rank 0): averaging them over the
        # ranks changes nothing, and it is what Lightning expects of epoch-level values under DDP
        sync = distributed.get_world_size() > 1
        for key, value in to_log.items():
            pl_module.log(
                key,
                value,
                on_step=False,
                on_epoch=True,
                sync_dist=sync,
                add_dataloader_idx=False,
                batch_size=1,
            )

    def _metrics(self, pl_module: Any, loader: Any, folder: Path | None, title: str) -> dict[str, float]:
        mc = self._wrapper(pl_module)
        world = distributed.get_world_size()
        if folder is None:
            stream = distributed.predict_loader(
                mc, loader, dst=None, keep="metrics", unpack=self.unpack, progress=False
            )
            return dict(stream.summary())
        pred = distributed.predict_loader(
            mc,
            loader,
            dst=0,
            keep="predictions",
            unpack=self.unpack,
            progress=False,
            deterministic=self.baseline,
        )
        outcome: list[Any] = [None]
        if distributed.get_rank() == 0:
            try:
                import mcdrop.report
                from mcdrop.report.trackers import report_values

                rep = mcdrop.report(pred, model=mc, **{"title": title, **self.report_kwargs})
                rep.save(folder, overwrite=True)
                values = report_values(rep)
                for variant in rep.variants:  # dropout off (and recalibrated, with calibration=)
                    values.update({f"{variant}/{k}": v for k, v in report_values(rep, variant).items()})
                outcome[0] = ("ok", values)
            except Exception as err:  # noqa: BLE001 - sent to the other ranks, then raised
                if world == 1:
                    raise
                outcome[0] = ("error", f"{type(err).__name__}: {err}")
        if world > 1:
            torch.distributed.broadcast_object_list(outcome, src=0)
        status, value = outcome[0]
        if status == "error":
            raise InvalidInputError(f"MCDropoutCallback: rank 0 failed to build or save the report: {value}")
        return dict(value)


def _loaders(loaders: Any) -> Iterator[tuple[int, Any]]:
    """``(index, dataloader)`` for a dataloader, a list/tuple of them or a dict of them."""
    if loaders is None:
        return
    if isinstance(loaders, Mapping):
        yield from enumerate(loaders.values())
    elif isinstance(loaders, (list, tuple)):
        yield from enumerate(loaders)
    else:
        yield 0, loaders
