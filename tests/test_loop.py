"""Tests for mcdrop/loop.py: a loader's predictions batch by batch, row filters, unpacking batches."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from zoo import mlp

import mcdrop
from mcdrop import loop
from mcdrop.errors import InvalidInputError, InvalidTypeError

DATA = TensorDataset(
    torch.randn(10, 5, generator=torch.Generator().manual_seed(0)),
    torch.randint(0, 4, (10,), generator=torch.Generator().manual_seed(1)),
)


def wrapper() -> mcdrop.MCDropout:
    return mcdrop.MCDropout(mlp(), n_samples=6, seed=0)


def test_iter_predictions_reads_skipped_batches_without_evaluating_them():
    loader = DataLoader(DATA, batch_size=4)
    out = list(loop.iter_predictions(wrapper(), loader, unpack=None, progress=False, skip=2))
    assert [p is None for p, _ in out] == [True, True, False]
    assert [len(t) for _, t in out] == [4, 4, 2]  # every batch's targets, skipped or not


def test_collect_with_a_row_filter_keeps_those_rows_on_the_cpu():
    loader = DataLoader(DATA, batch_size=4)
    everything = loop.collect(wrapper(), loader, unpack=None, progress=False)
    seen = []

    def odd_rows(rows):
        seen.append(rows)
        return torch.arange(rows) % 2 == 1

    odd = loop.collect(wrapper(), loader, unpack=None, progress=False, row_filter=odd_rows)
    assert seen == [4, 4, 2]
    keep = torch.tensor([i % 2 == 1 for i in (0, 1, 2, 3, 0, 1, 2, 3, 0, 1)])
    assert torch.equal(odd.probs, everything.probs[keep])  # the same draws: the same seed and batches
    assert torch.equal(odd.targets, DATA.tensors[1][keep])
    assert odd.probs.device.type == "cpu"
    nothing = loop.collect(
        wrapper(), loader, unpack=None, progress=False, row_filter=lambda r: torch.zeros(r, dtype=torch.bool)
    )
    assert nothing is None


def test_select_rows_selects_samples_along_their_batch_dimension():
    mc = mcdrop.MCDropout(mlp(), n_samples=3, seed=0, keep_samples=True)
    pred = mc.predict(DATA.tensors[0])
    part = loop.select_rows(pred, torch.tensor([0, 3]))
    assert torch.equal(part.probs, pred.probs[[0, 3]]) and torch.equal(part.samples, pred.samples[:, [0, 3]])


def test_default_unpack_reads_the_usual_batch_layouts():
    x, y = torch.ones(2, 5), torch.zeros(2)
    assert loop.default_unpack(x) == (x, None)
    assert loop.default_unpack((x, y)) == (x, y)
    assert loop.default_unpack([x]) == (x, None)
    inputs, target = loop.default_unpack({"input_ids": x, "labels": y})
    assert set(inputs) == {"input_ids"} and target is y
    with pytest.raises(InvalidInputError, match="empty batch"):
        loop.default_unpack(())
    with pytest.raises(InvalidTypeError, match="unpack="):
        loop.default_unpack("text")


def test_checkpoint_fingerprint_names_the_model_options_and_sampled_sites():
    fingerprint = loop.checkpoint_fingerprint(wrapper())
    assert fingerprint["model"] == "Sequential" and fingerprint["n_samples"] == 6
    assert fingerprint["sampled_sites"] == ["2:dropout:0.5"]
