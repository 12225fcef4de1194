"""Monte Carlo dropout evaluation for the Hugging Face ``Trainer``: :func:`mc_evaluate` and a callback.

:func:`mc_evaluate` runs N stochastic passes over a trainer's evaluation set and returns metrics
named like ``Trainer.evaluate``'s: ``{metric_key_prefix}_mc_<metric>`` (``eval_mc_ece``,
``eval_mc_accuracy``, ...). :class:`MCEvaluationCallback` does the same on every evaluation of
``trainer.train()`` and ``trainer.evaluate()``, so the metrics land in the returned dict and in
``trainer.state.log_history``.

What is taken from the trainer, and why:

* the model (``trainer.model``, on its own device; never moved nor cast), put in eval mode for the
  evaluation like ``Trainer.evaluate`` does, with only its dropout sampled (:class:`mcdrop.MCDropout`:
  ``nn.Dropout`` layers and the attention dropout of BERT, GPT-2, ViT and the like, which is gated
  on the attention module's ``training`` flag); every module's ``training`` flag is put back
  afterwards, also when an exception interrupts, and the parameters are not touched;
* the batches: ``trainer.get_eval_dataloader(...)``, so the data collator, the removal of the
  columns the model does not take and ``per_device_eval_batch_size`` are the trainer's own;
* the label key: ``trainer.label_names`` (``args.label_names``, else the model class's), which is
  taken out of every batch: the model is called without labels, so it computes no loss;
* the size of the forward passes: at most ``per_device_eval_batch_size`` rows per pass (replicas of
  the batch counted), the batch size the user chose to fit the device's memory;
  ``max_batch_size=None`` lets mcdrop size the passes from its ``memory_budget`` instead.

Label value ``-100`` (the ignore index of ``torch.nn.CrossEntropyLoss`` and of the data collators'
padding) excludes that row, or that token for token classification, from every metric and from the
report. Token classification (logits ``(batch, T, K)``) is evaluated per token: the valid tokens of
all batches are one set of predictions. A regression model (one output, ``problem_type``
``"regression"`` or ``num_labels == 1``) gets the regression metrics. Multi-label classification
(``problem_type="multi_label_classification"``, independent sigmoids) is refused: mcdrop reads a
classifier's logits through a softmax over the classes, which would be wrong for it.

Metrics (all from :mod:`mcdrop.metrics`, on the mean probabilities of the N passes), each key
``{prefix}_mc_<name>``:

* classification: ``accuracy``, ``nll``, ``brier`` (summed over classes), ``ece`` (``n_bins``
  equal-width bins, L1), ``aurc`` and ``misclassification_auroc`` (ranked by predictive entropy; NaN
  when every prediction is right, or every one wrong), ``predictive_entropy`` and
  ``mutual_information`` (means, nats), ``n_predictions`` (rows or tokens counted);
* regression (Gaussian with the MC standard deviation): ``rmse``, ``mae``, ``nll``, ``crps``,
  ``picp`` and ``mpiw`` (at ``level``), ``std`` (mean), ``n_predictions``.

With a report (``report=`` of :func:`mc_evaluate` and of the callback) and ``baseline=True`` (the
default) each batch also gets one pass with dropout off, one extra forward pass per batch: the
report shows the dropout-off column beside MC dropout, and its metrics are added as
``{prefix}_deterministic_<name>`` (``eval_deterministic_ece``; the classification metrics but
``mutual_information``, which one pass does not have; for regression ``rmse``, ``mae`` and
``n_predictions``, as one pass has no standard deviation).

Importing this module imports ``transformers`` (the callback subclasses its ``TrainerCallback``); a
missing ``transformers`` raises :class:`~mcdrop.errors.MissingDependencyError` naming
``pip install "mcdrop[transformers]"``. ``import mcdrop`` never imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mcdrop import metrics as mcm
from mcdrop._checks import check_bool, check_int, check_real, import_optional
from mcdrop.errors import InvalidInputError, InvalidTypeError
from mcdrop.predictions import ClassificationPrediction, Prediction, RegressionPrediction, concat_predictions
from mcdrop.wrapper import MCDropout

if TYPE_CHECKING:
    from mcdrop.report import UncertaintyReport

_transformers = import_optional(
    "transformers", extra="transformers", feature="mcdrop.integrations.transformers"
)

__all__ = ["IGNORE_INDEX", "MCEvaluationCallback", "mc_evaluate"]

#: Label value excluded from every metric (``torch.nn.CrossEntropyLoss``'s default ``ignore_index``).
IGNORE_INDEX = -100


def mc_evaluate(
    trainer: Any,
    eval_dataset: Any = None,
    *,
    n_samples: int | str = 20,
    seed: int | None = 0,
    metric_key_prefix: str = "eval",
    report: bool | str | os.PathLike[str] = False,
    n_bins: int = 15,
    level: float = 0.95,
    baseline: bool = True,
    **mc_options: Any,
) -> dict[str, float] | tuple[dict[str, float], UncertaintyReport]:
    """Evaluate a ``transformers.Trainer``'s model with Monte Carlo dropout.

    The batches come from ``trainer.get_eval_dataloader(eval_dataset)`` (the trainer's collator and
    ``per_device_eval_batch_size``); the labels (``trainer.label_names``, one key) are taken out of
    each batch and the rest is passed to the model as keyword arguments. Rows or tokens labelled
    ``-100`` count in no metric. The model's modes and parameters are as before afterwards, and with
    a ``seed`` torch's global random state too (training goes on as it would have). See the module
    documentation for the metrics and what is read from the trainer.

    Args:
        trainer: A ``transformers.Trainer`` (or subclass) holding the model to evaluate.
        eval_dataset: A data set, or the name of one of the trainer's evaluation sets when
            ``trainer.eval_dataset`` is a dict; ``None`` uses ``trainer.eval_dataset``.
        n_samples: Number of stochastic forward passes N per input (each evaluation costs about N
            plain evaluations), or ``"auto"`` for :class:`mcdrop.MCDropout`'s adaptive sampling
            (``tolerance=``, ``max_samples=`` ... in ``mc_options``).
        seed: Seed of the dropout masks: the same seed gives the same samples, and torch's global
            random state is left untouched. ``None`` draws from (and advances) the global generator.
        metric_key_prefix: Prefix of the metric names, as in ``Trainer.evaluate``; keys are
            ``f"{metric_key_prefix}_mc_{name}"``.
        report: ``True`` also builds the :class:`~mcdrop.UncertaintyReport` (tables, figures); a
            folder path builds it and saves it there (``report.save(path, overwrite=True)``: an
            earlier mcdrop report there is replaced, a folder holding other files is refused).
        n_bins: Equal-width confidence bins of the ECE (and of the report).
        level: Nominal coverage of the regression intervals (``picp``, ``mpiw``).
        baseline: With ``report``: also make one pass per batch with dropout off (one extra forward
            pass per batch), so the report shows the dropout-off column beside MC dropout, and add
            its metrics as ``f"{metric_key_prefix}_deterministic_{name}"`` (see the module
            documentation). No effect without ``report``.
        **mc_options: Passed on to :class:`mcdrop.MCDropout` (e.g. ``task``, ``output_type``,
            ``strategy``, ``include``/``exclude``, ``dtype``, ``memory_budget``). ``max_batch_size``
            defaults to the trainer's ``per_device_eval_batch_size``; ``None`` lets mcdrop choose.

    Returns:
        The metrics dict ``{f"{metric_key_prefix}_mc_{name}": value}``; with ``report`` given, the
        pair ``(metrics, report)`` (with ``baseline``, the metrics also hold the
        ``{metric_key_prefix}_deterministic_<name>`` ones).

    Raises:
        InvalidInputError: No evaluation set, several label names, a batch without labels, a
            multi-label classifier, a multi-output regression, every label ``-100``, or a
            distributed run (several processes: each would see its own shard only).
        InvalidTypeError: ``trainer`` has no model, or a batch is not a dict.

    Example:
        >>> import tempfile, torch
        >>> from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
        >>> from mcdrop.integrations.transformers import mc_evaluate
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = BertForSequenceClassification(BertConfig(
        ...     vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        ...     intermediate_size=16, num_labels=3))
        >>> data = [{"input_ids": torch.randint(0, 50, (6,)), "labels": torch.tensor(i % 3)}
        ...         for i in range(12)]
        >>> args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_eval_batch_size=4,
        ...                          report_to=[], use_cpu=True, disable_tqdm=False)
        >>> trainer = Trainer(model=model, args=args, eval_dataset=data)
        >>> metrics = mc_evaluate(trainer, n_samples=5)
        >>> sorted(metrics)[:3]
        ['eval_mc_accuracy', 'eval_mc_aurc', 'eval_mc_brier']
        >>> metrics["eval_mc_n_predictions"]
        12.0
    """
    model = getattr(trainer, "model", None)
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(
            f"mc_evaluate needs a transformers.Trainer holding a torch model; got {type(trainer).__name__} "
            f"whose model is {type(model).__name__}."
        )
    dataset = trainer.eval_dataset if eval_dataset is None else eval_dataset
    if dataset is None:
        raise InvalidInputError(
            "mc_evaluate needs an evaluation set: pass eval_dataset=..., or give the Trainer one."
        )
    if isinstance(dataset, Mapping):
        raise InvalidInputError(
            f"the trainer has several evaluation sets ({', '.join(map(str, dataset))}); pass "
            "eval_dataset=<name> to evaluate one of them."
        )
    _check_one_process(trainer.args)
    loader = trainer.get_eval_dataloader(eval_dataset)
    label_names = list(getattr(trainer, "label_names", None) or ["labels"])
    return _evaluate_loader(
        model,
        loader,
        label_names=label_names,
        default_max_batch_size=trainer.args.per_device_eval_batch_size,
        n_samples=n_samples,
        seed=seed,
        prefix=metric_key_prefix,
        report=report,
        n_bins=n_bins,
        level=level,
        mc_options=mc_options,
        baseline=baseline,
    )


class MCEvaluationCallback(_transformers.TrainerCallback):  # type: ignore[misc, name-defined]
    """A ``TrainerCallback`` that adds Monte Carlo dropout metrics to every evaluation.

    On each ``on_evaluate`` (every evaluation during ``trainer.train()``, and
    ``trainer.evaluate()``) it evaluates the model the trainer passes to callbacks on the
    evaluation's own dataloader (the trainer's collator and ``per_device_eval_batch_size``), as
    :func:`mc_evaluate` would, and adds ``{prefix}_mc_<metric>`` to

    * the evaluation's metrics dict: what ``trainer.evaluate()`` returns, and what
      ``metric_for_best_model`` reads (``metric_for_best_model="eval_mc_ece"``,
      ``greater_is_better=False`` keeps the best-calibrated checkpoint);
    * that evaluation's entry of ``trainer.state.log_history``.

    The prefix is the evaluation's own (``eval``; ``eval_<name>`` for a dict of evaluation sets),
    read from its ``{prefix}_runtime`` metric. Reporting callbacks (TensorBoard, W&B, MLflow) were
    sent the evaluation's logs before ``on_evaluate`` runs, so they do not see these metrics; to
    send them there as well, log them yourself: ``trainer.log(mc_evaluate(trainer))``.

    With the default ``seed=0`` the global random state is untouched, so training draws the same
    random numbers as without the callback.

    A run with several processes (``torchrun``, ``accelerate launch``) is refused when the trainer
    is built (``on_init_end``) and again at the start of ``trainer.train()``, before any training
    step, rather than at its first evaluation: each process would see its own shard only.

    Args:
        n_samples: Number of stochastic forward passes N per input (each evaluation costs about N
            plain evaluations on top of the trainer's own), or ``"auto"`` (adaptive sampling, as for
            :func:`mc_evaluate`).
        seed: Seed of the dropout masks (the same masks at every evaluation); ``None`` draws from
            and advances torch's global generator, which changes the training's random numbers.
        report: A folder: each evaluation's :class:`~mcdrop.UncertaintyReport` is saved in
            ``<folder>/<prefix>-step-<global_step>``. ``False`` builds no report.
        n_bins: Equal-width confidence bins of the ECE.
        level: Nominal coverage of the regression intervals.
        baseline: With ``report``: the dropout-off pass too (one extra forward pass per batch), in
            the report and as ``{prefix}_deterministic_<name>`` metrics, as for :func:`mc_evaluate`.
        **mc_options: Passed on to :class:`mcdrop.MCDropout`, as for :func:`mc_evaluate`
            (``max_batch_size`` defaults to ``per_device_eval_batch_size``).

    Example:
        >>> import tempfile, torch
        >>> from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
        >>> from mcdrop.integrations.transformers import MCEvaluationCallback
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = BertForSequenceClassification(BertConfig(
        ...     vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        ...     intermediate_size=16, num_labels=3))
        >>> data = [{"input_ids": torch.randint(0, 50, (6,)), "labels": torch.tensor(i % 3)}
        ...         for i in range(12)]
        >>> args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_eval_batch_size=4,
        ...                          report_to=[], use_cpu=True, disable_tqdm=False)
        >>> trainer = Trainer(model=model, args=args, eval_dataset=data,
        ...                   callbacks=[MCEvaluationCallback(n_samples=5)])
        >>> metrics = trainer.evaluate()
        >>> round(metrics["eval_mc_accuracy"], 4) == round(trainer.state.log_history[-1]["eval_mc_accuracy"], 4)
        True
    """

    def __init__(
        self,
        n_samples: int | str = 20,
        *,
        seed: int | None = 0,
        report: bool | str | os.PathLike[str] = False,
        n_bins: int = 15,
        level: float = 0.95,
        baseline: bool = True,
        **mc_options: Any,
    ) -> None:
        self.n_samples = n_samples if n_samples == "auto" else check_int(n_samples, "n_samples", minimum=1)
        self.seed = seed
        if report is True:
            raise InvalidInputError(
                "MCEvaluationCallback(report=...) takes a folder to save each evaluation's report in "
                "(a report per evaluation cannot be returned from a callback); got True."
            )
        self.report = report
        self.n_bins = check_int(n_bins, "n_bins", minimum=1)
        self.level = check_real(level, "level", low=0.0, high=1.0, low_open=True, high_open=True)
        self.mc_options = dict(mc_options)
        self.baseline = check_bool(baseline, "baseline")

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Refuse a distributed run as soon as the trainer is built (``Trainer`` calls it).

        Args:
            args: The trainer's ``TrainingArguments`` (its ``world_size`` is read).
            state: The trainer's ``TrainerState`` (not used).
            control: The trainer's ``TrainerControl`` (not changed).
            **kwargs: What the trainer passes to callbacks (not used).

        Returns:
            ``None``.

        Raises:
            InvalidInputError: The run has several processes, which is not supported.

        Example:
            >>> from mcdrop.integrations.transformers import MCEvaluationCallback
            >>> class Args:
            ...     world_size = 2
            >>> MCEvaluationCallback(n_samples=5).on_init_end(Args(), None, None)  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            mcdrop.errors.InvalidInputError: MC evaluation through the Trainer runs in one process, but ...
        """
        _check_one_process(args)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Refuse a distributed run before any training step, not at its first evaluation.

        A callback added after the trainer was built (``trainer.add_callback``) is not called at
        ``on_init_end``; this catches it before any training time is spent.

        Args:
            args: The trainer's ``TrainingArguments`` (its ``world_size`` is read).
            state: The trainer's ``TrainerState`` (not used).
            control: The trainer's ``TrainerControl`` (not changed).
            **kwargs: What the trainer passes to callbacks (not used).

        Returns:
            ``None``.

        Raises:
            InvalidInputError: The run has several processes, which is not supported.

        Example:
            >>> from mcdrop.integrations.transformers import MCEvaluationCallback
            >>> class Args:
            ...     world_size = 1
            >>> MCEvaluationCallback(n_samples=5).on_train_begin(Args(), None, None) is None
            True
        """
        _check_one_process(args)

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Run the MC dropout evaluation and add its metrics to the evaluation's metrics and logs.

        Args:
            args: The trainer's ``TrainingArguments``.
            state: The trainer's ``TrainerState`` (its ``log_history`` gets the metrics).
            control: The trainer's ``TrainerControl`` (not changed).
            **kwargs: What the trainer passes to callbacks: ``model``, ``eval_dataloader`` and the
                evaluation's ``metrics`` are used.

        Returns:
            ``None`` (``control`` is not changed).

        Raises:
            InvalidInputError: The trainer passed no model, dataloader or metrics, or the run is
                distributed (several processes), which is not supported.

        Example:
            >>> from mcdrop.integrations.transformers import MCEvaluationCallback
            >>> callable(MCEvaluationCallback(n_samples=5).on_evaluate)  # called by the Trainer
            True
        """
        model, loader, metrics = kwargs.get("model"), kwargs.get("eval_dataloader"), kwargs.get("metrics")
        if model is None or loader is None or metrics is None:
            missing = [
                n
                for n, v in (("model", model), ("eval_dataloader", loader), ("metrics", metrics))
                if v is None
            ]
            raise InvalidInputError(
                f"MCEvaluationCallback.on_evaluate needs the trainer's {', '.join(missing)}; it is called "
                "by transformers.Trainer after an evaluation, with these as keyword arguments."
            )
        _check_one_process(args)
        prefix = _prefix_of(metrics)
        label_names = list(args.label_names or _transformers.utils.find_labels(type(model)) or ["labels"])
        report: Any = False
        if self.report:
            report = os.path.join(os.fspath(self.report), f"{prefix}-step-{state.global_step}")
        result = _evaluate_loader(
            model,
            loader,
            label_names=label_names,
            default_max_batch_size=args.per_device_eval_batch_size,
            n_samples=self.n_samples,
            seed=self.seed,
            prefix=prefix,
            report=report,
            n_bins=self.n_bins,
            level=self.level,
            mc_options=self.mc_options,
            baseline=self.baseline,
        )
        mc_metrics = result[0] if isinstance(result, tuple) else result
        runtime_key = f"{prefix}_runtime"
        for entry in reversed(state.log_history):
            if entry.get("step") == state.global_step and entry.get(runtime_key) == metrics.get(runtime_key):
                entry.update(mc_metrics)
                break
        else:
            state.log_history.append({**mc_metrics, "epoch": state.epoch, "step": state.global_step})
        metrics.update(mc_metrics)


