"""The loader loop: predicting a whole loader batch by batch, streaming metrics, checkpoint and resume.

Shared by :meth:`mcdrop.MCDropout.predict_loader` and :func:`mcdrop.distributed.predict_loader`
(which passes a filter of the rows a rank counts and an extra fingerprint). It uses the wrapper's
public face only: :meth:`~mcdrop.MCDropout.predict` per batch, :attr:`~mcdrop.MCDropout.options`,
:attr:`~mcdrop.MCDropout.sites` and :attr:`~mcdrop.MCDropout.rng_state` for checkpoints.

The loader is iterated outside the wrapper's RNG stream: its shuffling and augmentations draw from
the global RNG as usual, and the dropout masks do not depend on the loader. tqdm is updated by
hand rather than wrapped around the loader: wrapping a ``DataLoader`` in tqdm changes which global
random numbers its shuffling sampler draws.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mcdrop._checks import check_int
from mcdrop.errors import InvalidInputError, InvalidTypeError
from mcdrop.metrics.streaming import (
    StreamingClassificationMetrics,
    StreamingMetrics,
    StreamingRegressionMetrics,
)
from mcdrop.predictions import (
    ClassificationPrediction,
    Prediction,
    RegressionPrediction,
    concat_predictions,
    select_rows,
)

if TYPE_CHECKING:
    from mcdrop.wrapper import MCDropout

__all__ = ["check_loader", "checkpoint_fingerprint", "collect", "iter_predictions", "select_rows", "stream_metrics"]

Unpack = Callable[[Any], tuple[Any, Any]]
#: ``row_filter(rows)``: called once per batch of the loader, in order (evaluated or skipped), with
#: the batch's row count (``None`` for a skipped batch); a bool mask of the rows to count, or ``None``
#: for all.
RowFilter = Callable[[int | None], torch.Tensor | None]


def check_loader(loader: Any) -> None:
    """Refuse a ``loader`` that cannot yield batches, before anything is read from it.

    A loader is anything iterable (a ``DataLoader``, a list of batches, a generator); a string or
    path (a file name given where its data were meant) is not.

    Args:
        loader: What was passed as the loader.

    Raises:
        InvalidTypeError: ``loader`` is not iterable, or is a string, bytes or a path.
    """
    kind = type(loader)
    if isinstance(loader, (str, bytes, os.PathLike)) or not (
        hasattr(kind, "__iter__") or hasattr(kind, "__getitem__")
    ):
        raise InvalidTypeError(
            f"loader must be an iterable of batches (a torch DataLoader, a list of batches, a "
            f"generator); got {loader!r:.80} of type {kind.__name__}. To predict one batch, call "
            "predict(inputs)."
        )


def iter_predictions(
    mc: MCDropout,
    loader: Iterable[Any],
    *,
    unpack: Unpack | None,
    progress: bool,
    skip: int = 0,
    deterministic: bool = False,
) -> Iterator[tuple[Prediction | None, Any]]:
    """``(prediction, targets)`` per batch; the first ``skip`` batches are read, not evaluated (``None``).

    Every batch is one :meth:`~mcdrop.MCDropout.predict` call (dropout on for that call only);
    with ``deterministic``, then one :meth:`~mcdrop.MCDropout.predict_deterministic` call, set as
    the prediction's ``deterministic``.
    """
    from tqdm.auto import tqdm

    total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    with tqdm(total=total, desc="MC dropout", unit="batch", disable=not progress, leave=False) as bar:
        for number, batch in enumerate(loader):
            inputs, target = (unpack or default_unpack)(batch)
            if number < skip:
                bar.update()
                yield None, target
                continue
            try:
                pred = _call(mc.predict, inputs)
            except TypeError as err:
                mismatch = _keyword_mismatch(err, inputs, unpack) if isinstance(inputs, Mapping) else None
                if mismatch is None:
                    raise
                raise mismatch from err
            if deterministic:
                pred.deterministic = _call(mc.predict_deterministic, inputs)
            check_task_against_targets(mc, pred, target)
            bar.update()
            yield pred, target


def check_task_against_targets(mc: MCDropout, pred: Prediction, target: Any) -> None:
    """Refuse classes that ``task="auto"`` read where the loader's targets are regression targets.

    Only when nothing declared classes (``task="auto"``, neither ``output_type`` nor ``class_dim``
    given): floating-point targets of the very shape of the class probabilities with a value
    outside [0, 1] are real values (a forecaster's ``(batch, 24)``), not class labels, one-hot or
    soft labels.

    Raises:
        InvalidInputError: Such targets beside a classification the options did not ask for.
    """
    o = mc.options
    if o.task != "auto" or o.output_type is not None or o.class_dim is not None:
        return
    if not isinstance(pred, ClassificationPrediction) or not isinstance(target, torch.Tensor):
        return
    if not target.is_floating_point() or tuple(target.shape) != tuple(pred.probs.shape):
        return
    if bool(((target < 0) | (target > 1)).any()):
        raise InvalidInputError(
            f"task='auto' read the model's output of shape {tuple(pred.probs.shape)} as {pred.n_classes} "
            "classes, but the loader's targets have that shape and real values outside [0, 1] "
            f"(min {float(target.min()):.4g}, max {float(target.max()):.4g}): the targets of a "
            "regression (e.g. a forecast of several steps), not class labels. Pass task='regression'; "
            "if the model does classify, pass task='classification'."
        )


def collect(
    mc: MCDropout,
    loader: Iterable[Any],
    *,
    unpack: Unpack | None,
    progress: bool,
    row_filter: RowFilter | None = None,
    deterministic: bool = False,
) -> Prediction | None:
    """The predictions of every batch concatenated, with their targets when every batch had them.

    With ``row_filter`` only the rows it keeps are collected (moved to the CPU). With
    ``deterministic`` each carries its dropout-off prediction (``deterministic``), with the same
    targets. ``None`` when no batch had a row.

    Raises:
        InvalidInputError: The targets do not match the inputs.
    """
    parts: list[Prediction] = []
    targets: list[torch.Tensor] = []
    has_targets = True
    for pred, target in iter_predictions(
        mc, loader, unpack=unpack, progress=progress, deterministic=deterministic
    ):
        assert pred is not None
        target_t = None if target is None else torch.as_tensor(target).detach().cpu()
        if row_filter is not None:
            pred = pred.cpu()
            keep = row_filter(len(pred))
            if keep is not None and not bool(keep.all()):
                pred = select_rows(pred, keep)
                target_t = None if target_t is None else target_t[keep]
            if len(pred) == 0:
                continue
        parts.append(pred)
        if target_t is None:
            has_targets = False
        elif has_targets:
            targets.append(target_t)
    if not parts:
        return None
    result = concat_predictions(parts)
    if has_targets and targets:
        result.targets = torch.cat(targets, 0)
        if result.targets.shape[0] != len(result):
            raise InvalidInputError(
                f"The loader's targets have {result.targets.shape[0]} rows for {len(result)} inputs."
            )
        if result.deterministic is not None:
            result.deterministic.targets = result.targets
    return result


def checkpoint_fingerprint(mc: MCDropout) -> dict[str, Any]:
    """What must not change between a checkpoint and its resumption.

    The model's class, the options (:meth:`~mcdrop.options.SamplingOptions.fingerprint`) and which
    sites are sampled at which rates (``include=``, ``exclude=``, ``drop_path=``,
    :func:`mcdrop.set_dropout_rate`).
    """
    return {
        "model": type(mc.model).__name__,
        **mc.options.fingerprint(),
        "sampled_sites": [f"{s.path or '<model>'}:{s.kind}:{s.rate}" for s in mc.sites if s.sampled],
    }


def stream_metrics(
    mc: MCDropout,
    loader: Iterable[Any],
    *,
    unpack: Unpack | None,
    progress: bool,
    metrics: StreamingMetrics | None,
    checkpoint: str | os.PathLike[str] | None,
    checkpoint_every: int,
    row_filter: RowFilter | None = None,
    fingerprint: Mapping[str, Any] | None = None,
) -> StreamingMetrics | None:
    """The ``keep="metrics"`` loop: accumulate, checkpoint, resume.

    ``fingerprint`` adds to :func:`checkpoint_fingerprint` (e.g. the rank). Returns ``None`` when no
    batch had a row to count.

    Raises:
        InvalidInputError: A batch without targets, a checkpoint from another configuration or
            another loader.
    """
    check_int(checkpoint_every, "checkpoint_every", minimum=1)
    path = None if checkpoint is None else Path(checkpoint)
    expected = {**checkpoint_fingerprint(mc), **dict(fingerprint or {})}
    if hasattr(loader, "__len__"):
        expected["loader_batches"] = len(loader)  # type: ignore[arg-type]
    acc = metrics
    done = 0
    seeded = mc.options.seed is not None
    if path is not None and path.exists():
        state = read_checkpoint(path)
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
        if seeded:
            mc.rng_state = state["rng"]
        if state["complete"]:
            return acc

    def save(count: int, complete: bool) -> None:
        if path is not None:
            state = {
                "format": CHECKPOINT_FORMAT,
                "version": 1,
                "fingerprint": expected,
                "batches": count,
                "complete": complete,
                "metrics": None if acc is None else acc.state_dict(),
                "rng": mc.rng_state if seeded else None,
            }
            write_checkpoint(path, state)

    count = 0
    for pred, target in iter_predictions(mc, loader, unpack=unpack, progress=progress, skip=done):
        count += 1
        mask = row_filter(None if pred is None else len(pred)) if row_filter is not None else None
        if pred is None:
            continue
        if target is None:
            raise InvalidInputError(
                "keep='metrics' needs targets in every batch (a tuple (inputs, targets), a dict "
                "with a 'labels'/'targets'/'y' key, or unpack=); this batch had none."
            )
        acc = accumulate(acc, pred, torch.as_tensor(target), mask)
        if count % checkpoint_every == 0:
            save(count, complete=False)
    if count < done:
        raise InvalidInputError(
            f"the checkpoint {path} records {done} batches done, but the loader yielded only {count}: "
            "it is not the loader the checkpoint was written for."
        )
    save(count, complete=True)
    return acc


TARGET_KEYS = ("labels", "label", "targets", "target", "y")


CHECKPOINT_FORMAT = "mcdrop-predict-loader-checkpoint"


def read_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means "not our checkpoint"
        raise InvalidInputError(
            f"could not read the checkpoint {path} ({type(err).__name__}: {err}); delete it to start afresh."
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise InvalidInputError(
            f"{path} is not a predict_loader checkpoint; pass another checkpoint= path or delete the file."
        )
    return state


def write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a temporary file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, str(tmp))
    os.replace(tmp, path)


def accumulate(
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
            pred = select_rows(pred.cpu(), mask)
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


def _call(predict: Callable[..., Prediction], inputs: Any) -> Prediction:
    """``predict`` of a batch's inputs: a dict as keyword inputs, a tuple as positional ones, else one input."""
    if isinstance(inputs, Mapping):
        return predict(**inputs)
    if isinstance(inputs, tuple):
        return predict(*inputs)
    return predict(inputs)


def _keyword_mismatch(err: TypeError, inputs: Mapping[str, Any], unpack: Unpack | None) -> Exception | None:
    """A dict batch whose keys the model does not take as keyword arguments: say to pass ``unpack=``.

    ``None`` for any other ``TypeError`` (the model's own, re-raised as it is).
    """
    text = str(err)
    named = any(f"'{key}'" in text for key in inputs)
    if unpack is not None or not named or not ("keyword argument" in text or "positional argument" in text):
        return None
    keys = ", ".join(repr(k) for k in inputs)
    return InvalidInputError(
        f"The loader's dict batches were passed to the model as keyword arguments ({keys}; the targets "
        f"taken out), and the model refused them: {text}. Pass unpack= to say how a batch maps to the "
        "model's inputs and the targets, e.g. unpack=lambda batch: (batch['pixels'], batch['label']) for "
        "model(batch['pixels'])."
    )


def default_unpack(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch in one of the usual layouts.

    A tensor is the inputs alone; a dict gives its :data:`TARGET_KEYS` entry as the targets and the
    rest as keyword inputs; a tuple or list ``(inputs,)`` or ``(inputs, targets)`` as it says. A
    tuple of three or more (a ``TensorDataset(input_ids, attention_mask, labels)``) is refused:
    which elements are inputs and which the targets is the user's to say, with ``unpack=``.

    Raises:
        InvalidInputError: An empty tuple, or one of more than two elements.
        InvalidTypeError: Any other type of batch.
    """
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k not in TARGET_KEYS}
        target = next((batch[k] for k in TARGET_KEYS if k in batch), None)
        return inputs, target
    if isinstance(batch, (tuple, list)):
        if len(batch) == 0:
            raise InvalidInputError("The loader yielded an empty batch tuple.")
        if len(batch) == 1:
            return batch[0], None
        if len(batch) > 2:
            kinds = ", ".join(type(part).__name__ for part in batch)
            raise InvalidInputError(
                f"The loader yielded a batch of {len(batch)} elements ({kinds}); only (inputs,) and "
                "(inputs, targets) are read without being told, since which of more elements are "
                "inputs and which the targets differs from one data set to the next. Pass unpack= "
                "to say it, e.g. for (input_ids, attention_mask, labels): "
                "unpack=lambda batch: ((batch[0], batch[1]), batch[2]) (the model is then called as "
                "model(batch[0], batch[1]) and batch[2] are the targets), or "
                "unpack=lambda batch: ({'input_ids': batch[0], 'attention_mask': batch[1]}, batch[2]) "
                "for keyword inputs."
            )
        return batch[0], batch[1]
    raise InvalidTypeError(
        f"Cannot unpack a batch of type {type(batch).__name__}; pass unpack=lambda batch: (inputs, targets)."
    )
