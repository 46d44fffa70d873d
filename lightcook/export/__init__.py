"""Compressed save/load: one folder format, one codec per technique.

:func:`save_compressed` writes the live network (any combination of structured slicing, MoE FFNs,
N:M masks and quantized layers) as one folder — Hugging Face ``config.json``, ``model.safetensors``
and the ``lightcook.json`` manifest (:mod:`lightcook.export.format`) — by running the codecs of
:mod:`lightcook.export.codecs` in order; :func:`load_compressed` rebuilds it with the real inference
kernels; :func:`estimate_bytes` predicts what the export stores without writing it;
:func:`read_manifest` reads the manifest (folders of the previous release translated).

Example:
    >>> import tempfile, torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> path = save_compressed(LlamaForCausalLM(cfg), tempfile.mkdtemp() + "/dense")
    >>> read_manifest(path)["techniques"], type(load_compressed(path)).__name__
    ([], 'LlamaForCausalLM')
"""

from lightcook.export.format import model_from_config
from lightcook.export.pipeline import estimate_bytes, load_compressed, read_manifest, save_compressed

__all__ = ["estimate_bytes", "load_compressed", "model_from_config", "read_manifest", "save_compressed"]