def _check_one_process(args: Any) -> None:
    """Refuse a distributed run: each process would evaluate, and report, only its own shard."""
    world_size = int(getattr(args, "world_size", 1) or 1)
    if world_size > 1:
        raise InvalidInputError(
            f"MC evaluation through the Trainer runs in one process, but this run has {world_size} "
            "processes: each would report the metrics of its own shard of the evaluation set only. "
            "Evaluate in one process, or use mcdrop.distributed.predict_loader, which gathers the shards."
        )


def _prefix_of(metrics: Mapping[str, Any]) -> str:
    """The evaluation's ``metric_key_prefix``, from its ``{prefix}_runtime`` speed metric."""
    for key in metrics:
        if key.endswith("_runtime"):
            return key[: -len("_runtime")]
    return "eval"


def _evaluate_loader(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    label_names: Sequence[str],
    default_max_batch_size: int,
    n_samples: int | str,
    seed: int | None,
    prefix: str,
    report: Any,
    n_bins: int,
    level: float,
    mc_options: Mapping[str, Any],
    baseline: bool = True,
) -> dict[str, float] | tuple[dict[str, float], UncertaintyReport]:
    """MC dropout metrics of ``model`` over ``loader``'s dict batches (and the report when asked).

    With a report and ``baseline``, each batch also gets its dropout-off pass: in the report, and
    its metrics as ``{prefix}_deterministic_<name>``.
    """
    deterministic = check_bool(baseline, "baseline") and report is not False and report is not None
    n_bins = check_int(n_bins, "n_bins", minimum=1)
    level = check_real(level, "level", low=0.0, high=1.0, low_open=True, high_open=True)
    if not isinstance(prefix, str):
        raise InvalidTypeError(f"metric_key_prefix must be a string; got {type(prefix).__name__}.")
    if len(label_names) != 1:
        raise InvalidInputError(
            f"MC evaluation reads one label per batch, but the trainer's label names are {list(label_names)} "
            "(e.g. question answering's start and end positions): evaluate such a model with "
            "mcdrop.MCDropout(model).predict_loader(..., unpack=...) and your own metric."
        )
    label_name = label_names[0]
    config = getattr(model, "config", None)
    if getattr(config, "problem_type", None) == "multi_label_classification":
        raise InvalidInputError(
            "the model is a multi-label classifier (config.problem_type='multi_label_classification': "
            "an independent sigmoid per label), but mcdrop reads a classifier's logits through a softmax "
            "over the classes, which would give wrong probabilities and metrics. Multi-label evaluation "
            "is not supported."
        )
    options = {"max_batch_size": default_max_batch_size, **mc_options}
    flags = {name: module.training for name, module in model.named_modules()}
    parts: list[Prediction] = []
    base_parts: list[Prediction] = []
    targets: list[torch.Tensor] = []
    # A seeded evaluation leaves torch's global generators as they were: iterating a DataLoader draws
    # its base seed from them, which would otherwise shift the random numbers of the training after it.
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    fork = contextlib.nullcontext() if seed is None else torch.random.fork_rng(devices=cuda)
    with fork:
        try:
            model.eval()
            mc = MCDropout(model, n_samples, seed=seed, **options)
            for number, batch in enumerate(loader):
                inputs, labels = _split(batch, label_name, number)
                pred = mc.predict(**inputs).cpu()
                part, target = _valid_rows(pred, labels, number)
                if deterministic:  # the extra pass draws no masks: the MC samples are as without it
                    base_part, _ = _valid_rows(mc.predict_deterministic(**inputs).cpu(), labels, number)
                if len(part):
                    parts.append(part)
                    targets.append(target)
                    if deterministic:
                        base_parts.append(base_part)
        finally:
            for name, module in model.named_modules():
                if name in flags:
                    module.train(flags[name])
    if not parts:
        raise InvalidInputError(
            f"every label of the evaluation set is {IGNORE_INDEX} (ignored), or the set is empty: there "
            "is nothing to evaluate."
        )
    prediction = concat_predictions(parts)
    labels = torch.cat(targets, 0)
    values = _metrics(prediction, labels, n_bins=n_bins, level=level)
    result = {f"{prefix}_mc_{name}": float(value) for name, value in values.items()}
    if report is False or report is None:
        return result
    from mcdrop.report import report as build_report

    base_prediction = concat_predictions(base_parts) if deterministic else None
    if base_prediction is not None:
        base_values = _metrics(base_prediction, labels, n_bins=n_bins, level=level, deterministic=True)
        result.update({f"{prefix}_deterministic_{name}": float(v) for name, v in base_values.items()})
    rep = build_report(
        prediction,
        labels,
        model=mc,
        n_bins=n_bins,
        level=level,
        baseline=base_prediction,
        title=f"MC dropout evaluation ({prefix})",
    )
    if report is not True:
        rep.save(report, overwrite=True)
    return result, rep


