"""``python -m lightcook.bench`` on tiny exports: the JSON's keys and numbers, ratios = export over
baseline of the raw numbers, exact timings with an injected clock (speed itself is never asserted),
``generate`` on a loaded export = the eager forward argmax chain, the baselines, the errors."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from lightcook.bench import BenchError, bench, kernels_of, load_export, main
from lightcook.export import save_compressed
from lightcook.ops.architectures import get_architecture, layer_parameter_count, resolve_blocks
from lightcook.ops.hard_concrete import attach_gates
from lightcook.ops.quant import QuantLinear, QuantSpec
from tests.helpers import VOCAB
from tests.helpers.structured_moe import tiny_model

ARGS = ["--batch", "1,2", "--prompt", "8", "--new-tokens", "3", "--repeats", "1", "--quiet"]


def quantized_model() -> torch.nn.Module:
    """The tiny Llama (2 layers, tied embeddings, context 64) with W8 up/down projections."""
    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.mlp.up_proj = QuantLinear.from_linear(layer.mlp.up_proj, QuantSpec(bits=8))
        layer.mlp.down_proj = QuantLinear.from_linear(layer.mlp.down_proj, QuantSpec(bits=8), act_mode="none")
    return model.eval()


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return save_compressed(quantized_model(), tmp_path_factory.mktemp("bench") / "export")


@pytest.fixture(scope="module")
def dense_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dense") / "hf"
    tiny_model("llama").save_pretrained(folder)
    return folder


def run(export: Path, tmp_path: Path, *extra: str, clock=None) -> dict:
    out = tmp_path / "bench.json"
    kwargs = {} if clock is None else {"clock": clock}
    assert main([str(export), *ARGS, *extra, "--json", str(out)], **kwargs) == 0
    return json.loads(out.read_text())


def numbers(data) -> list[float]:
    if isinstance(data, dict | list):
        return [n for value in (data.values() if isinstance(data, dict) else data) for n in numbers(value)]
    return [data] if isinstance(data, int | float) and not isinstance(data, bool) else []


# --------------------------------------------------------------------------- the JSON


def test_cli_writes_json_with_keys_and_positive_numbers(export, tmp_path):
    result = run(export, tmp_path)
    assert {"version", "command", "export", "baseline", "settings", "models", "ratios", "memory"} <= set(
        result
    )
    assert {"generate", "machine"} <= set(result)
    assert result["command"].startswith("python -m lightcook.bench ") and str(export) in result["command"]
    assert result["baseline"]["kind"] == "config" and result["baseline"]["dtype"] == "bfloat16"
    assert result["settings"]["batches"] == [1, 2] and result["settings"]["cache"] == "dynamic"
    for name in ("export", "baseline"):
        model = result["models"][name]
        assert sorted(model["prefill"]) == sorted(model["decode"]) == ["1", "2"]
        timings = [model["prefill"], model["decode"], model["ttft_seconds"]]
        assert numbers(timings) and all(n > 0 for n in numbers(timings))
        assert model["bytes"]["loaded"] > 0
        assert model["peak_memory_bytes"] is None or model["peak_memory_bytes"] >= 0
    ex, base = result["models"]["export"], result["models"]["baseline"]
    assert ex["bytes"]["safetensors_payload"] > 0 and base["bytes"]["safetensors_payload"] is None  # random
    assert result["export"]["techniques"] == ["quantized"]
    assert sorted(result["export"]["kernels"]) == sorted(
        f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("up", "down")
    )
    assert result["generate"] == {
        "ok": True,
        "cache": "dynamic",
        "matches_greedy_decode": True,
        "error": None,
    }


def test_ratios_are_export_over_baseline_of_the_raw_numbers(export, tmp_path):
    result = run(export, tmp_path)
    ex, base, ratios = result["models"]["export"], result["models"]["baseline"], result["ratios"]
    for b in ("1", "2"):
        for kind in ("prefill", "decode"):
            assert (
                ratios["by_batch"][b][kind]
                == ex[kind][b]["tokens_per_second"] / base[kind][b]["tokens_per_second"]
            )
    assert ratios["decode"] == ratios["by_batch"]["1"]["decode"]  # the first --batch is the headline
    assert ratios["prefill"] == ratios["by_batch"]["1"]["prefill"]
    assert ratios["ttft"] == ex["ttft_seconds"] / base["ttft_seconds"]
    assert ratios["loaded_bytes"] == ex["bytes"]["loaded"] / base["bytes"]["loaded"]


def test_an_injected_clock_makes_every_number_exact(export, tmp_path):
    ticks = itertools.count()
    result = run(export, tmp_path, clock=lambda: float(next(ticks)))  # every sample lasts one tick
    for name in ("export", "baseline"):
        model = result["models"][name]
        for b in (1, 2):
            assert model["prefill"][str(b)] == {"seconds": 1.0, "tokens_per_second": b * 8.0}
            assert model["decode"][str(b)] == {"seconds_per_step": 1 / 3, "tokens_per_second": b * 3.0}
        assert model["ttft_seconds"] == 1.0
    assert result["ratios"]["decode"] == result["ratios"]["prefill"] == result["ratios"]["ttft"] == 1.0


def test_the_table_names_the_kernels_and_the_machine(export, capsys):
    assert main([str(export), *ARGS[:-1]]) == 0
    text = capsys.readouterr().out
    assert "| decode tokens/s, batch 2 |" in text and "| time to first token, batch 1 |" in text
    assert "machine: " in text and "headline: decode x" in text
    assert "model.layers.*.mlp.up_proj: " in text and "(2 layers)" in text
    assert "generate (dynamic cache): ok, matches the measured greedy decode" in text


def test_static_cache(export, tmp_path):
    result = run(export, tmp_path, "--cache", "static")
    assert result["settings"]["cache"] == "static" and result["generate"]["matches_greedy_decode"] is True
    assert result["models"]["export"]["decode"]["2"]["tokens_per_second"] > 0


def test_kernels_come_from_quantized_kernels_when_load_compressed_sets_them(export):
    model = load_export(export)
    model.quantized_kernels = {"model.layers.0.mlp.up_proj": "int8_weight_only"}
    assert kernels_of(model) == ({"model.layers.0.mlp.up_proj": "int8_weight_only"}, "quantized_kernels")


# --------------------------------------------------------------------------- generate


def argmax_chain(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy tokens from full eager forwards, no cache."""
    with torch.no_grad():
        for _ in range(new_tokens):
            ids = torch.cat([ids, model(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    return ids


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_on_the_loaded_export_equals_the_eager_argmax_chain(export, cache):
    model = load_export(export)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    kwargs = {"cache_implementation": "static"} if cache == "static" else {}
    with torch.no_grad():
        generated = model.generate(
            ids, do_sample=False, max_new_tokens=5, min_new_tokens=5, pad_token_id=0, **kwargs
        )
    assert torch.equal(generated, argmax_chain(model, ids, 5))


# --------------------------------------------------------------------------- baselines


def test_baseline_is_the_recorded_base_model(tmp_path, dense_folder):
    path = save_compressed(quantized_model(), tmp_path / "export", extra={"base_model": str(dense_folder)})
    result = bench(path, batches=[1], prompt=4, new_tokens=2, repeats=1)
    assert result["baseline"] == {
        "kind": "base_model",
        "source": str(dense_folder),
        "dtype": "bfloat16",
        "weights": "pretrained",
    }
    assert result["models"]["baseline"]["bytes"]["safetensors_payload"] > 0


def test_baseline_folder_or_another_export(export, dense_folder):
    result = bench(export, baseline=str(dense_folder), batches=[1], prompt=4, new_tokens=2, repeats=1)
    assert result["baseline"]["kind"] == "folder" and result["baseline"]["weights"] == "pretrained"
    result = bench(export, baseline=str(export), batches=[1], prompt=4, new_tokens=2, repeats=1)
    assert result["baseline"]["kind"] == "export" and result["baseline"]["source"] == str(export)
    assert result["baseline"]["dtype"] == result["export"]["dtype"]  # both as load_compressed chooses


def structured_export(path: Path, **kwargs) -> Path:
    model = tiny_model("llama")
    arch = get_architecture(model)
    gates = attach_gates(model, resolve_blocks(model, arch), ["heads"], layer_parameter_count(model, arch))
    with torch.no_grad():
        gates.gates["heads"].log_alpha.fill_(10.0)
        gates.gates["heads"].log_alpha[0] = -10.0
    return save_compressed(model.eval(), path, **kwargs)


def test_a_structured_export_needs_a_recorded_base_model_or_baseline_dir(tmp_path, dense_folder, capsys):
    path = structured_export(tmp_path / "sliced")
    with pytest.raises(SystemExit) as exit_:
        main([str(path), *ARGS, "--json", str(tmp_path / "out.json")])
    assert exit_.value.code == 2 and not (tmp_path / "out.json").exists()
    assert "--baseline: " in capsys.readouterr().err and "pass --baseline <dir>" in str(
        pytest.raises(BenchError, bench, path).value
    )
    result = bench(path, baseline=str(dense_folder), batches=[1], prompt=4, new_tokens=2, repeats=1)
    assert result["export"]["techniques"] == ["structured"] and result["baseline"]["kind"] == "folder"


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("extra", "argument"),
    [
        (["--batch", "1,x"], "--batch"),
        (["--batch", "0"], "--batch"),
        (["--batch", "2,2"], "--batch"),
        (["--threads", "0"], "--threads"),
        (["--prompt", "0"], "--prompt"),
        (["--repeats", "-1"], "--repeats"),
        (["--cache", "paged"], "--cache"),
        (["--prompt", "62"], "--prompt"),  # + 3 new tokens > the context of 64
        (["--baseline", "/nonexistent/dense"], "--baseline"),
    ],
)
def test_bad_arguments_exit_2_naming_the_argument(export, tmp_path, capsys, extra, argument):
    out = tmp_path / "out.json"
    with pytest.raises(SystemExit) as exit_:
        main([str(export), *ARGS, *extra, "--json", str(out)])
    assert exit_.value.code == 2 and argument in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_missing_or_unreadable_export_dir(tmp_path, capsys):
    for folder in (tmp_path / "missing", tmp_path):  # no such folder; a folder without a manifest
        with pytest.raises(SystemExit) as exit_:
            main([str(folder), *ARGS])
        assert exit_.value.code == 2 and "EXPORT_DIR" in capsys.readouterr().err
