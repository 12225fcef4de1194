"""The test zoo: small models, inputs and helpers shared by several test files.

A helper module, not a test module (nothing here is collected): test files import what they need,
``from zoo import mlp, head_cnn``. The shared fixture (``one_thread``) is in ``conftest.py``; the
models of the support matrix (Hugging Face, timm- and torchvision-style, TorchScript, compiled) are
in ``support_models.py``.

Every builder that seeds does so itself (``torch.manual_seed(seed)`` first) and creates its layers in
a fixed order, so a test gets the very same weights from whichever file it calls it; ``seed=None``
leaves the global RNG as it is (the weights then depend on what ran before, as some tests want).
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import mcdrop
from mcdrop.engine.checks import checking

# The logger the engine reports its decisions on (strategy, fallbacks, the row check's verdict).
SAMPLING_LOGGER = "mcdrop.sampling"


# --------------------------------------------------------------------------- multi-layer perceptrons
def mlp(
    d_in: int = 5,
    d_out: int = 4,
    hidden: int = 32,
    p: float | nn.Module = 0.5,
    *,
    act: type[nn.Module] = nn.Tanh,
    head: nn.Module | None = None,
    seed: int | None = 0,
    eval_mode: bool = True,
) -> nn.Module:
    """``Linear(d_in, hidden) -> act -> Dropout(p) -> Linear(hidden, d_out)`` (``-> head``).

    Args:
        d_in: input features.
        d_out: output features.
        hidden: width of the hidden layer.
        p: the dropout rate, or a dropout module to use as it is (e.g. ``mcdrop.nn.Dropout(0.3)``).
        act: the activation class.
        head: an optional last module (e.g. ``nn.Softmax(-1)``).
        seed: ``torch.manual_seed(seed)`` before the layers are made; ``None``: not seeded.
        eval_mode: return the model in eval mode (else as built: train mode).

    Returns:
        The ``nn.Sequential``.
    """
    if seed is not None:
        torch.manual_seed(seed)
    drop = p if isinstance(p, nn.Module) else nn.Dropout(p)
    layers = [nn.Linear(d_in, hidden), act(), drop, nn.Linear(hidden, d_out)]
    if head is not None:
        layers.append(head)
    net = nn.Sequential(*layers)
    return net.eval() if eval_mode else net


def trunk_mlp(seed: int = 0, p: float = 0.3) -> nn.Module:
    """6 -> 32 -> 32 -> 3: a trunk (first layer) worth hoisting, and dropout after both hidden layers."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 32),
        nn.Tanh(),
        nn.Dropout(p),
        nn.Linear(32, 32),
        nn.Tanh(),
        nn.Dropout(p),
        nn.Linear(32, 3),
    ).eval()


def head_cnn(seed: int = 0) -> nn.Module:
    """Convolutions with BatchNorm (in eval mode: running statistics) and dropout before the head."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Dropout(0.5), nn.Linear(32, 4),
    )  # fmt: skip
    net.train()
    with torch.no_grad():
        net(torch.randn(16, 3, 6, 6))  # non-trivial running statistics
    return net.eval()


def cnn_bn() -> nn.Module:
    """Conv -> BatchNorm -> ReLU -> Dropout2d -> pool -> Dropout -> Linear, in train mode (not seeded)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout2d(0.2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(8, 4),
    )


def transformer() -> nn.Module:
    """A two-layer ``nn.TransformerEncoder`` (width 8, dropout 0.2), in train mode (not seeded)."""
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.2, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


# --------------------------------------------------------------------------- inputs and tagged outputs
def distinct_rows(b: int, d: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose rows all differ (so a row mix-up cannot go unnoticed)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g) + torch.arange(b, dtype=torch.float32)[:, None] * 10


def randn_rows(b: int = 5, d: int = 4, seed: int = 1) -> torch.Tensor:
    """Standard normal inputs ``(b, d)`` from their own seeded generator."""
    return torch.randn(b, d, generator=torch.Generator().manual_seed(seed))