def _split(batch: Any, label_name: str, number: int) -> tuple[dict[str, Any], torch.Tensor]:
    """A dict batch's model inputs (every key but the labels') and its labels, on the CPU."""
    if not isinstance(batch, Mapping):
        raise InvalidTypeError(
            f"MC evaluation takes batches that are dicts of model inputs (what the Trainer's data "
            f"collators make); batch {number} is a {type(batch).__name__}."
        )
    if label_name not in batch:
        raise InvalidInputError(
            f"batch {number} has no labels under {label_name!r} (keys: {', '.join(map(str, batch))}); "
            "MC evaluation needs the labels. Set TrainingArguments(label_names=[...]) if they are "
            "under another key."
        )
    inputs = {k: v for k, v in batch.items() if k != label_name}
    return inputs, torch.as_tensor(batch[label_name]).detach().cpu()


def _valid_rows(pred: Prediction, labels: torch.Tensor, number: int) -> tuple[Prediction, torch.Tensor]:
    """One row per prediction (tokens flattened), without the rows labelled ``IGNORE_INDEX``."""
    if isinstance(pred, RegressionPrediction):
        if pred.mean.dim() > 2 or (pred.mean.dim() == 2 and pred.mean.shape[1] != 1):
            raise InvalidInputError(
                f"the model makes {tuple(pred.mean.shape[1:])} regression outputs per input; MC evaluation "
                "reports one output per input. Use mcdrop.MCDropout(model).predict_loader and "
                "mcdrop.report(..., output=j) for a multi-output regression."
            )
        n = len(pred)
        labels = labels.reshape(n, -1)
        if labels.shape[1] != 1:
            raise InvalidInputError(
                f"batch {number}: the regression labels have shape {tuple(labels.shape)} for {n} inputs "
                "with one output each."
            )
        fields = {
            f.name: _rows(getattr(pred, f.name), n) for f in dataclasses.fields(pred) if f.name != "samples"
        }
        flat: Prediction = RegressionPrediction(**{**fields, "samples": None})
        labels = labels[:, 0].float()
        return flat, labels
    assert isinstance(pred, ClassificationPrediction)
    probs = pred.probs
    class_dim = pred.class_dim % probs.dim()
    dense_shape = probs.shape[:class_dim] + probs.shape[class_dim + 1 :]
    if tuple(labels.shape) != tuple(dense_shape):
        raise InvalidInputError(
            f"batch {number}: the labels have shape {tuple(labels.shape)}, but the model's predictions "
            f"{tuple(probs.shape)} (classes along dimension {class_dim}) call for labels of shape "
            f"{tuple(dense_shape)}: one class index per {'token' if probs.dim() > 2 else 'input'}."
        )
    if labels.is_floating_point():
        raise InvalidInputError(
            f"batch {number}: the labels are {labels.dtype} values, but the model is a classifier; give "
            "integer class indices (or make the model a regression: config.problem_type='regression')."
        )
    n_classes = probs.shape[class_dim]
    keep = labels.reshape(-1) != IGNORE_INDEX
    values: dict[str, Any] = {}
    for f in dataclasses.fields(pred):
        value = getattr(pred, f.name)
        if f.name == "samples":
            value = None
        elif isinstance(value, torch.Tensor):
            if value.dim() == probs.dim():  # holds the class dimension
                value = value.movedim(class_dim, -1).reshape(-1, n_classes)
            else:  # one value per position, or per input (adaptive sampling's counts): per position
                value = value.reshape(value.shape + (1,) * (len(dense_shape) - value.dim()))
                value = value.expand(dense_shape).reshape(-1)
            value = value[keep]
        values[f.name] = value
    values["class_dim"] = 1
    return ClassificationPrediction(**values), labels.reshape(-1)[keep].long()


