"""What transformers finds in a lightcook export folder: ``config.json`` points here (``auto_map``).

A lightcook folder stores packed integer codes, N:M positions, MoE experts and sliced layers in its
own layout (``lightcook.json``), which no stock transformers class reads. So its ``config.json`` is
this stub rather than the network's own config (that one is ``hf_config.json``), and
``AutoModelForCausalLM.from_pretrained(folder)``:

- without ``trust_remote_code`` fails loudly, as transformers does for any folder with custom code;
- with ``trust_remote_code=True`` runs this file, copied into the folder as ``lightcook_export.py``:
  where lightcook is installed it returns ``lightcook.export.load_compressed(folder)`` — the trained
  model — and otherwise raises an ``ImportError`` that names ``load_compressed`` and the converter
  (``python -m lightcook.export.convert``) to compressed-tensors, which stock transformers and vLLM
  open.

This module imports nothing from lightcook at import time (it runs where lightcook may be absent).

Example:
    >>> LightcookExportConfig().model_type
    'lightcook_export'
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel

MODEL_TYPE = "lightcook_export"
HOW = (
    "open it with lightcook.export.load_compressed(folder) (pip install lightcook), or convert it for "
    "transformers / vLLM with `python -m lightcook.export.convert <folder> <out>` (compressed-tensors)"
)


class LightcookExportConfig(PretrainedConfig):
    """The stub config of a lightcook export folder (the network's config is ``hf_config.json``)."""

    model_type = MODEL_TYPE


class LightcookExportModel(PreTrainedModel):
    """``from_pretrained`` of a lightcook export: the trained model through lightcook, or the reason."""

    config_class = LightcookExportConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        try:  # looked up at call time: this file runs inside export folders, lightcook may be absent
            from lightcook.export import load_compressed
        except ImportError:
            raise ImportError(
                f"{pretrained_model_name_or_path} is a lightcook export, which transformers cannot read; "
                + HOW
            ) from None
        device = kwargs.get("device_map")
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        return load_compressed(
            pretrained_model_name_or_path,
            device if isinstance(device, (str, torch.device)) and device != "auto" else "cpu",
            dtype=dtype if isinstance(dtype, torch.dtype) else None,
        )
