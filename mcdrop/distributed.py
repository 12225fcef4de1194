"""Sharded MC dropout evaluation over ``torch.distributed``: many processes or GPUs, one result.

Every process (rank) evaluates its shard of the data set; the per-input rows are gathered, or the
streaming metric accumulators all-reduced, to rank ``dst`` (or to every rank), and the result is the
one a single process would give for the same inputs:

* **Rows come back in data-set order, once each.** For a ``torch.utils.data.DataLoader`` over a
  map-style data set, every rank records the data-set index of each input it evaluates (from the
  loader's batch sampler, whatever the sampler: :class:`~torch.utils.data.DistributedSampler`, shuffled
  or not, or your own). The rows are put back in index order, and an input evaluated twice, like the
  copies :class:`~torch.utils.data.DistributedSampler` pads uneven shards with, is kept once (the copy
  from the lowest rank). With ``keep="metrics"`` nothing per input is kept, so duplicates are dropped
  where they are known: a ``DistributedSampler``'s padding (its last positions, by construction);
  a custom sampler must then give disjoint shards. Uneven shards and ranks with an empty shard are
  fine. Other iterables (an ``IterableDataset``, a list of batches) carry no indices: their rows come
  back rank after rank.
* **Metrics are exact.** ``keep="metrics"`` all-reduces the integer counts and float64 sums of
  :mod:`mcdrop.metrics.streaming`, so ECE, MCE, Brier score, NLL and accuracy equal those computed from
  the gathered per-input rows of the same samples (to float64 rounding of the summation order), and
  the misclassification AUROC keeps its guaranteed error bound.
* **Seeds.** With ``MCDropout(seed=s)``, rank ``r`` draws its dropout masks from the stream of
  :func:`derive_seed` ``(s, r)``; rank 0's is ``s`` itself, the stream of the single-process wrapper.
  A run is therefore reproducible given the seed and the number of processes K (and the sharding),
  and a run with K = 1 draws exactly what ``mc.predict_loader`` draws. Runs with different K evaluate
  the same inputs with different masks, so their stochastic per-input values agree within Monte Carlo
  error, not bit for bit. Each rank's stream continues across calls, as a single wrapper's does.
  ``seed=None`` draws from each process's global RNG (not reproducible).

Everything also works without an initialised process group, as a world of one process, so the same
script runs with ``python`` and with ``torchrun``. Both ``gloo`` (CPU) and ``nccl`` (CUDA) work: the
tensors travel on the device the backend needs. See ``docs/scale.md`` for the ``torchrun`` recipe.

Example:
    >>> import torch, mcdrop
    >>> from torch.utils.data import TensorDataset
    >>> from mcdrop import distributed
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 3))
    >>> data = TensorDataset(torch.randn(10, 4), torch.randint(0, 3, (10,)))
    >>> mc = mcdrop.MCDropout(net.eval(), n_samples=5, seed=0)
    >>> with distributed.process_group():  # torchrun: initialises from the environment; else nothing
    ...     pred = distributed.predict_loader(mc, distributed.shard_loader(data, batch_size=4), progress=False)
    >>> len(pred), distributed.get_world_size()
    (10, 1)
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mcdrop._checks import check_bool, check_choice, check_int
from mcdrop.errors import InvalidInputError, InvalidTypeError, McdropWarning
from mcdrop.loop import check_loader, collect, stream_metrics
from mcdrop.metrics.streaming import StreamingMetrics
from mcdrop.predictions import ClassificationPrediction, Prediction, RegressionPrediction
from mcdrop.wrapper import MCDropout

__all__ = [
    "derive_seed",
    "gather_predictions",
    "get_rank",
    "get_world_size",
    "predict_loader",
    "process_group",
    "reduce_metrics",
    "shard_loader",
]

_PREDICTION_TYPES: dict[str, type[Prediction]] = {
    "classification": ClassificationPrediction,
    "regression": RegressionPrediction,
}


# ----------------------------------------------------------------------------------------------
# the world
# ----------------------------------------------------------------------------------------------
def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    """Number of processes K in the default process group; 1 when none is initialised.

    Also 1 when ``torch.distributed`` is not available in this build of PyTorch.

    Returns:
        ``torch.distributed.get_world_size()`` when the default process group is initialised,
        else 1.

    Example:
        >>> from mcdrop.distributed import get_world_size
        >>> get_world_size()  # no process group: one process
        1
    """
    return dist.get_world_size() if _initialized() else 1


def get_rank() -> int:
    """This process's rank in the default process group; 0 when none is initialised.

    Also 0 when ``torch.distributed`` is not available in this build of PyTorch.

    Returns:
        ``torch.distributed.get_rank()`` when the default process group is initialised (in
        ``[0, K)``), else 0.

    Example:
        >>> from mcdrop.distributed import get_rank
        >>> get_rank()
        0
    """
    return dist.get_rank() if _initialized() else 0


def derive_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s dropout stream in a run seeded with ``seed``.

    Rank 0 keeps ``seed`` (so a one-process run draws what ``MCDropout(seed=seed)`` draws); rank
    ``r > 0`` gets ``numpy.random.SeedSequence([seed, r])``'s first 63-bit word, a well-mixed seed
    that differs from every other rank's and from every other base seed's. It does not depend on the
    number of processes: adding processes leaves the existing ranks' streams unchanged.

    Args:
        seed: The wrapper's seed (a non-negative integer).
        rank: The process's rank (non-negative).

    Returns:
        ``seed`` itself for rank 0; a seed in ``[0, 2**63)`` for the other ranks.

    Example:
        >>> from mcdrop.distributed import derive_seed
        >>> derive_seed(7, 0)
        7
        >>> derive_seed(7, 1) == derive_seed(7, 1) != derive_seed(7, 2)
        True
    """
    seed = check_int(seed, "seed", minimum=0, maximum=2**64 - 1)
    rank = check_int(rank, "rank", minimum=0)
    if rank == 0:
        return seed
    word = np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint64)[0]
    return int(word >> np.uint64(1))