class Tagged(nn.Module):
    """``cat([x, dropout(ones)], -1)``; records the rows of every sampling pass (not the checks).

    The first part of the output is an exact, known function of input row ``i`` in every sample
    (which checks the replication and the reshaping back to ``(N, B, ...)`` bit for bit) while the
    second part carries the dropout randomness.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.drop = nn.Dropout(p)
        self.rows: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not checking():
            self.rows.append(x.shape[0])
        return torch.cat([x, self.drop(torch.ones_like(x))], -1)


# --------------------------------------------------------------------------- the engine's log
def strategy_of(caplog: pytest.LogCaptureFixture) -> str:
    """The strategy the last sampling call logged (``caplog`` at DEBUG on :data:`SAMPLING_LOGGER`)."""
    chosen = [r.getMessage() for r in caplog.records if "sampling with strategy" in r.getMessage()]
    assert chosen, "no strategy was logged"
    return chosen[-1].split("strategy ", 1)[1].split(" ", 1)[0].strip("'")


# --------------------------------------------------------------------------- memory meters
class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage alive, and their peak, counted at every ATen operation.

    Every storage an operation returns is counted once while any tensor using it is alive (views
    share their base's storage). It measures what the engine and the statistics allocate, exactly
    and independently of the allocator or of other processes on the machine (unlike the resident
    set size), which is what "memory does not grow with N" is about.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._users: dict[int, list[int]] = {}

    def _release(self, key: int) -> None:
        entry = self._users[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._users[key]

    def _skip(self, key: int, args, kwargs) -> bool:
        return key == 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if self._skip(key, args, kwargs):
                    continue
                entry = self._users.setdefault(key, [0, storage.nbytes()])
                if entry[0] == 0:
                    self.live += entry[1]
                entry[0] += 1
                weakref.finalize(t, self._release, key)
        self.peak = max(self.peak, self.live)
        return out


class AllocatedBytes(LiveTensorBytes):
    """Like :class:`LiveTensorBytes`, but a view of a tensor from before the pass (a parameter's
    transpose) allocates nothing and is not counted."""

    def _skip(self, key: int, args, kwargs) -> bool:
        if key == 0 or key in self._users:
            return key == 0
        return any(
            t.untyped_storage().data_ptr() == key
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and t.device.type == "cpu"
        )


# --------------------------------------------------------------------------- one kind of randomness
class FunctionalDropoutNet(nn.Module):
    """Dropout written as F.dropout(x, p, training=self.training) in a custom forward."""

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 2)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        return self.fc2(F.dropout(h, self.p, training=self.training))


class SdpaAttention(nn.Module):
    """Hugging Face style: dropout_p = p if self.training else 0.0, passed to SDPA."""

    def __init__(self, dim: int = 8, p: float = 0.3) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.attention_dropout = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, -1)
        dropout_p = self.attention_dropout if self.training else 0.0
        return self.out(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p))


class MhaOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, dropout=0.3, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


class LstmNet(nn.Module):
    def __init__(self, p: float = 0.5, batch_first: bool = True) -> None:
        super().__init__()
        self.rnn = nn.LSTM(4, 8, num_layers=2, dropout=p, batch_first=batch_first)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0])


def only(module_name: str) -> nn.Module:
    """A small model whose *only* source of randomness is the named module type (not seeded)."""
    makers = {
        "Dropout": lambda: nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.3)),
        "Dropout1d": lambda: nn.Sequential(nn.Conv1d(3, 4, 1), nn.Dropout1d(0.3)),
        "Dropout2d": lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.Dropout2d(0.3)),
        "Dropout3d": lambda: nn.Sequential(nn.Conv3d(3, 4, 1), nn.Dropout3d(0.3)),
        "AlphaDropout": lambda: nn.Sequential(nn.Linear(6, 8), nn.SELU(), nn.AlphaDropout(0.3)),
        "FeatureAlphaDropout": lambda: nn.Sequential(
            nn.Conv2d(3, 4, 1), nn.SELU(), nn.FeatureAlphaDropout(0.3)
        ),
        "mcdrop.nn.Dropout": lambda: nn.Sequential(nn.Linear(6, 8), mcdrop.nn.Dropout(0.3)),
        "mcdrop.nn.Dropout2d": lambda: nn.Sequential(nn.Conv2d(3, 4, 1), mcdrop.nn.Dropout2d(0.3)),
        "MultiheadAttention": MhaOnly,
        "LSTM": LstmNet,
        "GRU": lambda: nn.GRU(4, 8, num_layers=3, dropout=0.4, batch_first=True),
        "RNN": lambda: nn.RNN(4, 8, num_layers=2, dropout=0.4, batch_first=True),
        "F.dropout": FunctionalDropoutNet,
        "sdpa dropout_p": SdpaAttention,
        "TransformerEncoderLayer attention only": lambda: _attention_only_encoder(),
        "TransformerDecoderLayer": lambda: _decoder_only_layer(),
    }
    return makers[module_name]()


def _attention_only_encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    layer.self_attn.dropout = 0.3  # the only randomness: dropout on the attention weights
    return nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)


class _DecoderWrap(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(8, 2, dim_feedforward=16, dropout=0.25, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x, x)


def _decoder_only_layer() -> nn.Module:
    return _DecoderWrap()


# The input shape of each model of :func:`only`.
INPUTS = {
    "Dropout": (2, 6),
    "Dropout1d": (2, 3, 5),
    "Dropout2d": (2, 3, 4, 4),
    "Dropout3d": (2, 3, 2, 3, 3),
    "AlphaDropout": (2, 6),
    "FeatureAlphaDropout": (2, 3, 4, 4),
    "mcdrop.nn.Dropout": (2, 6),
    "mcdrop.nn.Dropout2d": (2, 3, 4, 4),
    "MultiheadAttention": (2, 5, 8),
    "LSTM": (2, 5, 4),
    "GRU": (2, 5, 4),
    "RNN": (2, 5, 4),
    "F.dropout": (2, 6),
    "sdpa dropout_p": (2, 5, 8),
    "TransformerEncoderLayer attention only": (2, 5, 8),
    "TransformerDecoderLayer": (2, 5, 8),
}
