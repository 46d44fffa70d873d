"""The folder format: atomic writes, tied weights stored once, and unreadable input that fails
naming the folder or file and what is wrong with it (real broken files)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lightcook.export import load_compressed, read_manifest, save_compressed
from lightcook.export.format import CONFIG, MANIFEST, TENSORS, read_tensors, tied_aliases, write_folder
from tests.helpers import TINY_LLAMA


def tiny_llama() -> torch.nn.Module:
    config = dict(TINY_LLAMA)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config)).eval()


@pytest.fixture
def export(tmp_path):
    return save_compressed(tiny_llama(), tmp_path / "dense")


def test_dense_round_trip_stores_tied_weights_once(export):
    manifest = read_manifest(export)
    assert manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "lm_head.weight" not in read_tensors(export)
    loaded = load_compressed(export, backend="reference")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    reference = tiny_llama()
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_meta_tensors_are_tied_when_they_are_one_object():
    net = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "b": torch.nn.Linear(2, 2)}).to("meta")
    net["b"].weight = net["a"].weight
    assert tied_aliases(net) == {"b.weight": "a.weight"}


def test_a_failed_write_leaves_the_previous_folder(tmp_path, export):
    before = sorted(p.name for p in export.iterdir())
    with pytest.raises(TypeError):
        write_folder(export, tiny_llama(), {"x": torch.zeros(1)}, {"not json": object()})
    assert sorted(p.name for p in export.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["dense"]  # no temporary folder left


def test_missing_folder_names_the_folder(tmp_path):
    with pytest.raises(ValueError, match=rf"{tmp_path / 'nowhere'}: no such export folder"):
        load_compressed(tmp_path / "nowhere")


def test_folder_without_manifest(tmp_path):
    with pytest.raises(ValueError, match=rf"{tmp_path}: not a lightcook export \(no lightcook\.json\)"):
        load_compressed(tmp_path)


def test_manifest_that_is_not_json_names_it(export):
    (export / MANIFEST).write_text('{"format": "lightcook", "version": 2, "techni')  # cut short
    with pytest.raises(ValueError, match=rf"{export / MANIFEST}: not valid JSON"):
        load_compressed(export)


def test_manifest_of_another_format_names_it(export):
    (export / MANIFEST).write_text(json.dumps({"format": "gguf", "version": 2}))
    with pytest.raises(ValueError, match=rf"{export / MANIFEST}: not a lightcook manifest \(format 'gguf'"):
        read_manifest(export)


def test_manifest_of_an_unknown_version_names_it(export):
    manifest = json.loads((export / MANIFEST).read_text())
    (export / MANIFEST).write_text(json.dumps({**manifest, "version": 7}))
    with pytest.raises(ValueError, match=rf"{export / MANIFEST}: unsupported version 7"):
        load_compressed(export)


def test_truncated_safetensors_names_the_file(export):
    data = (export / TENSORS).read_bytes()
    (export / TENSORS).write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ValueError, match=rf"{export / TENSORS}: unreadable safetensors file, truncated or corrupt"
    ):
        load_compressed(export)


def test_corrupt_safetensors_header_names_the_file(export):
    data = bytearray((export / TENSORS).read_bytes())
    data[8:16] = b"\xff" * 8  # garbage where the JSON header starts
    (export / TENSORS).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{export / TENSORS}: unreadable safetensors file"):
        load_compressed(export)


def test_missing_safetensors_names_the_file(export):
    (export / TENSORS).unlink()
    with pytest.raises(ValueError, match=rf"{export / TENSORS}: missing"):
        load_compressed(export)


def test_missing_config_is_named(export):
    (export / CONFIG).unlink()
    with pytest.raises(ValueError, match=rf"{export}: no config\.json"):
        load_compressed(export)


def test_tensors_of_another_model_do_not_fit(export):
    config = json.loads((export / CONFIG).read_text())
    (export / CONFIG).write_text(json.dumps({**config, "hidden_size": 64}))
    with pytest.raises(ValueError, match=rf"{export}: the stored tensors do not fit the rebuilt model"):
        load_compressed(export)


def test_extra_may_not_overwrite_manifest_keys(tmp_path):
    with pytest.raises(ValueError, match=r"extra may not set the manifest keys \['techniques'\]"):
        save_compressed(tiny_llama(), tmp_path / "x", extra={"techniques": []})
    assert not (tmp_path / "x").exists()


def _quantized_export(tmp_path):
    from lightcook.ops.quant import QuantLinear, QuantSpec

    net = tiny_llama()
    mlp = net.model.layers[0].mlp
    mlp.up_proj = QuantLinear.from_linear(mlp.up_proj, QuantSpec(bits=4, granularity="group", group_size=16))
    return net.eval(), save_compressed(net, tmp_path / "w4a8")


def test_transformers_refuses_a_lightcook_folder_loudly_without_remote_code(tmp_path):
    """The packed layers are not in a stock transformers layout: ``from_pretrained`` must not
    re-initialise them silently (it did before: held-out ppl ~1e17). It stops at the custom code."""
    _, path = _quantized_export(tmp_path)
    assert json.loads((path / CONFIG).read_text())["model_type"] == "lightcook_export"
    with pytest.raises(ValueError, match="contains custom code"):
        AutoModelForCausalLM.from_pretrained(path)
    assert "load_compressed" in (path / "lightcook_export.py").read_text()


def test_with_remote_code_transformers_returns_the_trained_model(tmp_path):
    net, path = _quantized_export(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
    reference = load_compressed(path, dtype=torch.float32)
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)
    assert loaded.compressed_techniques == ["quantized"]


def test_without_lightcook_the_remote_code_names_the_loader_and_the_converter(tmp_path, monkeypatch):
    import sys

    from lightcook.hf_remote_code import LightcookExportModel

    _, path = _quantized_export(tmp_path)
    monkeypatch.setitem(sys.modules, "lightcook.export", None)  # `import lightcook.export` fails
    with pytest.raises(ImportError, match=r"load_compressed.*python -m lightcook.export.convert"):
        LightcookExportModel.from_pretrained(path)


def test_a_dense_export_stays_a_plain_transformers_checkpoint(export):
    assert json.loads((export / CONFIG).read_text())["model_type"] == "llama"
    assert not (export / "lightcook_export.py").exists()
    plain = AutoModelForCausalLM.from_pretrained(export).eval()
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (1, 9))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, tiny_llama()(ids).logits)