@contextlib.contextmanager
def process_group(backend: str | None = None, *, device: str | torch.device | None = None) -> Iterator[int]:
    """Initialise the default process group from ``torchrun``'s environment, and tear it down after.

    Under ``torchrun`` (``WORLD_SIZE > 1`` in the environment) the group is initialised with
    ``init_method="env://"``: ``backend`` if given, else ``nccl`` when ``device`` is a CUDA device (or
    ``device`` is ``None`` and CUDA is available) and ``gloo`` otherwise. With ``nccl`` the process's
    GPU is set to ``cuda:LOCAL_RANK``. The group is destroyed on exit, also after an exception. If a
    group is already initialised it is used and left alone; without ``torchrun`` nothing happens
    (a world of one process).

    Args:
        backend: ``"gloo"``, ``"nccl"`` or ``None`` (choose as above).
        device: Where the model runs (e.g. ``"cpu"``, ``"cuda"``), to choose the backend.

    Yields:
        The world size K.

    Example:
        >>> from mcdrop.distributed import process_group
        >>> with process_group() as world_size:  # not under torchrun: nothing to initialise
        ...     world_size
        1
    """
    if _initialized():
        yield dist.get_world_size()
        return
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        yield 1  # one process needs no group
        return
    dev = None if device is None else torch.device(device)
    if backend is None:
        wants_cuda = dev.type == "cuda" if dev is not None else torch.cuda.is_available()
        backend = "nccl" if wants_cuda and dist.is_nccl_available() else "gloo"
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method="env://")
    try:
        yield dist.get_world_size()
    finally:
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    """The device collectives run on: the current GPU for nccl, else the CPU."""
    if _initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_dst(dst: int | None, world: int) -> None:
    if dst is not None:
        check_int(dst, "dst", minimum=0, maximum=world - 1)