def _rows(value: Any, n: int) -> Any:
    """A regression field with one value per input, ``(n,)``."""
    return value.reshape(n) if isinstance(value, torch.Tensor) else value


def _metrics(
    pred: Prediction, labels: torch.Tensor, *, n_bins: int, level: float, deterministic: bool = False
) -> dict[str, float]:
    """The metric values of flattened predictions (one row per prediction) against their labels.

    ``deterministic``: the dropout-off pass, one draw: no mutual information, and for regression
    no standard deviation, so only the metrics of the mean (RMSE, MAE).
    """
    if deterministic:
        if isinstance(pred, RegressionPrediction):
            return {
                "rmse": mcm.rmse(pred.mean, labels),
                "mae": mcm.mae(pred.mean, labels),
                "n_predictions": float(len(labels)),
            }
        values = _metrics(pred, labels, n_bins=n_bins, level=level)
        del values["mutual_information"]
        return values
    if isinstance(pred, ClassificationPrediction):
        probs, entropy = pred.probs, pred.predictive_entropy
        wrong = pred.predicted != labels
        both_kinds = 0 < int(wrong.sum()) < len(wrong)
        return {
            "accuracy": mcm.accuracy(probs, labels),
            "nll": mcm.negative_log_likelihood(probs, labels),
            "brier": mcm.brier_score(probs, labels),
            "ece": mcm.expected_calibration_error(probs, labels, n_bins=n_bins),
            "aurc": mcm.aurc(entropy, wrong),
            "misclassification_auroc": mcm.misclassification_auroc(entropy, wrong)
            if both_kinds
            else math.nan,
            "predictive_entropy": float(entropy.double().mean()),
            "mutual_information": float(pred.mutual_information.double().mean()),
            "n_predictions": float(len(labels)),
        }
    assert isinstance(pred, RegressionPrediction)
    mean, std = pred.mean, pred.total_std
    return {
        "rmse": mcm.rmse(mean, labels),
        "mae": mcm.mae(mean, labels),
        "nll": mcm.gaussian_nll(mean, std, labels),
        "crps": mcm.crps_gaussian(mean, std, labels),
        "picp": mcm.picp(mean, std, labels, level=level),
        "mpiw": mcm.mpiw(std, level=level),
        "std": float(std.double().mean()),
        "n_predictions": float(len(labels)),
    }
