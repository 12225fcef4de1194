"""Exported programs (``torch.export.save``, ``.pt2``) as models MC dropout can sample (private).

Used by ``mcdrop report --model model.pt2``. An exported graph has no train/eval mode: each
dropout is an ATen op with its rate and a constant train flag (``aten.dropout(x, 0.3, True)`` when
exported in train mode, ``False`` in eval mode), and ``ExportedProgram.module()`` refuses
``train()`` and ``eval()``. :func:`load_exported` replaces each dropout op by an ``nn.Dropout`` of
the same rate (and each attention op with a dropout rate by an attention layer applying it in train
mode only), so MC dropout samples exactly the dropout the model was exported with when it switches
those layers on, and a deterministic pass has none.
"""

from __future__ import annotations

import operator
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mcdrop.errors import CliError
from mcdrop.policy.classify import register_stochastic

_EXPORT_RECIPE = (
    "model.eval(); then .train() on its dropout and attention layers only (nn.Dropout, nn.MultiheadAttention, ...); "
    "torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},)), "
    "'model.pt2')"
)


def load_exported(path: Path, first_line: Any) -> tuple[nn.Module, str]:
    """A ``torch.export.save`` program as a module whose dropout MC dropout can switch on and off.

    ``first_line`` shortens an exception to one line for the message (the CLI's helper).

    An exported graph has no train/eval mode: each dropout is an op with its rate and a constant
    train flag (``aten.dropout(x, 0.3, True)``), and ``.module()`` refuses ``train()``/``eval()``.
    Each dropout op is replaced by an ``nn.Dropout`` of the same rate (``nn.AlphaDropout``, or a
    channel dropout, for those variants), so the model samples exactly the dropout it was exported
    with when MC dropout switches those layers on, and none in eval mode. That holds whether it was
    exported in train mode (``aten.dropout(x, p, True)``) or in eval mode (``aten.dropout(x, p,
    False)``: the op and its rate stay in the graph unless it was decomposed). Returns the module and
    a note for stderr (``""`` if none: see :func:`_eval_mode_note`). Attention exported in train
    mode (``scaled_dot_product_attention`` with ``dropout_p > 0``) becomes an
    :class:`_AttentionDropout`. Refused, with the reason: a graph with no dropout op left; BatchNorm
    exported in train mode (it would normalise each batch with that batch's statistics); other
    random ops (they could not be switched off); a program that does not take one tensor, or was
    exported for one batch size only.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.export's notes on its pytree internals
            program = torch.export.load(str(path))
            graph_module = program.module()
    except Exception as err:  # noqa: BLE001 - any failure here means "not an exported program we can read"
        raise CliError(f"could not load {path} as an exported program: {first_line(err)}") from None
    _check_exported_inputs(path, program)
    graph = graph_module.graph
    dropouts = _dropout_nodes(graph)
    problems = _exported_problems(graph)
    if problems:
        raise CliError(f"--model {path}: {problems}; export it with {_EXPORT_RECIPE}")
    if not dropouts:
        raise CliError(
            f"--model {path} holds no dropout op, so MC dropout has nothing to sample: the model has no dropout, "
            "or it was exported in eval mode and decomposed (run_decompositions drops eval-mode dropout). "
            f"Export it with {_EXPORT_RECIPE}"
        )
    note = _eval_mode_note(path, graph, dropouts)
    for node, layer in dropouts:
        _replace_with_module(graph_module, node, layer)
    graph_module.recompile()
    return _ExportedModel(graph_module), note


#: Fused attention ops: in eval mode their dropout (attention dropout) is left out of the graph.
_ATTENTION_OPS = (
    "scaled_dot_product_attention",
    "_native_multi_head_attention",
    "_transformer_encoder_layer_fwd",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
)


def _eval_mode_note(path: Path, graph: Any, dropouts: list[tuple[Any, nn.Module]]) -> str:
    """A note when a program exported in eval mode has attention whose dropout it lost, else ``""``.

    Exported in eval mode, each dropout layer stays in the graph as an op with its rate (train
    flag false), and is sampled; but attention applies its dropout inside a fused op only in
    train mode, so an eval-mode export holds no trace of it.
    """
    eval_mode = all(node.args[2] is False for node, _ in dropouts if len(node.args) > 2)
    if not eval_mode or not any(_op_name(node) in _ATTENTION_OPS for node in graph.nodes):
        return ""
    return (
        f"{path} was exported in eval mode: its {len(dropouts)} dropout op(s) are sampled, but attention "
        "dropout (inside fused attention ops) was left out of the graph and is not; to sample it too, export "
        f"with {_EXPORT_RECIPE}"
    )


def _dropout_layer(name: str, p: float) -> nn.Module:
    if name in ("dropout", "native_dropout"):
        return nn.Dropout(p)
    if name == "alpha_dropout":
        return nn.AlphaDropout(p)
    return _ChannelDropout(p, alpha=name == "feature_alpha_dropout")


#: The ATen dropout ops of an exported graph, each replaced by a layer (:func:`_dropout_layer`).
_DROPOUT_OPS = ("dropout", "native_dropout", "alpha_dropout", "feature_dropout", "feature_alpha_dropout")


def _op_name(node: Any) -> str | None:
    """``"dropout"`` for a node calling ``torch.ops.aten.dropout.default``; ``None`` for non-ATen nodes."""
    target = node.target
    if node.op != "call_function" or not hasattr(target, "_schema"):
        return None
    return str(target._schema.name).split("::")[-1]


def _dropout_nodes(graph: Any) -> list[tuple[Any, Any]]:
    """The dropout nodes of an exported graph, each with the layer that replaces it.

    Those are the dropout ops, and the attention ops with a dropout rate above 0 (exported in train
    mode), which become an :class:`_AttentionDropout` of that rate.
    """
    found = []
    for node in graph.nodes:
        name = _op_name(node)
        if name in _DROPOUT_OPS:
            found.append((node, _dropout_layer(name, float(node.args[1]))))
        elif name == "scaled_dot_product_attention":
            given = _arguments(node)
            if given.get("dropout_p", 0.0):
                found.append((node, _AttentionDropout(node, given)))
    return found


def _arguments(node: Any) -> dict[str, Any]:
    """The arguments of an ATen node by name (positional and keyword)."""
    names = [a.name for a in node.target._schema.arguments]
    return dict(zip(names, node.args, strict=False)) | dict(node.kwargs)


def _exported_problems(graph: Any) -> str:
    """Why MC dropout cannot sample an exported graph honestly, or ``""``."""
    for node in graph.nodes:
        name = _op_name(node)
        if name is None or name in _DROPOUT_OPS:
            if name == "native_dropout" and any(u.args[1] != 0 for u in node.users):
                return "its graph uses the mask of a dropout op, which mcdrop cannot replace by a layer"
            continue
        given = _arguments(node)
        if "batch_norm" in name and given.get("training", "no_stats" in str(node.target)):
            return (
                "it was exported in train mode, so its BatchNorm normalises each batch with that batch's own "
                "statistics (and updates them) instead of the trained running averages"
            )
        if re.fullmatch(
            r"(bernoulli|rand|randn|randint|randperm|multinomial|normal|uniform|rrelu\w*)_?(like)?_?", name
        ):
            return f"its graph draws random numbers ({name}) that are not a dropout op, and cannot be switched off"
    return ""


def _replace_with_module(graph_module: Any, node: Any, layer: Any) -> None:
    """Replace a dropout ``node`` of ``graph_module`` by a call of ``layer``, added as a submodule."""
    name = f"mc_{node.name}"
    while hasattr(graph_module, name):
        name += "_"
    graph_module.add_submodule(name, layer)
    graph = graph_module.graph
    with graph.inserting_before(node):
        if isinstance(layer, _AttentionDropout):
            given = _arguments(node)
            call = graph.call_module(
                name, (given["query"], given["key"], given["value"], given.get("attn_mask"))
            )
        else:
            call = graph.call_module(name, (node.args[0],))
    if _op_name(node) == "native_dropout":  # returns (output, mask): its users take item 0
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.getitem:
                user.replace_all_uses_with(call)
                graph.erase_node(user)
    node.replace_all_uses_with(call)
    graph.erase_node(node)


def _check_exported_inputs(path: Path, program: Any) -> None:
    """Refuse a program that does not take one tensor with a free batch size."""
    specs = [s for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    if len(specs) != 1:
        raise CliError(
            f"--model {path} takes {len(specs)} inputs; mcdrop report feeds one tensor (the --data inputs) per call"
        )
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    node = placeholders.get(getattr(specs[0].arg, "name", ""))
    value = None if node is None else node.meta.get("val")
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        raise CliError(f"--model {path} does not take a tensor with a batch dimension as its input")
    if isinstance(value.shape[0], int):
        raise CliError(
            f"--model {path} was exported for batches of exactly {value.shape[0]} input(s) (static shapes), and "
            "MC dropout evaluates batches of other sizes: export it with a dynamic batch dimension, "
            "dynamic_shapes=({0: torch.export.Dim.DYNAMIC},)"
        )


class _ChannelDropout(nn.Module):
    """Dropout of whole channels (dim 1) at any rank: the layer of ``aten.feature_(alpha_)dropout``."""

    def __init__(self, p: float, alpha: bool = False) -> None:
        super().__init__()
        self.p = p
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with whole channels dropped in train mode, unchanged in eval mode."""
        if self.alpha:
            return torch.feature_alpha_dropout(x, self.p, self.training)
        return torch.feature_dropout(x, self.p, self.training)


