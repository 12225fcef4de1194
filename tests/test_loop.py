"""Tests for mcdrop/loop.py: a loader's predictions batch by batch, row filters, unpacking batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn
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


class MaskedMean(nn.Module):
    """Token ids and an optional attention mask (as Hugging Face models take them) -> 3 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask=None):
        h = self.drop(self.embed(input_ids))
        if attention_mask is None:
            return self.head(h.mean(1))
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * mask).sum(1) / mask.sum(1).clamp(min=1))


def test_a_tuple_batch_of_more_than_two_elements_is_never_split_silently():
    """Issue 18, item 7: (input_ids, attention_mask, labels) called the model without the mask and
    kept the mask as the targets."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 20, (10, 6), generator=gen)
    mask = (torch.arange(6) < torch.randint(2, 7, (10, 1), generator=gen)).long()
    labels = torch.randint(0, 3, (10,), generator=gen)
    loader = DataLoader(TensorDataset(ids, mask, labels), batch_size=4)
    torch.manual_seed(0)
    model = MaskedMean().eval()
    with pytest.raises(
        InvalidInputError,
        match=r"3 elements.*unpack=lambda batch: \(\(batch\[0\], batch\[1\]\), batch\[2\]\)",
    ):
        mcdrop.MCDropout(model, n_samples=4, seed=0).predict_loader(loader, progress=False)
    with pytest.raises(InvalidInputError, match="unpack="):
        loop.default_unpack([ids, mask, labels])
    pred = mcdrop.MCDropout(model, n_samples=4, seed=0).predict_loader(
        loader, unpack=lambda batch: ((batch[0], batch[1]), batch[2]), progress=False
    )
    mc = mcdrop.MCDropout(model, n_samples=4, seed=0)
    expected = torch.cat([mc.predict(ids[i : i + 4], mask[i : i + 4]).probs for i in range(0, 10, 4)])
    assert torch.equal(pred.probs, expected) and torch.equal(pred.targets, labels)


def test_task_auto_reading_classes_where_the_targets_are_real_values_is_refused():
    """Issue 18, item 6c: a 24-step forecaster's (batch, 24) output read as 24 classes, found by the
    loader's targets (real values of the output's shape)."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 5, generator=gen), 3 * torch.randn(8, 24, generator=gen)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    forecaster = mlp(5, 24)
    with pytest.raises(InvalidInputError, match=r"as 24 classes.*task='regression'"):
        mcdrop.MCDropout(forecaster, n_samples=3, seed=0).predict_loader(loader, progress=False)
    with pytest.raises(InvalidInputError, match="task='regression'"):
        mcdrop.MCDropout(forecaster, n_samples=3, seed=0).predict_loader(
            loader, progress=False, keep="metrics"
        )
    pred = mcdrop.MCDropout(forecaster, n_samples=3, seed=0, task="regression").predict_loader(
        loader, progress=False
    )
    assert pred.task == "regression" and torch.equal(pred.targets, y)
    # one-hot or soft labels of a classifier are not real values: read as classes, as before
    soft = torch.softmax(torch.randn(8, 24, generator=gen), -1)
    loader = DataLoader(TensorDataset(x, soft), batch_size=4)
    assert (
        mcdrop.MCDropout(forecaster, n_samples=3, seed=0).predict_loader(loader, progress=False).n_classes
        == 24
    )


def test_checkpoint_fingerprint_names_the_model_options_and_sampled_sites():
    fingerprint = loop.checkpoint_fingerprint(wrapper())
    assert fingerprint["model"] == "Sequential" and fingerprint["n_samples"] == 6
    assert fingerprint["sampled_sites"] == ["2:dropout:0.5"]


def test_dict_batches_whose_keys_the_model_does_not_take_name_unpack():
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3)).eval()
    loader = [{"pixels": torch.randn(5, 4), "label": torch.randint(0, 3, (5,))}]
    mc = mcdrop.MCDropout(net, n_samples=4, seed=0)
    with pytest.raises(mcdrop.errors.InvalidInputError, match=r"'pixels'.*unpack=lambda batch"):
        mc.predict_loader(loader, progress=False)
    assert not net.training and not any(m.training for m in net.modules())
    pred = mc.predict_loader(loader, unpack=lambda b: (b["pixels"], b["label"]), progress=False)
    assert len(pred) == 5
