"""Compressed save/load: one folder format (HF config + safetensors + lightcook.json manifest)."""

from lightcook.export.common import model_from_config, read_export, write_export

__all__ = ["model_from_config", "read_export", "write_export"]