register_stochastic(_ChannelDropout, "dropout", "p")  # listed with its rate, like nn.Dropout2d


class _AttentionDropout(nn.Module):
    """``scaled_dot_product_attention`` with its dropout following the mode: the layer of such an op.

    Exported in train mode, attention applies its dropout inside the op (``dropout_p``); this
    applies it in train mode only, like the attention modules mcdrop samples in eager models.
    """

    def __init__(self, node: Any, given: dict[str, Any]) -> None:
        super().__init__()
        self.dropout_p = float(given["dropout_p"])
        self.is_causal = bool(given.get("is_causal", False))
        self.scale = given.get("scale")
        self.enable_gqa = bool(given.get("enable_gqa", False))

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of ``query`` over ``key``/``value``, with dropout on its weights in train mode."""
        return torch.nn.functional.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=self.is_causal,
            scale=self.scale,
            enable_gqa=self.enable_gqa,
        )


class _ExportedModel(nn.Module):
    """An exported program's graph with its dropout as layers; ``train()``/``eval()`` set the flags.

    The graph module refuses ``train()`` and ``eval()`` (its other ops have no mode), so this sets
    every ``training`` flag directly, as MC dropout does; the dropout layers are the only modules
    whose behaviour follows it.
    """

    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        self.program = program

    def train(self, mode: bool = True) -> _ExportedModel:
        """Set the mode of the dropout layers (and the flags of every other module)."""
        for module in self.modules():
            module.training = mode
        return self

    def forward(self, x: torch.Tensor) -> Any:
        """The program's output on ``x``."""
        return self.program(x)
