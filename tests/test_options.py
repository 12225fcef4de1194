"""Tests for mcdrop/options.py: the frozen, validated options of a wrapper and their fingerprint."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from zoo import mlp

import mcdrop
from mcdrop.errors import InvalidInputError, InvalidTypeError
from mcdrop.options import SamplingOptions

X = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))

#: The keys of the option part of a checkpoint fingerprint, as every earlier version wrote them: a
#: checkpoint resumes only if they read the same, so they must not change.
FINGERPRINT_KEYS = [
    "n_samples",
    "task",
    "output_type",
    "aleatoric",
    "class_dim",
    "seed",
    "max_batch_size",
    "memory_budget",
    "strategy",
    "dtype",
    "output",
    "output_batch_dim",
    "batch_dim",
]


def test_options_are_frozen_and_replace_validates_again():
    options = SamplingOptions(n_samples=5, seed=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.n_samples = 6  # type: ignore[misc]
    assert options.replace(seed=4).seed == 4 and options.seed == 3
    with pytest.raises(InvalidInputError, match="n_samples"):
        options.replace(n_samples=0)
    with pytest.raises(InvalidInputError, match="strategy"):
        options.replace(strategy="fastest")
    with pytest.raises(InvalidTypeError, match="keep_samples"):
        options.replace(keep_samples="yes")


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"task": "segmentation"}, InvalidInputError, "task"),
        ({"aleatoric": "variance", "task": "classification"}, InvalidInputError, "aleatoric"),
        ({"output": 1.5}, InvalidTypeError, "output"),
        ({"memory_budget": 0}, InvalidInputError, "memory_budget"),
        ({"seed": -1}, InvalidInputError, "seed"),
        ({"dtype": torch.float64}, InvalidInputError, "dtype"),
        ({"drop_path": 1}, InvalidTypeError, "drop_path"),
    ],
)
def test_bad_options_are_refused_by_name(changes, error, match):
    with pytest.raises(error, match=match):
        SamplingOptions(**changes)
    with pytest.raises(error, match=match):
        mcdrop.MCDropout(mlp(), **changes)


def test_derived_options_are_resolved_once():
    assert SamplingOptions(batch_dim=1).output_batch_dim == 1
    assert SamplingOptions(batch_dim={"x": 0}).output_batch_dim == 0
    # a mapping giving its batched inputs one dimension implies it; several: inferred per call
    assert SamplingOptions(batch_dim={"x": 1, "mask": None, "*": 1}).output_batch_dim == 1
    assert SamplingOptions(batch_dim={"x": 1, "mask": 0}).output_batch_dim is None
    assert SamplingOptions(batch_dim={"x": 1}).output_batch_dim is None  # the rest: 0
    assert SamplingOptions(batch_dim={"x": 1, "mask": 0}, output_batch_dim=0).output_batch_dim == 0
    automatic = SamplingOptions()
    assert automatic.budget is None and automatic.memory_budget_bytes == 256 * 2**20
    assert SamplingOptions(memory_budget=1024).budget == 1024
    assert SamplingOptions(aleatoric="variance").pair and not automatic.pair


def test_a_wrapper_reads_its_options_as_attributes_and_rebuilds_from_them():
    select = lambda out: out  # noqa: E731 - a callable option, compared by identity
    mc = mcdrop.MCDropout(mlp(), n_samples=7, seed=1, output=select, batch_dim={"*": 0})
    assert (mc.n_samples, mc.seed, mc.output, mc.memory_budget) == (7, 1, select, 256 * 2**20)
    with pytest.raises(AttributeError):
        _ = mc.no_such_option
    again = mcdrop.MCDropout(mc.model, **mc.options.as_kwargs())
    assert again.options == mc.options
    # the same options and seed draw the same samples
    assert torch.equal(again.sample(X), mcdrop.MCDropout(mc.model, **mc.options.as_kwargs()).sample(X))


def test_the_fingerprint_keeps_the_keys_earlier_checkpoints_were_written_with():
    fingerprint = SamplingOptions(n_samples=3, seed=0).fingerprint()
    assert list(fingerprint) == FINGERPRINT_KEYS
    assert fingerprint["memory_budget"] == 256 * 2**20  # the resolved default, as written before
    assert SamplingOptions(batch_dim=0).fingerprint() == SamplingOptions(batch_dim={"*": 0}).fingerprint()
    assert (
        SamplingOptions(output=lambda o: o[0]).fingerprint()
        != SamplingOptions(output=lambda o: o[1]).fingerprint()
    )  # two lambdas share a qualified name: told apart by their code


def test_output_type_and_class_dim_remember_whether_they_were_given():
    """Issue 18, item 6: a default the user did not give may be contradicted by the output (refused);
    one the user gave is obeyed. Not given, they stay ``None`` through ``replace`` and ``as_kwargs``
    (a per-rank copy refuses what the original refuses) and are fingerprinted as the old defaults,
    so earlier checkpoints resume."""
    default = SamplingOptions()
    assert (default.output_type, default.class_dim, default.read_output_type) == (None, None, "logits")
    assert default.replace(seed=1).output_type is None and default.replace(seed=1).class_dim is None
    given = SamplingOptions(output_type="logits", class_dim=1)
    assert (given.output_type, given.class_dim) == ("logits", 1) and given != default
    assert default.fingerprint() == given.fingerprint()  # what earlier versions wrote for the defaults
    assert SamplingOptions(output_type="probs", class_dim=-1).fingerprint()["class_dim"] == -1
    mc = mcdrop.MCDropout(mlp(), n_samples=3)
    assert (mc.output_type, mc.class_dim) == (None, None)
    assert mcdrop.MCDropout(mc.model, **mc.options.as_kwargs()).options == mc.options
    with pytest.raises(InvalidInputError, match="output_type"):
        SamplingOptions(output_type="softmax")
    with pytest.raises(InvalidTypeError, match="class_dim"):
        SamplingOptions(class_dim=1.0)


def test_rng_state_round_trip_reproduces_the_draws():
    mc = mcdrop.MCDropout(mlp(), n_samples=5, seed=2)
    mc.sample(X)
    state = {k: v.clone() for k, v in mc.rng_state.items()}
    first = mc.sample(X)
    mc.rng_state = state
    assert torch.equal(mc.sample(X), first)
    unseeded = mcdrop.MCDropout(mlp(), n_samples=5)
    assert unseeded.rng_state is None
    with pytest.raises(InvalidInputError, match="seeded"):
        unseeded.rng_state = state
