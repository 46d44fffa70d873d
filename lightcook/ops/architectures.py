"""Where the attention heads, FFN neurons and layers of a transformer live: one registry, keyed by
the Hugging Face ``config.model_type``.

Compression code never hard-codes module names. It asks :func:`get_architecture` for an
:class:`Architecture` (a few frozen dataclasses of dotted paths) and :func:`resolve_blocks` for the
concrete :class:`Block` objects of one model: every attention block and every FFN block, with its
modules, its unit count (attention: key/value groups; FFN: intermediate neurons) and the channels
each unit owns in each projection (:class:`Cut`). Structured pruning counts and cuts parameters from
these cuts; MoEfication reads each FFN's input projections, output projection and activation
(:meth:`Block.ffn_parts`).

Registered: ``llama`` (also ``mistral``, ``qwen2``: same layout; SmolLM2 is ``llama``), ``gpt2``
(fused ``c_attn`` Conv1D), ``t5`` / ``mt5`` (encoder and decoder stacks, cross-attention, relative
position bias). Add a layout with :func:`register_architecture`, or pass a dict to
:func:`architecture_from_dict` for a one-off model.

Units and grouped-query attention: an attention unit is one key/value head *together with all the
query heads that read it* (a GQA group; for multi-head attention, simply one head). A KV head can only
go with its whole group, and every layer keeps the model's query-per-KV ratio, so Hugging Face's
``repeat_kv`` (which needs uniform groups) keeps working after slicing.

Example:
    >>> from transformers import AutoConfig, AutoModelForCausalLM
    >>> cfg = AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> model = AutoModelForCausalLM.from_config(cfg)
    >>> blocks = resolve_blocks(model, get_architecture(model))
    >>> [(b.name, b.kind, b.units, b.unit_width) for b in blocks[:2]]
    [('model.layers.0.self_attn', 'attention', 2, 16), ('model.layers.0.mlp', 'ffn', 64, 1)]
    >>> sorted(blocks[1].ffn_parts())
    ['activation', 'gate', 'inputs', 'output']
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightcook.ops.names import is_conv1d

ATTENTION, FFN = "attention", "ffn"

# --------------------------------------------------------------------------- layout dataclasses


@dataclass(frozen=True)
class AttentionLayout:
    """One attention block of a layer (self- or cross-attention).

    Attributes:
        path: the attention module, relative to the layer (``self_attn``).
        norm: its pre-norm, relative to the layer (``input_layernorm``); removed with the block.
        q, k, v, o: projections relative to the attention module. With ``fused_qkv`` the query, key
            and value projections are the three thirds of the single module named by ``q``.
        fused_qkv: GPT-2 style ``c_attn`` producing ``[q | k | v]``.
        head_dim: attribute of the attention module holding the per-head width.
        fixed: parameters (relative to the attention module) never pruned, even when the block goes
            (T5's relative position bias, which later layers read).
        optional: the block exists only in some layers/configs (T5 decoder cross-attention); absent is fine.
    """

    path: str
    norm: str
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    fused_qkv: bool = False
    head_dim: str = "head_dim"
    fixed: tuple[str, ...] = ()
    optional: bool = False


@dataclass(frozen=True)
class FFNLayout:
    """One feed-forward block of a layer.

    Attributes:
        path: the FFN module, relative to the layer (``mlp``).
        norm: its pre-norm, relative to the layer.
        inputs: projections whose output channels are the intermediate neurons; for a gated FFN the
            gate projection comes first (``("gate_proj", "up_proj")``).
        output: the projection reading the neurons (``down_proj``).
        activation: attribute of the FFN module holding the activation function.
        gated: ``act(inputs[0](x)) * inputs[1](x)`` (SwiGLU/GeGLU) rather than ``act(inputs[0](x))``.
    """

    path: str
    norm: str
    inputs: tuple[str, ...]
    output: str
    activation: str
    gated: bool = False


@dataclass(frozen=True)
class StackLayout:
    """A list of repeated layers (a decoder, or one side of an encoder-decoder).

    Attributes:
        name: ``decoder`` / ``encoder``.
        layers: the ``nn.ModuleList`` of layers, relative to the model.
        attention: attention blocks per layer.
        ffn: candidate FFN layouts; the first whose modules exist is used (T5 gated vs plain).
        num_layers_key: config key holding the layer count when fully pruned layers may be deleted
            from the list; ``None``: never delete (the blocks become zero modules instead).
        layer_index_attrs: attributes (relative to a layer) renumbered after deleting layers.
        no_delete_if: config flags that forbid deleting layers when true (GPT-2's
            ``scale_attn_by_inverse_layer_idx`` bakes the layer index into the scaling).
    """

    name: str
    layers: str
    attention: tuple[AttentionLayout, ...]
    ffn: tuple[FFNLayout, ...]
    num_layers_key: str | None = None
    layer_index_attrs: tuple[str, ...] = ()
    no_delete_if: tuple[str, ...] = ()


@dataclass(frozen=True)
class Architecture:
    """Everything compression needs to know about one model family.

    Attributes:
        name: the registry key (a Hugging Face ``model_type``).
        stacks: the layer stacks.
        heads_config: config keys ``(query heads, kv heads)`` rewritten when every kept attention
            block has the same number of heads (empty: never; the export's per-layer shapes rule).
        head_dim_config: config key pinned to the head width before head counts change.
        ffn_config: config key rewritten when every kept FFN has the same width.
        resize_attention: ``f(attention_module, kept_query_heads)`` updating module attributes after
            its projections were cut (GPT-2's ``split_size``, T5's ``n_heads``).
        zero_attention: ``f(attention_module) -> module`` standing in for a removed attention block
            (returns zeros in the residual stream); ``None``: cut the block to zero heads instead.
    """

    name: str
    stacks: tuple[StackLayout, ...]
    heads_config: tuple[str, ...] = ()
    head_dim_config: str | None = None
    ffn_config: str | None = None
    resize_attention: Callable[[nn.Module, list[int]], None] | None = None
    zero_attention: Callable[[nn.Module], nn.Module] | None = None

    @property
    def units(self) -> tuple[str, ...]:
        """Unit kinds this layout supports (see :data:`UNIT_KINDS`)."""
        kinds = []
        if any(s.attention for s in self.stacks):
            kinds += ["heads", "attention_layers"]
        if any(s.ffn for s in self.stacks):
            kinds += ["neurons", "ffn_layers"]
        return tuple(kinds)


#: Unit kinds: unit gates (heads per attention block, neurons per FFN) and block gates.
UNIT_KINDS = {"heads": ATTENTION, "neurons": FFN, "attention_layers": ATTENTION, "ffn_layers": FFN}
BLOCK_UNIT = {ATTENTION: "heads", FFN: "neurons"}
BLOCK_GATE = {ATTENTION: "attention_layers", FFN: "ffn_layers"}


# --------------------------------------------------------------------------- stand-in modules


class ZeroAttention(nn.Module):
    """A removed attention block: adds nothing to the residual stream (``(zeros, None)``)."""

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, None]:
        return torch.zeros_like(hidden_states), None


class ZeroFFN(nn.Module):
    """A removed feed-forward block: adds nothing to the residual stream."""

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return torch.zeros_like(hidden_states)


def _zero_attention(_module: nn.Module) -> nn.Module:
    return ZeroAttention()


def _resize_gpt2(attn: Any, kept_heads: list[int]) -> None:  # a GPT2Attention
    attn.num_heads = len(kept_heads)
    attn.split_size = len(kept_heads) * attn.head_dim


def _resize_t5(attn: nn.Module, kept_heads: list[int]) -> None:
    pruned_t5_attention_class().convert(attn, kept_heads)


_PRUNED_T5: list[type[Any]] = []


def pruned_t5_attention_class() -> type[Any]:
    """``PrunedT5Attention``: a ``T5Attention`` that keeps only some heads (built on first use so that
    importing this module does not import T5).

    Hugging Face's T5 computes the relative position bias ``(1, heads, q, k)`` once, in the first
    layer of each stack, and hands it to every later layer, so each layer must pick *its* heads from
    the full-width bias. The pruned module keeps the first layer's ``relative_attention_bias`` at full
    width, computes the full bias when it is the one that creates it, uses ``bias[:, kept_heads]``
    itself and passes the full bias on. With zero heads it adds nothing to the residual stream.
    """
    if not _PRUNED_T5:
        from transformers.models.t5.modeling_t5 import T5Attention

        class PrunedT5Attention(T5Attention):
            kept_heads: list[int]  # indices into the stack's full-width position bias
            full_heads: int

            @classmethod
            def convert(cls, attn: Any, kept: list[int]) -> None:  # a T5Attention
                """Turn ``attn`` (projections already cut to ``kept``) into a pruned module in place."""
                previous = list(getattr(attn, "kept_heads", range(attn.n_heads)))
                attn.full_heads = getattr(attn, "full_heads", attn.n_heads)
                attn.kept_heads = [previous[i] for i in kept]
                attn.n_heads = len(kept)
                attn.inner_dim = attn.n_heads * attn.key_value_proj_dim
                attn.__class__ = cls

            def forward(
                self,
                hidden_states,
                mask=None,
                key_value_states=None,
                position_bias=None,
                past_key_values=None,
                **kwargs,
            ):
                if position_bias is None:
                    position_bias = self._full_bias(hidden_states, key_value_states, past_key_values)
                if self.n_heads == 0:
                    return torch.zeros_like(hidden_states), position_bias, None
                index = torch.tensor(self.kept_heads, device=position_bias.device)
                output, _, weights = super().forward(
                    hidden_states,
                    mask=mask,
                    key_value_states=key_value_states,
                    position_bias=position_bias.index_select(1, index),
                    past_key_values=past_key_values,
                    **kwargs,
                )
                return output, position_bias, weights

            def _full_bias(self, hidden_states, key_value_states, past_key_values) -> Tensor:
                query_len = hidden_states.shape[1]
                past = past_key_values.get_seq_length(self.layer_idx) if past_key_values is not None else 0
                key_len = key_value_states.shape[1] if key_value_states is not None else query_len + past
                if not self.has_relative_attention_bias:  # (1, full heads, q, k) zeros, like T5Attention
                    return hidden_states.new_zeros((1, self.full_heads, query_len, key_len))
                return self.compute_bias(
                    query_len, key_len, device=hidden_states.device, past_seen_tokens=past
                )

        PrunedT5Attention.__module__ = __name__
        _PRUNED_T5.append(PrunedT5Attention)
    return _PRUNED_T5[0]


# --------------------------------------------------------------------------- the registry

_LLAMA = Architecture(
    name="llama",
    stacks=(
        StackLayout(
            name="decoder",
            layers="model.layers",
            attention=(AttentionLayout(path="self_attn", norm="input_layernorm"),),
            ffn=(
                FFNLayout(
                    path="mlp",
                    norm="post_attention_layernorm",
                    inputs=("gate_proj", "up_proj"),
                    output="down_proj",
                    activation="act_fn",
                    gated=True,
                ),
            ),
            num_layers_key="num_hidden_layers",
            layer_index_attrs=("self_attn.layer_idx",),
        ),
    ),
    heads_config=("num_attention_heads", "num_key_value_heads"),
    head_dim_config="head_dim",
    ffn_config="intermediate_size",
    zero_attention=_zero_attention,
)

_GPT2 = Architecture(
    name="gpt2",
    stacks=(
        StackLayout(
            name="decoder",
            layers="transformer.h",
            attention=(
                AttentionLayout(
                    path="attn", norm="ln_1", q="c_attn", k="c_attn", v="c_attn", o="c_proj", fused_qkv=True
                ),
            ),
            ffn=(FFNLayout(path="mlp", norm="ln_2", inputs=("c_fc",), output="c_proj", activation="act"),),
            num_layers_key="n_layer",
            layer_index_attrs=("attn.layer_idx",),
            no_delete_if=("scale_attn_by_inverse_layer_idx", "add_cross_attention"),
        ),
    ),
    ffn_config="n_inner",  # GPT-2 derives head_dim from n_head, so head counts stay per layer
    resize_attention=_resize_gpt2,
    zero_attention=_zero_attention,
)

_T5_ATTN: dict[str, Any] = {
    "q": "q",
    "k": "k",
    "v": "v",
    "o": "o",
    "head_dim": "key_value_proj_dim",
    "fixed": ("relative_attention_bias",),
}
_T5_FFN = (
    ("DenseReluDense", ("wi_0", "wi_1"), True),
    ("DenseReluDense", ("wi",), False),
)


def _t5_stack(name: str, ffn_index: int, cross: bool) -> StackLayout:
    attention = [AttentionLayout(path="layer.0.SelfAttention", norm="layer.0.layer_norm", **_T5_ATTN)]
    if cross:
        attention.append(
            AttentionLayout(
                path="layer.1.EncDecAttention", norm="layer.1.layer_norm", optional=True, **_T5_ATTN
            )
        )
    ffn = tuple(
        FFNLayout(
            path=f"layer.{ffn_index}.{module}",
            norm=f"layer.{ffn_index}.layer_norm",
            inputs=inputs,
            output="wo",
            activation="act",
            gated=gated,
        )
        for module, inputs, gated in _T5_FFN
    )
    return StackLayout(name=name, layers=f"{name}.block", attention=tuple(attention), ffn=ffn)


_T5 = Architecture(
    name="t5",
    stacks=(_t5_stack("encoder", 1, cross=False), _t5_stack("decoder", 2, cross=True)),
    ffn_config="d_ff",  # heads stay per layer: the shared relative position bias keeps all heads
    resize_attention=_resize_t5,
)

ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(arch: Architecture, *aliases: str) -> Architecture:
    """Register ``arch`` under its name and any ``aliases`` (other ``model_type`` values)."""
    for key in (arch.name, *aliases):
        ARCHITECTURES[key] = arch
    return arch


register_architecture(_LLAMA, "mistral", "qwen2")
register_architecture(_GPT2)
register_architecture(_T5, "mt5")


def model_type(model: nn.Module) -> str | None:
    """The Hugging Face ``config.model_type`` of ``model`` (``None`` for a plain module)."""
    return getattr(getattr(model, "config", None), "model_type", None)


def get_architecture(
    model: nn.Module, mapping: str | Mapping[str, Any] | Architecture | None = None, key: str = "architecture"
) -> Architecture:
    """The layout of ``model``: from ``mapping`` when given, else by ``config.model_type``.

    Args:
        model: the network (a Hugging Face model or anything following one of the layouts).
        mapping: ``None`` (look up the model type), a registered name (``"llama"`` for a Llama-like
            model of another type), a dict for :func:`architecture_from_dict`, or an Architecture.
        key: config key named in errors (``compress.structured.architecture``).

    Raises:
        ValueError: unknown layout and no mapping, or an unknown registered name; the message lists
            the registered names and says how to pass a mapping.
    """
    if isinstance(mapping, Architecture):
        return mapping
    if isinstance(mapping, Mapping):
        return architecture_from_dict(mapping, key)
    name = mapping or model_type(model)
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    known = sorted(ARCHITECTURES)
    what = (
        f"{mapping!r} is not a registered layout"
        if mapping
        else (f"{type(model).__name__} (model_type={name!r}) has no known layout")
    )
    raise ValueError(
        f"{key}: {what}; registered: {known}. Set {key} to one of them, or to a dict "
        "{layers: ..., attention: {...}, ffn: {...}} (see lightcook.ops.architectures.architecture_from_dict)"
    )


def architecture_from_dict(spec: Mapping[str, Any], key: str = "architecture") -> Architecture:
    """A single-stack layout from plain data (e.g. a Hydra config), optionally based on a registered one.

    Keys: ``base`` (a registered name whose fields are the defaults), ``layers`` (path of the layer
    list), ``attention`` (dict of :class:`AttentionLayout` fields, or ``null`` for none), ``ffn`` (dict
    of :class:`FFNLayout` fields, or ``null``), ``num_layers_key``.

    Raises:
        ValueError: unknown keys, or no ``layers`` and no ``base``; the message names ``key``.

    Example:
        >>> arch = architecture_from_dict({"layers": "blocks", "attention": None,
        ...     "ffn": {"path": "ff", "norm": "ln", "inputs": ["up"], "output": "down", "activation": "act"}})
        >>> arch.units
        ('neurons', 'ffn_layers')
    """
    allowed = {"base", "name", "layers", "attention", "ffn", "num_layers_key"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(f"{key}: unknown keys {unknown}; allowed: {sorted(allowed)}")
    base = get_architecture(nn.Module(), spec["base"], f"{key}.base") if spec.get("base") else None
    stack = base.stacks[0] if base else None
    if stack is None and not spec.get("layers"):
        raise ValueError(f"{key}: needs 'layers' (the path of the layer list) or a registered 'base'")
    attention = _layouts(spec, "attention", AttentionLayout, stack.attention if stack else (), key)
    ffn = _layouts(spec, "ffn", FFNLayout, stack.ffn if stack else (), key)
    new_stack = StackLayout(
        name="decoder",
        layers=spec.get("layers") or cast(StackLayout, stack).layers,  # checked above
        attention=attention,
        ffn=ffn,
        num_layers_key=spec.get("num_layers_key", stack.num_layers_key if stack else None),
        layer_index_attrs=stack.layer_index_attrs if stack else (),
    )
    fields = {"name": spec.get("name", "custom"), "stacks": (new_stack,)}
    return replace(base, **fields) if base else Architecture(**fields)


def _layouts(spec: Mapping[str, Any], part: str, cls: type, default: tuple, key: str) -> tuple:
    if part not in spec:
        return default
    if spec[part] is None:
        return ()
    value = dict(spec[part])
    if isinstance(value.get("inputs"), list):
        value["inputs"] = tuple(value["inputs"])
    try:
        return (replace(default[0], **value) if default else cls(**value),)
    except TypeError as err:
        raise ValueError(f"{key}.{part}: {err}") from err


# --------------------------------------------------------------------------- resolved blocks


@dataclass
class Cut:
    """The channels each unit owns in one projection.

    Attributes:
        module: dotted name of a Linear or GPT-2 Conv1D, relative to the model.
        side: ``"out"`` (output channels: weight rows of a Linear, plus the bias) or ``"in"``
            (input channels: weight columns of a Linear).
        channels: ``(units, k)`` channel indices; row ``u`` lists the channels of unit ``u``.
    """

    module: str
    side: str
    channels: Tensor


@dataclass
class Block:
    """One attention or FFN block of one concrete model.

    Attributes:
        name: dotted name of the attention/FFN module (``model.layers.3.mlp``).
        kind: ``"attention"`` or ``"ffn"``.
        stack: the stack layout it belongs to; ``layer``: its index there; ``layer_path``: the layer.
        layout: its :class:`AttentionLayout` / :class:`FFNLayout`.
        units: KV groups (attention) or neurons (FFN).
        unit_width: input channels of the output projection per unit (query heads per group × head
            width; 1 for neurons).
        heads_per_unit: query heads per unit (1 for FFN).
        cuts: the per-unit channels of every projection.
        output: dotted name of the output projection (``o_proj`` / ``down_proj``).
    """

    name: str
    kind: str
    stack: StackLayout
    layer: int
    layer_path: str
    layout: AttentionLayout | FFNLayout
    units: int
    unit_width: int
    heads_per_unit: int
    cuts: list[Cut]
    output: str
    model: nn.Module = field(repr=False)

    @property
    def module(self) -> nn.Module:
        """The attention / FFN module."""
        return self.model.get_submodule(self.name)

    @property
    def norm_path(self) -> str:
        """Dotted name of the block's pre-norm."""
        return f"{self.layer_path}.{self.layout.norm}"

    def ffn_parts(self) -> dict[str, Any]:
        """An FFN block's pieces, for MoEfication: ``inputs`` (modules producing the neurons, gate
        first), ``gate`` (the activated projection when gated, else ``None``), ``output`` and
        ``activation`` (the module's activation callable).

        Raises:
            ValueError: called on an attention block.
        """
        if self.kind != FFN:
            raise ValueError(f"{self.name} is an attention block, not an FFN")
        module, layout = self.module, cast(FFNLayout, self.layout)
        inputs = [module.get_submodule(name) for name in layout.inputs]
        return {
            "inputs": inputs,
            "gate": inputs[0] if layout.gated else None,
            "output": module.get_submodule(layout.output),
            "activation": getattr(module, layout.activation),
        }

    def parameters(self) -> list[nn.Parameter]:
        """Distinct parameters of the block and its pre-norm."""
        params = {id(p): p for p in self.module.parameters()}
        params.update({id(p): p for p in self.model.get_submodule(self.norm_path).parameters()})
        return list(params.values())

    def fixed_parameters(self) -> list[nn.Parameter]:
        """Parameters inside the block that are never pruned (``layout.fixed``)."""
        fixed = getattr(self.layout, "fixed", ())
        names = [n for n in fixed if _has(self.module, n)]
        return [p for n in names for p in self.module.get_submodule(n).parameters()]


def linear_dims(module: nn.Module) -> tuple[int, int, bool]:
    """``(in_features, out_features, has_bias)`` of an ``nn.Linear`` or a GPT-2 ``Conv1D``."""
    weight = cast(Tensor, module.weight)
    n_in, n_out = (
        (weight.shape[0], weight.shape[1]) if is_conv1d(module) else (weight.shape[1], weight.shape[0])
    )
    return int(n_in), int(n_out), getattr(module, "bias", None) is not None


def _has(root: nn.Module, name: str) -> bool:
    try:
        root.get_submodule(name)
    except AttributeError:
        return False
    return True


def is_removed(module: nn.Module) -> bool:
    """Whether ``module`` stands in for a removed block."""
    return isinstance(module, ZeroAttention | ZeroFFN) or getattr(module, "n_heads", None) == 0


def iter_layers(model: nn.Module, arch: Architecture) -> Iterator[tuple[StackLayout, int, str, nn.Module]]:
    """``(stack, index, dotted name, layer)`` for every layer of every stack.

    Raises:
        ValueError: a stack's layer list is missing from the model (names the path and architecture).
    """
    for stack in arch.stacks:
        if not _has(model, stack.layers):
            raise ValueError(
                f"architecture {arch.name!r}: the model has no layer list at {stack.layers!r} "
                f"({type(model).__name__}); pass a matching architecture mapping"
            )
        for i, layer in enumerate(cast(Iterable[nn.Module], model.get_submodule(stack.layers))):
            yield stack, i, f"{stack.layers}.{i}", layer


def resolve_blocks(model: nn.Module, arch: Architecture) -> list[Block]:
    """Every present, not-yet-removed attention and FFN block of ``model``, in layer order.

    Raises:
        ValueError: a non-optional block of the layout is missing from a layer.
    """
    blocks = []
    for stack, index, layer_path, layer in iter_layers(model, arch):
        for layout in stack.attention:
            if not _has(layer, layout.path):
                if layout.optional:
                    continue
                raise ValueError(f"architecture {arch.name!r}: {layer_path} has no {layout.path!r}")
            block = _attention_block(model, stack, index, layer_path, layout)
            if block is not None:
                blocks.append(block)
        ffn_layout = next((f for f in stack.ffn if _ffn_present(layer, f)), None)
        if ffn_layout is None and stack.ffn and not any(_is_zero_ffn(layer, f) for f in stack.ffn):
            raise ValueError(
                f"architecture {arch.name!r}: {layer_path} has no FFN like {stack.ffn[0].path!r}"
            )
        if ffn_layout is not None:
            blocks.append(_ffn_block(model, stack, index, layer_path, ffn_layout))
    return blocks


def _ffn_present(layer: nn.Module, layout: FFNLayout) -> bool:
    return all(_has(layer, f"{layout.path}.{name}") for name in (*layout.inputs, layout.output))


def _is_zero_ffn(layer: nn.Module, layout: FFNLayout) -> bool:
    return _has(layer, layout.path) and isinstance(layer.get_submodule(layout.path), ZeroFFN)


def _attention_block(model, stack, index, layer_path, layout: AttentionLayout) -> Block | None:
    name = f"{layer_path}.{layout.path}"
    attn = model.get_submodule(name)
    if is_removed(attn):
        return None
    head_dim = int(getattr(attn, layout.head_dim))
    q_mod, k_mod = attn.get_submodule(layout.q), attn.get_submodule(layout.k)
    q_out, k_out = linear_dims(q_mod)[1], linear_dims(k_mod)[1]
    if layout.fused_qkv:
        q_out = k_out = q_out // 3
    q_heads, kv_heads = q_out // head_dim, k_out // head_dim
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"{name}: {q_heads} query heads do not split into {kv_heads} key/value groups")
    rep = q_heads // kv_heads
    width = rep * head_dim
    group = torch.arange(kv_heads)[:, None]
    q_ch = group * width + torch.arange(width)  # (groups, rep * head_dim)
    kv_ch = group * head_dim + torch.arange(head_dim)  # (groups, head_dim)
    if layout.fused_qkv:
        if rep != 1:
            raise ValueError(f"{name}: a fused qkv projection with grouped-query attention is not supported")
        fused = torch.cat([q_ch + s * q_out for s in range(3)], dim=1)  # [q | k | v] thirds
        cuts = [Cut(f"{name}.{layout.q}", "out", fused)]
    else:
        cuts = [Cut(f"{name}.{layout.q}", "out", q_ch)]
        cuts += [Cut(f"{name}.{p}", "out", kv_ch) for p in (layout.k, layout.v)]
    cuts.append(Cut(f"{name}.{layout.o}", "in", q_ch))
    return Block(
        name,
        ATTENTION,
        stack,
        index,
        layer_path,
        layout,
        kv_heads,
        width,
        rep,
        cuts,
        f"{name}.{layout.o}",
        model,
    )


def _ffn_block(model, stack, index, layer_path, layout: FFNLayout) -> Block:
    name = f"{layer_path}.{layout.path}"
    out = f"{name}.{layout.output}"
    neurons = linear_dims(model.get_submodule(out))[0]
    channels = torch.arange(neurons)[:, None]  # (neurons, 1)
    cuts = [Cut(f"{name}.{p}", "out", channels) for p in layout.inputs]
    cuts.append(Cut(out, "in", channels))
    return Block(name, FFN, stack, index, layer_path, layout, neurons, 1, 1, cuts, out, model)


def layer_parameter_count(model: nn.Module, arch: Architecture) -> int:
    """Distinct parameters inside the layers of every stack (what structured pruning can shrink)."""
    params = {}
    for _stack, _i, _name, layer in iter_layers(model, arch):
        params.update({id(p): p for p in layer.parameters()})
    return sum(p.numel() for p in params.values())


def check_architecture_arg(architecture: str | Mapping[str, Any] | Architecture | None, key: str) -> Any:
    """Validate a callback's ``architecture`` argument: ``None`` (by ``config.model_type``), a registered
    name, an :class:`Architecture`, or a layout mapping (turned into an :class:`Architecture`).

    Raises:
        ValueError: an unregistered name or another type; the message names ``key``.

    Example:
        >>> check_architecture_arg("llama", "compress.moe.architecture")
        'llama'
    """
    if isinstance(architecture, str) and architecture not in ARCHITECTURES:
        raise ValueError(
            f"{key}: {architecture!r} is not a registered layout; registered: {sorted(ARCHITECTURES)}"
        )
    if isinstance(architecture, Mapping):
        return architecture_from_dict(architecture, key)
    if architecture is not None and not isinstance(architecture, str | Architecture):
        raise ValueError(
            f"{key}: expected null, a layout name or a mapping, got {type(architecture).__name__}"
        )
    return architecture


def find_blocks(
    network: nn.Module,
    architecture: str | Mapping[str, Any] | Architecture | None = None,
    kind: str | None = None,
    where: str = "",
) -> tuple[Architecture, list[Block]]:
    """The layout of ``network`` and its blocks (only those of ``kind``, ``attention`` / ``ffn``, when given).

    The one lookup the structured-pruning and MoEfication transforms share. Errors start with the
    field (``architecture: ...``) so a caller can prefix its config key once; ``where`` (a phrase
    saying where the network was found and how to point elsewhere) is appended to each of them.

    Args:
        network: the network to compress.
        architecture: as for :func:`get_architecture`.
        kind: keep only the blocks of this kind.
        where: context for error messages (e.g. ``looked in MyModule.backbone (LlamaForCausalLM); set
            compress.moe.network to point elsewhere``).

    Raises:
        ValueError: unknown layout, a layer list or block the layout names is missing, or no block of
            ``kind``.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> net = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
        >>> arch, blocks = find_blocks(net, kind=FFN)
        >>> arch.name, [b.name for b in blocks]
        ('llama', ['model.layers.0.mlp', 'model.layers.1.mlp'])
        >>> find_blocks(nn.Linear(2, 2), where="looked in Demo (Linear)")
        Traceback (most recent call last):
        ...
        ValueError: architecture: Linear (model_type=None) has no known layout; ... [looked in Demo (Linear)]
    """
    suffix = f" [{where}]" if where else ""
    try:
        arch = get_architecture(network, architecture, key="architecture")
        blocks = resolve_blocks(network, arch)
    except ValueError as err:
        message = str(err)
        if message.startswith("architecture "):  # "architecture 'llama': ..." from resolve_blocks
            message = "architecture: layout " + message.removeprefix("architecture ")
        elif not message.startswith("architecture:"):
            message = f"architecture: {message}"
        raise ValueError(message + suffix) from None
    if kind is not None:
        blocks = [b for b in blocks if b.kind == kind]
    if not blocks:
        raise ValueError(
            f"architecture: layout {arch.name!r} finds no {kind or 'block'} in {type(network).__name__}; "
            f"give a mapping with {'ffn' if kind == FFN else 'attention/ffn'!r}{suffix}"
        )
    return arch, blocks
