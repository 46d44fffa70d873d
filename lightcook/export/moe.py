"""Export of MoEfied models, and the loader that rebuilds them with sparse MoE FFNs.

The folder is the shared lightcook format (:mod:`lightcook.export.common`): the Hugging Face
``config.json``, ``model.safetensors`` with every tensor of the model — the FFN projections in their
permuted (expert-contiguous) order under their usual names, plus each FFN's ``perm``, ``routed`` and
``relu`` buffers and router tensors — and ``lightcook.json`` with one entry per MoE FFN
(:meth:`~lightcook.ops.moe.MoEFFN.spec`: projection names, activation, experts, top-k, router kind).

:func:`load_moe` rebuilds the Hugging Face model from the config, wraps each listed FFN in a
:class:`~lightcook.ops.moe.MoEFFN` and loads the tensors: without gradients its FFNs run the
conditional-computation path (only the top-k experts' weights per token).

Example:
    >>> import tempfile, torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from lightcook.ops.moe import MoEFFN
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> model = LlamaForCausalLM(cfg).eval()
    >>> mlp = model.model.layers[0].mlp
    >>> moe = MoEFFN.from_ffn(mlp, ["gate_proj", "up_proj"], "down_proj", "act_fn", True, 8, 2, "centroid")
    >>> moe.set_routed(True)
    >>> model.model.layers[0].mlp = moe
    >>> loaded = load_moe(export_moe(model, tempfile.mkdtemp() + "/moe"))
    >>> type(loaded.model.layers[0].mlp).__name__, loaded.model.layers[0].mlp.top_k
    ('MoEFFN', 2)
    >>> ids = torch.randint(0, 64, (1, 8))
    >>> with torch.no_grad():
    ...     torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightcook.export.common import load_plain_tensors, model_from_config, read_export, write_export
from lightcook.ops.moe import MoEFFN, moe_modules

__all__ = ["TECHNIQUE", "export_moe", "load_moe"]

TECHNIQUE = "moe"


def export_moe(model: nn.Module, path: str | Path) -> Path:
    """Write ``model`` (holding routed :class:`MoEFFN` layers) to an export folder, atomically.

    Args:
        model: a Hugging Face model whose FFNs were replaced by routed MoE FFNs (e.g.
            ``pl_module.model`` after :class:`~lightcook.callbacks.moefication.MoEficationCallback`).
        path: export folder (replaced if present).

    Returns:
        ``path``. The manifest also records ``ffn_param_fraction`` (share of FFN weights used per
        token) and the parameter counts.

    Raises:
        ValueError: the model has no MoE FFN, or one was never split (``routed`` is off).

    Example:
        >>> # export_moe(pl_module.model, "outputs/runs/<id>/moe")
    """
    layers = moe_modules(model)
    if not layers:
        raise ValueError("export_moe: the model has no MoEFFN layer; nothing to export")
    unsplit = [name for name, m in layers.items() if not bool(m.routed)]
    if unsplit:
        raise ValueError(f"export_moe: {unsplit[:3]} were never split into experts (routing is off)")
    ffn = sum(p.weight.numel() for m in layers.values() for p in m.projections)
    used = sum(p.weight.numel() * m.top_k / m.num_experts for m in layers.values() for p in m.projections)
    manifest = {
        "technique": TECHNIQUE,
        "layers": {name: m.spec() for name, m in layers.items()},
        "ffn_parameters": ffn,
        "ffn_param_fraction": round(used / ffn, 6),
        "router_parameters": sum(t.numel() for m in layers.values() for t in m.router.state_dict().values()),
    }
    return write_export(path, model, dict(model.state_dict()), manifest)


def _wrap(model: nn.Module, name: str, entry: dict[str, Any]) -> None:
    moe = MoEFFN.from_ffn(
        model.get_submodule(name),
        entry["inputs"],
        entry["output"],
        entry["activation"],
        entry["gated"],
        entry["num_experts"],
        entry["top_k"],
        entry["router"],
        entry.get("router_hidden") or 128,
        entry.get("buckets", 8),
    )
    moe.router.requires_grad_(False)
    model.set_submodule(name, moe)


def load_moe(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild an export of :func:`export_moe` as the MoE model, ready for inference.

    Args:
        path: folder written by :func:`export_moe`.
        device: where the model goes.

    Returns:
        The Hugging Face model in eval mode with a :class:`MoEFFN` (routed, sparse without gradients)
        in place of every exported FFN; ``lightcook.ops.moe.set_top_k(model, k)`` changes the
        number of experts per token.

    Raises:
        ValueError: not a MoE export, no ``config.json``, or tensors missing from the folder.

    Example:
        >>> # model = load_moe("outputs/runs/<id>/moe"); model(input_ids).logits
    """
    manifest, tensors, config = read_export(path)
    if manifest.get("technique") != TECHNIQUE:
        raise ValueError(f"{path}: a {manifest.get('technique')!r} export, not {TECHNIQUE!r}")
    if config is None:
        raise ValueError(f"{path}: no config.json; load_moe rebuilds Hugging Face models only")
    model = model_from_config(config)
    for name, entry in manifest["layers"].items():
        _wrap(model, name, entry)
    load_plain_tensors(model, tensors, manifest, compressed=set())
    return model.to(device).eval()
