"""Version-1 manifests (the previous release's five layouts) translated into codec entries.

The previous release wrote one manifest kind per export function: ``technique`` ``quantized``
(``layers``), ``sparse`` (``n``, ``m``, ``layers``), ``moe`` (``layers``), ``compressed`` (one entry per
technique, the structure under ``structure``) and the folders of the old structured-pruning saver (no
``technique``, a ``structured`` entry). Their tensors are laid out exactly as the codecs store them,
so translating the manifest is enough.

Example:
    >>> old = {"format": "lightcook", "version": 1, "technique": "moe", "layers": {"m.0.mlp": {}}}
    >>> new = upgrade(old, "runs/x/moe")
    >>> new["version"], new["techniques"], new["moe"]
    (3, ['moe'], {'m.0.mlp': {}})
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightcook.export.codecs import MANIFEST_ORDER
from lightcook.export.format import FORMAT_VERSION, MANIFEST

__all__ = ["upgrade"]

_HOW = "re-export the trained model with lightcook.export.save_compressed"


def _entries_v1(manifest: dict[str, Any], path: Path) -> dict[str, Any]:
    """The codec entries of a version-1 manifest (by technique)."""
    technique = manifest.get("technique")
    if technique == "quantized":
        return {"quantized": manifest["layers"]}
    if technique == "sparse":
        nm = {"n": manifest["n"], "m": manifest["m"], "layers": manifest["layers"], "quantized": []}
        return {"nm": nm}
    if technique == "moe":
        return {"moe": manifest["layers"]}
    if technique is None and isinstance(manifest.get("structured"), dict):
        return {"structured": manifest["structured"]}
    if technique == "compressed":
        found: dict[str, Any] = {k: manifest[k] for k in ("moe", "nm", "quantized") if k in manifest}
        if "structure" in manifest:
            found["structured"] = manifest["structure"]
        return {k: v for k, v in found.items() if k in manifest.get("techniques", [])}
    raise ValueError(f"{path}: a version-1 {technique!r} export, which this release cannot load; {_HOW}")


def _check(manifest: dict[str, Any], path: Path) -> dict[str, Any]:
    techniques = manifest.get("techniques")
    if not isinstance(techniques, list):
        raise ValueError(f"{path / MANIFEST}: no 'techniques' list; {_HOW}")
    unknown = [t for t in techniques if t not in MANIFEST_ORDER]
    if unknown:
        raise ValueError(
            f"{path / MANIFEST}: unknown techniques {unknown} (known: {', '.join(MANIFEST_ORDER)})"
        )
    missing = [t for t in techniques if not isinstance(manifest.get(t), dict)]
    if missing:
        raise ValueError(f"{path / MANIFEST}: techniques {missing} listed without their entries; {_HOW}")
    return manifest


def upgrade(manifest: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """``manifest`` as a current one: version-1 layouts translated, current ones checked.

    Args:
        manifest: as read from ``path``'s ``lightcook.json``.
        path: the export folder (named in errors).

    Raises:
        ValueError: a version-1 kind this release cannot translate, unknown techniques, or techniques
            listed without entries (the message names the folder and says how to re-export).
    """
    path = Path(path)
    if manifest.get("version") in (2, FORMAT_VERSION):  # 3 moved only the config, not the manifest
        return _check({**manifest, "version": FORMAT_VERSION}, path)
    entries = _entries_v1(manifest, path)
    kept = {k: v for k, v in manifest.items() if k not in ("technique", "structure", "layers", "techniques")}
    kept = {k: v for k, v in kept.items() if k not in MANIFEST_ORDER}
    techniques = [t for t in MANIFEST_ORDER if t in entries]
    return _check({**kept, "version": FORMAT_VERSION, "techniques": techniques, **entries}, path)