def _all_gather_object(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------------
# loaders
# ----------------------------------------------------------------------------------------------
def shard_loader(
    dataset: Any,
    batch_size: int = 256,
    *,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    **loader_kwargs: Any,
) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` over this rank's shard of ``dataset``, via ``DistributedSampler``.

    Without an initialised process group it covers the whole data set (one process).

    Args:
        dataset: A map-style data set (``__getitem__`` and ``__len__``).
        batch_size: Inputs per batch (default 256).
        shuffle: Let ``DistributedSampler`` shuffle before sharding (the result is put back in
            data-set order anyway).
        seed: ``DistributedSampler``'s shuffling seed.
        drop_last: Let ``DistributedSampler`` drop the tail instead of padding (those inputs are then
            not evaluated); by default it pads, and the copies are dropped again.
        **loader_kwargs: Passed to ``DataLoader`` (``num_workers``, ``pin_memory``, ``collate_fn``, ...).

    Returns:
        The ``DataLoader``.

    Raises:
        InvalidTypeError: ``dataset`` is not map-style (an ``IterableDataset``, or an object without
            ``__getitem__`` and ``__len__``), or an argument of the wrong type.
        InvalidInputError: ``batch_size`` below 1, or a negative ``seed``.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from mcdrop.distributed import shard_loader
        >>> loader = shard_loader(TensorDataset(torch.arange(10.0)), batch_size=4)
        >>> [len(batch[0]) for batch in loader]
        [4, 4, 2]
    """
    from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

    if isinstance(dataset, IterableDataset) or not (
        hasattr(type(dataset), "__getitem__") and hasattr(type(dataset), "__len__")
    ):
        raise InvalidTypeError(
            "dataset must be a map-style data set (with __getitem__ and __len__, e.g. a TensorDataset) "
            f"for DistributedSampler to shard; got {type(dataset).__name__}. An iterable data set (or "
            "a loader) cannot be sharded by index: give each rank its own part and pass a loader over "
            "it to predict_loader."
        )
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    seed = check_int(seed, "seed", minimum=0)
    check_bool(shuffle, "shuffle")
    check_bool(drop_last, "drop_last")
    sampler = DistributedSampler(
        dataset,
        num_replicas=get_world_size(),
        rank=get_rank(),
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
    )
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, **loader_kwargs)


class _IndexRecorder:
    """A batch sampler that notes the data-set indices of every batch it hands to the loader.

    The loader returns batches in the order its batch sampler yields them (``in_order=True``), so the
    notes are consumed first in, first out, one per batch. For a ``DistributedSampler`` that pads,
    each note also marks which inputs are padding: the sampler's ``k``-th index on rank ``r`` sits at
    position ``r + k·K`` of the padded list, and positions from ``len(dataset)`` on are copies.
    """

    def __init__(self, batch_sampler: Any, padding: tuple[int, int, int] | None) -> None:
        self.batch_sampler = batch_sampler
        self.padding = padding
        self.notes: collections.deque[tuple[torch.Tensor, torch.Tensor | None]] = collections.deque()
        self.position = 0
        self.rows = 0

    def __iter__(self) -> Iterator[Any]:
        self.notes.clear()
        self.position = 0
        for batch in self.batch_sampler:
            index = torch.as_tensor([int(i) for i in batch], dtype=torch.int64)
            keep = None
            if self.padding is not None:
                rank, replicas, n = self.padding
                positions = torch.arange(self.position, self.position + len(index))
                keep = rank + positions * replicas < n
            self.position += len(index)
            self.notes.append((index, keep))
            yield batch

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def pop(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.notes:
            raise InvalidInputError(
                "the loader returned a batch its batch sampler had not handed out; with in_order=False "
                "or a custom loader iterator the data-set indices cannot be followed."
            )
        index, keep = self.notes.popleft()
        self.rows += int(len(index) if keep is None else keep.sum())
        return index, keep


def _recording_loader(
    loader: Iterable[Any], world: int, rank: int
) -> tuple[Iterable[Any], _IndexRecorder | None]:
    """The same loader with an :class:`_IndexRecorder` as batch sampler (map-style DataLoaders)."""
    from torch.utils.data import (
        BatchSampler,
        DataLoader,
        DistributedSampler,
        IterableDataset,
        RandomSampler,
        SequentialSampler,
    )

    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return loader, None
    if loader.batch_sampler is None:  # batch_size=None: the loader yields single inputs
        return loader, None
    if not getattr(loader, "in_order", True):
        raise InvalidInputError(
            "the loader was built with in_order=False, so its batches cannot be matched to their data-set "
            "indices; build it with in_order=True (the default)."
        )
    batch_sampler = loader.batch_sampler
    inner = batch_sampler.sampler if type(batch_sampler) is BatchSampler else None
    padding = None
    if isinstance(inner, DistributedSampler):
        if inner.num_replicas != world or inner.rank != rank:
            raise InvalidInputError(
                f"the loader's DistributedSampler was built for rank {inner.rank} of {inner.num_replicas}, "
                f"but this process is rank {rank} of {world}; build it after the process group is "
                "initialised (or use mcdrop.distributed.shard_loader)."
            )
        n = len(inner.dataset)  # type: ignore[arg-type]
        if not inner.drop_last:
            padding = (inner.rank, inner.num_replicas, n)
        elif inner.total_size < n and rank == 0:
            warnings.warn(
                f"the DistributedSampler has drop_last=True: the last {n - inner.total_size} of {n} inputs "
                "are not evaluated. Use drop_last=False (the padding copies are dropped again).",
                McdropWarning,
                stacklevel=3,
            )
    elif world > 1 and type(inner) in (SequentialSampler, RandomSampler):
        raise InvalidInputError(
            f"the loader is not sharded: with a {type(inner).__name__} each of the {world} processes "
            "would evaluate the whole data set. Give it sampler=DistributedSampler(dataset) or use "
            "mcdrop.distributed.shard_loader(dataset, batch_size)."
        )
    recorder = _IndexRecorder(batch_sampler, padding)
    kwargs: dict[str, Any] = {
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "generator": loader.generator,
        "persistent_workers": loader.persistent_workers,
        "pin_memory_device": loader.pin_memory_device,
    }
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    return DataLoader(loader.dataset, batch_sampler=recorder, **kwargs), recorder


#: Each wrapper's per-rank wrappers (rank > 0 of a seeded wrapper): the same options with the rank's
#: seed (:func:`derive_seed`), kept so that every rank's stream continues across calls.
_RANK_WRAPPERS: weakref.WeakKeyDictionary[MCDropout, dict[int, MCDropout]] = weakref.WeakKeyDictionary()


def _rank_wrapper(mc: MCDropout, rank: int) -> MCDropout:
    """The wrapper whose RNG stream rank ``rank`` draws from (``mc`` itself on rank 0 or unseeded)."""
    if rank == 0 or mc.options.seed is None:
        return mc
    workers = _RANK_WRAPPERS.setdefault(mc, {})
    if rank not in workers:
        options = mc.options.replace(seed=derive_seed(mc.options.seed, rank))
        with warnings.catch_warnings():  # the same model and options: mc has warned already
            warnings.simplefilter("ignore", McdropWarning)
            workers[rank] = MCDropout(mc.model, **options.as_kwargs())
    return workers[rank]


def _rank_checkpoint(checkpoint: str | os.PathLike[str] | None, rank: int, world: int) -> str | None:
    if checkpoint is None:
        return None
    text = os.fspath(checkpoint)
    if "{rank}" in text:
        return text.format(rank=rank, world_size=world)
    if world == 1:
        return text
    root, ext = os.path.splitext(text)
    return f"{root}.rank{rank}-of-{world}{ext}"


# ----------------------------------------------------------------------------------------------
# collectives
# ----------------------------------------------------------------------------------------------
def _metrics_header(metrics: StreamingMetrics | None, rows: int | None) -> dict[str, Any]:
    if metrics is None:
        return {"rows": rows}
    return {
        "rows": rows,
        "kind": metrics.task,
        "config": metrics.config(),
        "metadata": metrics.metadata(),
        "n_samples": metrics.n_samples,
    }


def _reduce(
    metrics: StreamingMetrics | None, dst: int | None, rows: int | None = None
) -> tuple[StreamingMetrics | None, bool, int | None]:
    """(the reduced accumulator on the receivers or None, whether any rank had one, total rows).

    ``rows`` is this rank's count of evaluated inputs when known; the total is ``None`` unless every
    rank knew its count.
    """
    world, rank = get_world_size(), get_rank()
    headers = _all_gather_object(_metrics_header(metrics, rows), world)
    counted = [h["rows"] for h in headers]
    total_rows = None if any(c is None for c in counted) else sum(counted)
    present = [h for h in headers if "kind" in h]
    if not present:
        return None, False, total_rows
    first = present[0]
    for h in present[1:]:
        if h["kind"] != first["kind"] or h["config"] != first["config"]:
            raise InvalidInputError(
                f"the ranks accumulated different kinds of metrics ({first['kind']} {first['config']} and "
                f"{h['kind']} {h['config']}); every rank must evaluate the same model with the same options."
            )
    result = StreamingMetrics.from_config(first["kind"], first["config"])
    for h in present:
        result.merge_metadata(h["metadata"])
        if result.n_samples is None:
            result.n_samples = h["n_samples"]
    if world == 1:
        assert metrics is not None
        result.merge(metrics)
        return result, True, total_rows
    local = metrics if metrics is not None else result
    device = _comm_device()
    ops = {"sum": dist.ReduceOp.SUM}
    # one flat buffer per (reduce operation, dtype) of the declared statistics, in declaration order
    groups: dict[tuple[str, torch.dtype], list[torch.Tensor]] = {}
    for state in local.states().values():
        groups.setdefault((state.reduce, state.tensor.dtype), []).append(state.tensor.reshape(-1))
    flats = {key: torch.cat(parts).to(device) for key, parts in groups.items()}
    for (reduce, _), flat in flats.items():
        if dst is None:
            dist.all_reduce(flat, op=ops[reduce])
        else:
            dist.reduce(flat, dst=dst, op=ops[reduce])
    if dst is not None and rank != dst:
        return None, True, total_rows
    offsets = dict.fromkeys(flats, 0)
    for state in result.states().values():
        key = (state.reduce, state.tensor.dtype)
        start, target = offsets[key], state.tensor
        target.copy_(flats[key][start : start + target.numel()].reshape(target.shape).cpu())
        offsets[key] = start + target.numel()
    return result, True, total_rows


def reduce_metrics(metrics: StreamingMetrics | None, *, dst: int | None = 0) -> StreamingMetrics | None:
    """Sum every rank's streaming accumulator into one (``all_reduce``, or ``reduce`` to ``dst``).

    For your own evaluation loop: accumulate this rank's inputs, then call this on every rank. A rank
    that saw no input passes ``None``. The input accumulators are not modified.

    Args:
        metrics: This rank's accumulator, or ``None`` for an empty shard.
        dst: The rank that gets the result (default 0); ``None`` gives it to every rank.

    Returns:
        The accumulator of all ranks' inputs on the receiving rank(s); ``None`` elsewhere, and on
        every rank when no rank had an accumulator.

    Raises:
        InvalidInputError: Ranks with accumulators of different kinds or configurations, or ``dst``
            out of range.

    Example:
        >>> import torch
        >>> from mcdrop.distributed import reduce_metrics
        >>> from mcdrop.metrics.streaming import StreamingClassificationMetrics
        >>> acc = StreamingClassificationMetrics()
        >>> acc.update(torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([0, 0]))
        >>> reduce_metrics(acc).summary()["accuracy"]  # one process: the same numbers
        0.5
    """
    _check_dst(dst, get_world_size())
    if metrics is not None and not isinstance(metrics, StreamingMetrics):
        raise InvalidTypeError(
            f"metrics must be a StreamingMetrics accumulator or None; got {type(metrics).__name__}."
        )
    return _reduce(metrics, dst)[0]


def _tensor_fields(pred: Prediction) -> dict[str, torch.Tensor]:
    """The per-input tensors of a prediction, batch first."""
    out = {}
    for f in dataclasses.fields(pred):
        value = getattr(pred, f.name)
        if isinstance(value, torch.Tensor):
            out[f.name] = value.movedim(1, 0) if f.name == "samples" else value
    return out


def _prediction_header(pred: Prediction | None, indices: torch.Tensor | None) -> dict[str, Any] | None:
    if pred is None:
        return None
    tensors = _tensor_fields(pred)
    return {
        "task": pred.task,
        "static": {
            f.name: getattr(pred, f.name)
            for f in dataclasses.fields(pred)
            if not isinstance(getattr(pred, f.name), torch.Tensor) and getattr(pred, f.name) is not None
        },
        "fields": {
            name: (tuple(t.shape[1:]), str(t.dtype).removeprefix("torch.")) for name, t in tensors.items()
        },
        "rows": len(pred),
        "indexed": indices is not None,
    }


def _select(tensors: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: t[rows] for name, t in tensors.items()}


def _order_and_dedupe(
    tensors: dict[str, torch.Tensor], indices: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Rows in increasing data-set index, each index once (its first occurrence: the lowest rank)."""
    order = torch.argsort(indices, stable=True)
    ordered = indices[order]
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    rows = order[first]
    return _select(tensors, rows), indices[rows]


def _build(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Prediction:
    values: dict[str, Any] = dict(header["static"])
    for name, t in tensors.items():
        values[name] = t.movedim(0, 1) if name == "samples" else t
    return _PREDICTION_TYPES[header["task"]](**values)


def _gather(
    pred: Prediction | None, indices: torch.Tensor | None, dst: int | None
) -> tuple[Prediction | None, torch.Tensor | None, bool]:
    """(gathered prediction or None, its indices or None, whether any rank had rows)."""
    world, rank = get_world_size(), get_rank()
    if pred is not None and indices is not None and indices.shape != (len(pred),):
        raise InvalidInputError(
            f"indices must hold one data-set index per input, shape ({len(pred)},); got {tuple(indices.shape)}."
        )
    headers = _all_gather_object(_prediction_header(pred, indices), world)
    present = [h for h in headers if h is not None and h["rows"] > 0]
    if not present:
        return None, None, False
    first = present[0]

    def static(h: dict[str, Any]) -> dict[str, Any]:
        # adaptive sampling (max_samples set): each rank's largest N differs, samples_per_input says all
        adaptive = h["static"].get("max_samples") is not None
        return {k: v for k, v in h["static"].items() if not (adaptive and k == "n_samples")}

    for h in present[1:]:
        if h["task"] != first["task"] or static(h) != static(first) or h["fields"] != first["fields"]:
            raise InvalidInputError(
                "the ranks' predictions differ in task, number of samples, fields or per-input shapes "
                f"({first['task']}, {first['static']}, {first['fields']} and {h['task']}, {h['static']}, "
                f"{h['fields']}); every rank must run the same wrapper, and every batch must carry targets "
                "or none."
            )
        if h["indexed"] != first["indexed"]:
            raise InvalidInputError(
                "some ranks gave data-set indices and others did not; give them on every rank."
            )
    indexed = first["indexed"]
    counts = [0 if h is None else h["rows"] for h in headers]
    receiver = dst is None or rank == dst
    device = _comm_device() if world > 1 else torch.device("cpu")
    local = {} if pred is None or len(pred) == 0 else _tensor_fields(pred.cpu())
    if indexed and pred is not None and len(pred) > 0:
        assert indices is not None
        local["__index__"] = indices.to(torch.int64).cpu()
    specs = dict(first["fields"])
    if indexed:
        specs["__index__"] = ((), "int64")
    gathered: dict[str, torch.Tensor] = {}
    max_rows = max(counts)
    for name in sorted(specs):
        shape, dtype_name = specs[name]
        dtype = getattr(torch, dtype_name)
        if world == 1:
            gathered[name] = local[name]
            continue
        buffer = torch.zeros((max_rows, *shape), dtype=dtype, device=device)
        if name in local:
            buffer[: counts[rank]] = local[name].to(device)
        parts: list[torch.Tensor] | None = (
            [torch.empty_like(buffer) for _ in range(world)] if receiver else None
        )
        if dst is None:
            assert parts is not None
            dist.all_gather(parts, buffer)
        else:
            dist.gather(buffer, parts, dst=dst)
        if parts is not None:
            gathered[name] = torch.cat([p[:c].cpu() for p, c in zip(parts, counts, strict=True)])
        del buffer
    if not receiver:
        return None, None, True
    out_index = None
    if indexed:
        out_index = gathered.pop("__index__")
        gathered, out_index = _order_and_dedupe(gathered, out_index)
    if first["static"].get("max_samples") is not None:  # adaptive: the largest N of any rank
        first = {
            **first,
            "static": {**first["static"], "n_samples": max(h["static"]["n_samples"] for h in present)},
        }
    return _build(first, gathered), out_index, True


def gather_predictions(
    pred: Prediction | None, indices: torch.Tensor | None = None, *, dst: int | None = 0
) -> Prediction | None:
    """Gather every rank's per-input predictions into one, in data-set order.

    For your own evaluation loop: call on every rank with this rank's prediction (``targets`` set or
    not, the same on every rank) and, optionally, the data-set index of each of its inputs. With
    indices the rows come back sorted by index and an index evaluated more than once (e.g. a
    ``DistributedSampler``'s padding) is kept once, from the lowest rank; without, rank after rank.
    Tensors travel in their own dtype (float32 statistics), batch first, padded to the longest
    shard; raw ``samples`` are gathered only when the wrapper kept them.

    Args:
        pred: This rank's prediction, or ``None`` for an empty shard.
        indices: ``(len(pred),)`` integer data-set indices of its inputs, or ``None`` on every rank.
        dst: The rank that gets the result (default 0); ``None`` gives it to every rank.

    Returns:
        The gathered prediction on the receiving rank(s), ``None`` elsewhere.

    Raises:
        InvalidInputError: No rank had a prediction; predictions of different tasks, numbers of
            samples or shapes; indices on some ranks only or of the wrong length; ``dst`` out of range.

    Example:
        >>> import torch, mcdrop
        >>> from mcdrop.distributed import gather_predictions
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3))
        >>> pred = mcdrop.MCDropout(net.eval(), n_samples=4, seed=0).predict(torch.randn(3, 2))
        >>> out = gather_predictions(pred, torch.tensor([2, 0, 1]))  # one process: reordered by index
        >>> torch.equal(out.probs, pred.probs[[1, 2, 0]])
        True
    """
    _check_dst(dst, get_world_size())
    if pred is not None and not isinstance(pred, Prediction):
        raise InvalidTypeError(f"pred must be a Prediction or None; got {type(pred).__name__}.")
    if indices is not None:
        indices = torch.as_tensor(indices)
    result, _, any_rows = _gather(pred, indices, dst)
    if not any_rows:
        raise InvalidInputError("no rank had any prediction to gather: every shard was empty.")
    return result


# ----------------------------------------------------------------------------------------------
# the evaluation
# ----------------------------------------------------------------------------------------------
def _collect(
    mc: MCDropout,
    loader: Iterable[Any],
    recorder: _IndexRecorder | None,
    unpack: Callable[[Any], tuple[Any, Any]] | None,
    progress: bool,
    deterministic: bool = False,
) -> tuple[Prediction | None, torch.Tensor | None]:
    """This rank's prediction (on the CPU, padding copies dropped) and its data-set indices.

    With ``deterministic`` each batch also gets its dropout-off pass, in the prediction's
    ``deterministic`` (the same rows kept).
    """
    indices: list[torch.Tensor] = []

    def rows_to_keep(rows: int | None) -> torch.Tensor | None:
        if recorder is None:
            return None
        index, keep = recorder.pop()
        if index.shape[0] != rows:
            raise InvalidInputError(
                f"a batch of {rows} inputs came with {index.shape[0]} data-set indices; the "
                "loader's collate_fn must keep one row per index."
            )
        indices.append(index if keep is None else index[keep])
        return keep

    pred = collect(
        mc, loader, unpack=unpack, progress=progress, row_filter=rows_to_keep, deterministic=deterministic
    )
    if pred is None:
        return None, None
    return pred, (torch.cat(indices) if recorder is not None else None)


def predict_loader(
    mc: MCDropout,
    loader: Iterable[Any],
    *,
    dst: int | None = 0,
    keep: str = "predictions",
    unpack: Callable[[Any], tuple[Any, Any]] | None = None,
    progress: bool = True,
    metrics: StreamingMetrics | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 100,
    return_indices: bool = False,
    deterministic: bool = False,
) -> Any:
    """:meth:`MCDropout.predict_loader <mcdrop.MCDropout.predict_loader>` over every rank's shard, one result.

    Call it on every rank with that rank's loader (e.g. :func:`shard_loader`, or a ``DataLoader`` with
    a ``DistributedSampler``). See the module docstring for the ordering, deduplication and seeding
    rules. Without a process group it is the one-process evaluation of ``loader``.

    Args:
        mc: The wrapper (the same settings and seed on every rank).
        loader: This rank's batches (see :meth:`MCDropout.predict_loader <mcdrop.MCDropout.predict_loader>`
            for batch layouts).
        dst: The rank that gets the result (default 0); ``None`` gives it to every rank.
        keep: ``"predictions"``: gather the per-input rows. ``"metrics"``: all-reduce the streaming
            accumulators (memory O(bins) on every rank; needs targets).
        unpack: ``unpack(batch) -> (inputs, targets)`` for other batch layouts.
        progress: Show a progress bar (on rank 0 only).
        metrics: ``keep="metrics"`` with a configured accumulator, e.g.
            ``StreamingClassificationMetrics(n_bins=20)``; every rank accumulates into its own.
        checkpoint: ``keep="metrics"``: checkpoint file for resuming (see
            :meth:`MCDropout.predict_loader <mcdrop.MCDropout.predict_loader>`). Each rank writes its
            own: ``{rank}`` in the path is replaced by the rank, otherwise ``.rank{r}-of-{K}`` is added
            before the suffix when K > 1. Resume with the same K.
        checkpoint_every: Batches between two checkpoints.
        return_indices: ``keep="predictions"``: also return the data-set index of every row (``None``
            when the loader carries no indices).
        deterministic: ``keep="predictions"``: every rank also makes one pass per batch with dropout
            off (:meth:`MCDropout.predict_deterministic <mcdrop.MCDropout.predict_deterministic>`,
            one extra forward pass per batch), gathered like the MC rows (same order, padding
            copies dropped) into the result's ``deterministic`` field, with the same targets: the
            baseline :func:`mcdrop.report` compares MC dropout with.

    Returns:
        On the receiving rank(s): a :class:`~mcdrop.Prediction` in data-set order (with
        ``return_indices``, a pair ``(prediction, indices)``) or a
        :class:`~mcdrop.metrics.streaming.StreamingMetrics`; ``None`` on the other ranks.

    Raises:
        InvalidInputError: Every shard empty, a loader that is not sharded (a plain sampler under
            K > 1) or sharded for another world, mismatched ranks, ``deterministic=True`` with
            ``keep="metrics"``, or the errors of
            :meth:`MCDropout.predict_loader <mcdrop.MCDropout.predict_loader>`.

    Example:
        >>> import torch, mcdrop
        >>> from torch.utils.data import TensorDataset
        >>> from mcdrop import distributed
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 3))
        >>> data = TensorDataset(torch.randn(50, 4), torch.randint(0, 3, (50,)))
        >>> loader = distributed.shard_loader(data, batch_size=16)
        >>> mc = mcdrop.MCDropout(net.eval(), n_samples=8, seed=0)
        >>> stream = distributed.predict_loader(mc, loader, keep="metrics", progress=False)
        >>> sorted(stream.summary())[:4]
        ['Brier', 'ECE', 'MCE', 'NLL']
    """
    if not isinstance(mc, MCDropout):
        raise InvalidTypeError(f"mc must be an mcdrop.MCDropout; got {type(mc).__name__}.")
    check_loader(loader)
    keep = check_choice(keep, ("predictions", "metrics"), "keep")
    if metrics is not None:
        keep = "metrics"
    if check_bool(deterministic, "deterministic") and keep == "metrics":
        raise InvalidInputError(
            "deterministic=True needs keep='predictions': the streaming accumulators of "
            "keep='metrics' hold the metrics of the MC predictions only. Predict with "
            "keep='predictions' (pred.deterministic is then the dropout-off baseline)."
        )
    if keep == "predictions" and checkpoint is not None:
        raise InvalidInputError(
            "checkpoint= needs keep='metrics': a checkpoint holds the streaming accumulators, not "
            "per-input predictions."
        )
    world, rank = get_world_size(), get_rank()
    _check_dst(dst, world)
    rank_mc = _rank_wrapper(mc, rank)
    loader, recorder = _recording_loader(loader, world, rank)
    show = progress and rank == 0
    if keep == "metrics":
        local = stream_metrics(
            rank_mc,
            loader,
            unpack=unpack,
            progress=show,
            metrics=metrics,
            checkpoint=_rank_checkpoint(checkpoint, rank, world),
            checkpoint_every=checkpoint_every,
            row_filter=None if recorder is None else (lambda rows: recorder.pop()[1]),
            fingerprint={"rank": rank, "world_size": world},
        )
    else:
        pred, indices = _collect(rank_mc, loader, recorder, unpack, show, deterministic)
    if keep == "metrics":
        result, any_rows, total_rows = _reduce(local, dst, None if recorder is None else recorder.rows)
        if not any_rows:
            raise InvalidInputError("no rank evaluated any input: every shard of the loader was empty.")
        if result is not None:
            _check_coverage(recorder, total_rows)
        return result
    baseline = None
    if pred is not None and pred.deterministic is not None:  # gathered on its own, in the same order
        baseline, pred.deterministic = pred.deterministic, None
    gathered, out_index, any_rows = _gather(pred, indices, dst)
    if not any_rows:
        raise InvalidInputError("no rank evaluated any input: every shard of the loader was empty.")
    if deterministic:  # every rank takes part (each decided alike, from the same argument)
        base_gathered = _gather(baseline, indices, dst)[0]
        if gathered is not None and base_gathered is not None:
            base_gathered.targets = gathered.targets
            gathered.deterministic = base_gathered
    if return_indices and gathered is not None:
        return gathered, out_index
    return gathered


def _check_coverage(recorder: _IndexRecorder | None, total_rows: int | None) -> None:
    """Warn when more inputs were counted than the data set has (shards that overlap)."""
    sampler = getattr(recorder.batch_sampler, "sampler", None) if recorder is not None else None
    dataset = getattr(sampler, "dataset", None)
    if dataset is None:
        dataset = getattr(sampler, "data_source", None)
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        return
    if total_rows is not None and total_rows > n:
        warnings.warn(
            f"{total_rows} inputs were counted for a data set of {n}: the shards overlap, so some inputs "
            "count more than once in the metrics. Shard with DistributedSampler (its padding is "
            "recognised), or use keep='predictions', which drops duplicates by index.",
            McdropWarning,
            stacklevel=3,
        )
