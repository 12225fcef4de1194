"""MC dropout on CUDA: results on the model's device, per-device generators, autocast, no syncs.

Every test here but the last is skipped without a CUDA device. They were written without access to
a GPU and have not been run on one yet (see docs/support.md).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import mcdrop
from mcdrop._statistics import ClassificationStats
from mcdrop.engine.inputs import prepare_inputs
from mcdrop.engine.outputs import flag_bad_rows, raise_if_bad_rows
from mcdrop.engine.sample import sample_chunks


def needs_cuda(test):
    return pytest.mark.gpu(
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test)
    )


def classifier(device: str = "cuda") -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 4)
    ).to(device)
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 8, device=device))  # non-trivial running statistics
    return model.eval()


@needs_cuda
def test_results_are_on_the_models_device_and_the_model_is_untouched() -> None:
    model = classifier()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(16, 8)  # CPU inputs are moved to the model's device
    mc = mcdrop.MCDropout(model, n_samples=10, seed=0, keep_samples=True)
    pred = mc.predict(x)
    for tensor in (pred.probs, pred.mutual_information, pred.samples):
        assert tensor.device.type == "cuda"
    assert bool((pred.mutual_information > 0).all())
    samples = mc.sample(x.cuda())
    assert samples.device.type == "cuda" and not torch.equal(samples[0], samples[1])
    assert not any(m.training for m in model.modules())
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key


@needs_cuda
def test_seeded_sampling_is_reproducible_and_leaves_the_global_generators_alone() -> None:
    model = classifier()
    x = torch.randn(16, 8, device="cuda")
    cuda_state, cpu_state = torch.cuda.get_rng_state(), torch.get_rng_state()
    a = mcdrop.MCDropout(model, n_samples=8, seed=5).sample(x)
    b = mcdrop.MCDropout(model, n_samples=8, seed=5).sample(x)
    c = mcdrop.MCDropout(model, n_samples=8, seed=6).sample(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a[0], a[1])
    assert torch.equal(torch.cuda.get_rng_state(), cuda_state)
    assert torch.equal(torch.get_rng_state(), cpu_state)


@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_each_device_draws_from_its_own_generator() -> None:
    model = classifier("cuda:1")
    states = [torch.cuda.get_rng_state(i) for i in range(2)]
    a = mcdrop.MCDropout(model, n_samples=6, seed=1).sample(torch.randn(4, 8))
    b = mcdrop.MCDropout(model, n_samples=6, seed=1).sample(torch.randn(4, 8, device="cuda:0"))
    assert a.device == b.device == torch.device("cuda:1")
    assert not torch.equal(a[0], a[1])
    for index, state in enumerate(states):
        assert torch.equal(torch.cuda.get_rng_state(index), state)


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("how", ["dtype-option", "users-autocast"])
@pytest.mark.parametrize("strategy", ["auto", "replicate"])
def test_autocast(device: str, dtype: torch.dtype, how: str, strategy: str) -> None:
    """The model runs in reduced precision, the statistics in float32, on the CPU and on CUDA.

    Under vmap (chosen here by "auto", the trunk being hoisted) torch applies autocast to the trunk
    but not to every op of the vmapped part (a linear layer with a bias comes out in float32), so
    the reduced precision is asserted on the trunk's first layer.
    """
    if device == "cuda" and dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    model = classifier(device)
    first_layer: list[torch.dtype] = []
    model[0].register_forward_hook(lambda m, a, out: first_layer.append(out.dtype))
    x = torch.randn(16, 8, device=device)
    options = {"dtype": dtype} if how == "dtype-option" else {}
    mc = mcdrop.MCDropout(model, n_samples=10, seed=0, keep_samples=True, strategy=strategy, **options)
    with torch.autocast(device, dtype=dtype, enabled=how == "users-autocast"):
        pred = mc.predict(x)
        raw = mc.sample(x)
    assert first_layer and set(first_layer) == {dtype}  # the model ran in reduced precision
    assert pred.probs.dtype == torch.float32  # statistics accumulate in float32
    assert torch.isfinite(pred.probs).all() and torch.isfinite(raw).all()
    assert torch.allclose(pred.probs.sum(-1), torch.ones(16, device=device), atol=1e-4)
    assert bool((pred.mutual_information > 0).all())
    assert not torch.equal(raw[0], raw[1])
    if how == "dtype-option":
        assert raw.dtype == torch.float32  # samples come back in float32


@needs_cuda
def test_half_precision_model_gets_half_inputs() -> None:
    model = classifier().half()
    pred = mcdrop.MCDropout(model, n_samples=6, seed=0).predict(torch.randn(16, 8))  # float32, CPU
    assert pred.probs.device.type == "cuda" and pred.probs.dtype == torch.float32
    assert torch.isfinite(pred.probs).all()


@needs_cuda
def test_no_host_device_synchronisation_inside_the_sampling_loop() -> None:
    """The engine and the streaming statistics never wait for the GPU between chunks.

    The decision (row check, gate check, probe, trial of a strategy) compares outputs on the host,
    once per input signature; it is made in a first call and remembered. A second call then runs
    only the planned chunks: no synchronisation there. The finite check of the outputs runs on the
    device and is read once, after the last chunk.
    """
    model = classifier()
    x = torch.randn(32, 8, device="cuda")
    n_samples, rows = 16, 64
    inputs = prepare_inputs((x,), {}, batch_dim=0, device=x.device, dtype=torch.float32)
    decisions: dict = {}

    def chunks():
        return sample_chunks(
            model,
            inputs,
            n_samples=n_samples,
            max_batch_size=rows,
            memory_budget=2**20,
            output=None,
            output_batch_dim=0,
            pair=False,
            cache=decisions,
        )

    stats = ClassificationStats("logits", 1)
    with mcdrop.enable_dropout(model), torch.no_grad():
        for _ in chunks():  # the decision, remembered in `decisions`
            pass
        assert decisions
        planned = chunks()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        sample_rows, n_chunks = 0, 0
        try:
            while sample_rows < n_samples * inputs.batch_size:
                start, stop, chunk = next(planned)
                stats.update(start, stop, chunk, inputs.batch_size)
                sample_rows += chunk.shape[0] * (stop - start)
                n_chunks += 1
        finally:
            torch.cuda.set_sync_debug_mode("default")
        with pytest.raises(StopIteration):
            next(planned)  # the single finite check, after the loop
    assert n_chunks > 4
    assert torch.isfinite(stats.probs.mean).all()
    assert bool((stats.probs.variance > 0).any())


@needs_cuda
def test_non_finite_outputs_are_still_reported_on_gpu() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).cuda().eval()
    x = torch.randn(6, 4, device="cuda")
    with torch.no_grad():
        model[0].bias[0] = float("nan")
    with pytest.raises(mcdrop.NonFiniteError, match=r"batch rows \[0, 1, 2, 3, 4\]"):
        mcdrop.MCDropout(model, n_samples=4, seed=0, task="regression", max_batch_size=8).sample(x)


@needs_cuda
def test_hugging_face_bert_on_gpu_with_autocast() -> None:
    try:
        transformers = importlib.import_module("transformers")
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"transformers cannot be imported here ({err})")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.3,  # attention dropout only: SDPA's dropout_p on the GPU
        attn_implementation="sdpa",
    )
    model = transformers.BertForSequenceClassification(config).cuda().eval()
    batch = {"input_ids": torch.randint(0, 64, (4, 8)), "attention_mask": torch.ones(4, 8, dtype=torch.long)}
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    with torch.autocast("cuda", dtype=dtype):
        pred = mcdrop.MCDropout(model, n_samples=8, seed=0).predict(**batch)
    assert pred.probs.device.type == "cuda"
    assert bool((pred.mutual_information > 0).all())
    assert not any(m.training for m in model.modules())


def test_device_side_finite_check_flags_rows_and_raises_once() -> None:
    """The check the GPU path uses (no sync per chunk), run here on CPU tensors."""
    flags: list[torch.Tensor] = []
    ok = torch.zeros(3, 2, 4)
    flag_bad_rows(ok, 0, 2, 6, flags)
    bad = torch.zeros(3, 4, 4)
    bad[1, 2, 0] = float("nan")
    bad[0, 3, 1] = float("inf")
    bad[2, 0, 3] = float("-inf")  # a masked logit: allowed
    flag_bad_rows(bad, 2, 6, 6, flags)
    assert flags[0].tolist() == [False, False, False, False, True, True]
    with pytest.raises(mcdrop.NonFiniteError, match=r"batch rows \[4, 5\]"):
        raise_if_bad_rows(flags)
    raise_if_bad_rows([])  # nothing checked: nothing to say
    pair: list[torch.Tensor] = []
    flag_bad_rows((ok, ok), 0, 2, 2, pair)
    raise_if_bad_rows(pair)


def test_the_row_check_zeroes_the_rate_of_fused_gpu_kernels() -> None:
    """cuDNN's recurrent kernel and the fused attention kernels take their dropout rate as an
    argument; the row check's constants set it to 0 (read from the op schemas, here on the CPU)."""
    from mcdrop.engine.checks import _dropout_p_index

    aten = torch.ops.aten
    for op, name in [
        (aten._cudnn_rnn.default, "dropout"),
        (aten.miopen_rnn.default, "dropout"),
        (aten._scaled_dot_product_flash_attention.default, "dropout_p"),
        (aten._scaled_dot_product_efficient_attention.default, "dropout_p"),
    ]:
        index = _dropout_p_index(op)
        assert index is not None and op._schema.arguments[index].name == name, op
    assert _dropout_p_index(aten.add.Tensor) is None
