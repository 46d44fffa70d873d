"""Folders written by the previous release (tests/export/fixtures/v1, see make_v1.py) still load:
same logits as that release's own loader, same inference modules."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightcook.export import load_compressed, read_manifest
from lightcook.export.format import MANIFEST

V1 = Path(__file__).parent / "fixtures" / "v1"
TECHNIQUES = {
    "quantized": ["quantized"],
    "sparse": ["nm"],
    "moe": ["moe"],
    "sliced": ["structured"],
    "compressed": ["moe", "structured", "nm", "quantized"],
}


@pytest.mark.parametrize("kind", sorted(TECHNIQUES))
def test_previous_release_folder_loads_and_computes_the_same(kind):
    folder = V1 / kind
    assert json.loads((folder / MANIFEST).read_text())["version"] == 1  # really the old layout
    expected = load_file(folder / "expected.safetensors")
    model = load_compressed(folder, backend="reference")
    assert read_manifest(folder)["techniques"] == model.compressed_techniques == TECHNIQUES[kind]
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"]).logits.float()
    # float32 folders: bit-for-bit up to summation order; half-precision ones compute in that dtype,
    # whose CPU kernels differ between machines (AVX2 vs AVX-512) by a rounding step of the logits
    stored = getattr(torch, read_manifest(folder).get("dtype", "float32"))
    ulp = torch.finfo(stored).eps * float(expected["logits"].abs().max())
    tol = 1e-6 if stored == torch.float32 else 2 * ulp
    torch.testing.assert_close(
        logits, expected["logits"], atol=tol, rtol=1e-6 if stored == torch.float32 else 0
    )
    types = {n: type(m).__name__ for n, m in model.named_modules() if n}
    assert types == json.loads((folder / "expected_types.json").read_text())


def test_unknown_previous_kind_says_how_to_re_export(tmp_path):
    folder = tmp_path / "int8"
    shutil.copytree(V1 / "quantized", folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**manifest, "technique": "int8"}))
    with pytest.raises(
        ValueError,
        match=rf"{folder}: a version-1 'int8' export.*re-export the trained model with lightcook\.export\.save_compressed",
    ):
        load_compressed(folder)


def test_current_manifest_with_unknown_technique_is_refused(tmp_path):
    folder = tmp_path / "future"
    shutil.copytree(V1 / "moe", folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**manifest, "version": 2, "techniques": ["gguf"]}))
    with pytest.raises(ValueError, match=r"lightcook\.json: unknown techniques \['gguf'\]"):
        load_compressed(folder)
