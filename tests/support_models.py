"""The models of the support matrix (docs/support.md), shared by its tests and the interruption tests.

A helper module, not a test module (nothing here is collected): ``tests/test_support_matrix.py``
checks each kind of randomness of these models, and ``tests/test_interruptions.py`` interrupts
sampling on every one of them. Hugging Face models are built from tiny configs with random weights
(nothing is downloaded); :func:`optional_import` skips a test where an optional dependency cannot be
imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from torch import nn

RATE = 0.3  # the rate of every kind of randomness switched on


def optional_import(name: str) -> ModuleType:
    """Import an optional dependency, or skip: missing, or broken beside this torch build."""
    try:
        return importlib.import_module(name)
    except Exception as err:  # noqa: BLE001 - e.g. torchvision's C++ ops built for another torch
        pytest.skip(f"{name} cannot be imported here ({type(err).__name__}: {err})")


# ----------------------------------------------------------------------------- Hugging Face models
HF_ARCHS = ["bert-eager", "bert-sdpa", "gpt2-eager", "gpt2-sdpa", "vit-eager", "vit-sdpa"]
LAYERS = 2


def hf_model(T: ModuleType, arch: str, dropout: float = 0.0, attention_dropout: float = 0.0):
    """A tiny randomly initialised model, its inputs (a dict) and the output to analyse."""
    family, impl = arch.split("-")
    torch.manual_seed(0)
    if family == "bert":
        config = T.BertConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=LAYERS,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
            num_labels=3,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=attention_dropout,
            attn_implementation=impl,
        )
        model = T.BertForSequenceClassification(config)
        inputs = {
            "input_ids": torch.randint(0, 64, (3, 8)),
            "attention_mask": torch.ones(3, 8, dtype=torch.long),
        }
        inputs["attention_mask"][0, 5:] = 0  # a padded row
        output = None  # .logits
    elif family == "gpt2":
        config = T.GPT2Config(
            vocab_size=64,
            n_embd=16,
            n_layer=LAYERS,
            n_head=2,
            n_positions=16,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=attention_dropout,
            bos_token_id=0,
            eos_token_id=0,
            attn_implementation=impl,
        )
        model = T.GPT2LMHeadModel(config)
        inputs = {"input_ids": torch.randint(0, 64, (3, 8))}

        def output(out):
            return out.logits[:, -1]  # the next-token distribution

    else:
        config = T.ViTConfig(
            image_size=8,
            patch_size=4,
            num_channels=3,
            hidden_size=16,
            num_hidden_layers=LAYERS,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=3,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=attention_dropout,
            attn_implementation=impl,
        )
        model = T.ViTForImageClassification(config)
        inputs = {"pixel_values": torch.randn(3, 3, 8, 8)}
        output = None
    model.eval()
    assert model.config._attn_implementation == impl
    return model, inputs, output


# ----------------------------------------------------------------------------- timm / torchvision style
class TimmStyleAttention(nn.Module):
    """timm's ``Attention`` forward (fused path): ``dropout_p=self.attn_drop.p if self.training else 0``."""

    def __init__(self, dim: int = 8, heads: int = 2, attn_drop: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class DropPath(nn.Module):
    """timm's ``DropPath``: per-sample stochastic depth with rate ``drop_prob``."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.drop_prob)
        return x * keep / (1 - self.drop_prob)


class StochasticDepth(nn.Module):
    """torchvision's ``ops.StochasticDepth``: rate ``p``, ``mode`` "row" or "batch"."""

    def __init__(self, p: float, mode: str = "row") -> None:
        super().__init__()
        self.p = p
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        shape = [x.shape[0]] + [1] * (x.dim() - 1) if self.mode == "row" else [1] * x.dim()
        return x * x.new_empty(shape).bernoulli_(1 - self.p) / (1 - self.p)


class Block(nn.Module):
    def __init__(self, depth_layer: nn.Module, attn_drop: float = 0.0, drop: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.attn = TimmStyleAttention(attn_drop=attn_drop)
        self.drop_path = depth_layer
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(drop), nn.Linear(16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm(x)))
        return x + self.drop_path(self.mlp(x))


def vision_like(depth: Callable[[float], nn.Module], drop_path: float = 0.0, **rates: float) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Block(depth(drop_path), **rates), Block(depth(drop_path), **rates)).eval()


STYLE_X = torch.randn(4, 5, 8)


class RandomDepth(nn.Module):
    """A user's own stochastic-depth layer, under a name no rule knows."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.rand(()) < self.rate:
            return torch.zeros_like(x)
        return x


class GaussianNoise(nn.Module):
    """A user's own noise layer, registered as dropout-like randomness with its scale as rate."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.sigma * torch.randn_like(x) if self.training else x


# ----------------------------------------------------------------------------- TorchScript
class FunctionalDropout(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 2)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.dropout(torch.relu(self.fc1(x)), self.p, training=self.training))


class RnnHead(nn.Module):
    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


class SelfAttention(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, dropout=p, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def cnn(p: float) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout2d(p),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(p),
        nn.Linear(8, 4),
    )


def encoder(p: float) -> nn.Module:
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=p, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


SCRIPTED = {
    "cnn-batchnorm-dropout": (cnn, (2, 3, 8, 8), "dropout"),
    "F.dropout(training=self.training)": (FunctionalDropout, (4, 6), "functional"),
    "lstm-2-layers": (
        lambda p: RnnHead(nn.LSTM(4, 8, num_layers=2, dropout=p, batch_first=True)),
        (2, 5, 4),
        "rnn_dropout",
    ),
    "gru-2-layers": (
        lambda p: RnnHead(nn.GRU(4, 8, num_layers=2, dropout=p, batch_first=True)),
        (2, 5, 4),
        "rnn_dropout",
    ),
    "multihead-attention": (SelfAttention, (2, 5, 8), "attention_dropout"),
    "transformer-encoder": (encoder, (2, 5, 8), "dropout"),
}


# ----------------------------------------------------------------------------- torch.compile
def compiled(model: nn.Module) -> nn.Module:
    torch._dynamo.reset()
    return torch.compile(model, backend="aot_eager")
