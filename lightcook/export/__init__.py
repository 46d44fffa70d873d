"""Compressed save/load: one folder format (HF config + safetensors + lightcook.json manifest)."""

from lightcook.export.common import model_from_config, read_export, write_export
from lightcook.export.moe import export_moe, load_moe
from lightcook.export.quantized import export_quantized, load_quantized
from lightcook.export.sparse import export_sparse, load_sparse

__all__ = [
    "export_moe",
    "export_quantized",
    "export_sparse",
    "load_moe",
    "load_quantized",
    "load_sparse",
    "model_from_config",
    "read_export",
    "write_export",
]
