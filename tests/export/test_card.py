"""The model card: Hub front matter that parses, only the numbers given (computed right), loading
snippets that fit the format and compile, clear errors, an atomic write, and one real consumer
(huggingface_hub's ModelCard and transformers' from_pretrained on the same folder)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from lightcook.export.card import FORMATS, CardFacts, model_card, write_model_card

FULL = dict(
    base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
    techniques=("nm", "quantized", "kd"),
    recipe="2:4 SparseGPT start + W8A8 QAT + KD, 120 steps",
    command="python run.py +compress=[quant,prune,kd] trainer.max_steps=120",
    ppl=70.3,
    reference_ppl=52.61,
    reference="dense model fine-tuned with the same steps",
    bytes=172_500_000,
    dense_bytes=538_090_000,
    speed={"decode tok/s vs dense bf16": 1.52},
    notes=("2:4 stored dense (zeros): no sparse kernel in this format",),
    measured="2 CPU cores (EPYC Zen 4), 2026-12-04",
)


def facts(fmt: str, **kw) -> CardFacts:
    if fmt == "gguf":
        kw.setdefault("gguf_file", "smol-q8_0.gguf")
    return CardFacts(format=fmt, **kw)


def front_matter(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert match, card[:200]
    return yaml.safe_load(match.group(1))


def blocks(card: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)\n```$", card, re.S | re.M)


@pytest.mark.parametrize(
    ("fmt", "library", "format_tags"),
    [
        ("lightcook", "lightcook", []),
        ("compressed-tensors", "transformers", ["compressed-tensors"]),
        ("gguf", None, ["gguf"]),
        ("transformers", "transformers", []),
    ],
)
def test_front_matter_parses_with_the_tags_of_the_format(fmt, library, format_tags):
    meta = front_matter(model_card(facts(fmt, **FULL)))
    assert meta["base_model"] == FULL["base_model"]
    assert meta.get("library_name") == library
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["lightcook", "compressed", *format_tags, "nm-sparse", "quantized", "distillation"]


def test_technique_tags_and_no_base_model_key_when_unknown():
    meta = front_matter(
        model_card(facts("transformers", techniques=("structured", "moe", "kd", "structured")))
    )
    assert meta["tags"] == ["lightcook", "compressed", "pruned", "moe", "distillation"]
    assert "base_model" not in meta


def test_front_matter_values_round_trip_awkward_strings():
    base = "org/model: v2 # 'quoted' \"double\" — ünïcode"
    meta = front_matter(model_card(facts("compressed-tensors", base_model=base)))
    assert meta["base_model"] == base


def test_results_numbers_computed_right():
    card = model_card(facts("compressed-tensors", **FULL))
    assert "| Perplexity (held-out) | 70.30 |" in card
    assert "| Reference perplexity (dense model fine-tuned with the same steps) | 52.61 |" in card
    assert "| Perplexity vs reference | 1.34x |" in card  # 70.3 / 52.61 = 1.336
    assert "| Size on disk | 172.5 MB |" in card
    assert "| Dense fp32 size | 538.1 MB |" in card
    assert "| Compression vs dense fp32 | 3.12x |" in card  # 538.09 / 172.5 = 3.119
    assert "| decode tok/s vs dense bf16 | 1.52 |" in card
    assert "Measured on: 2 CPU cores (EPYC Zen 4), 2026-12-04" in card
    assert blocks(card, "bash")[0] == FULL["command"]
    assert "- 2:4 stored dense (zeros): no sparse kernel in this format" in card
    assert "- **Recipe:** 2:4 SparseGPT start + W8A8 QAT + KD, 120 steps" in card
    assert "knowledge distillation from the dense model" in card


def test_small_folders_in_mb_with_three_decimals():
    card = model_card(facts("transformers", bytes=54_321, dense_bytes=217_284))
    assert "| Size on disk | 0.054 MB |" in card and "| Compression vs dense fp32 | 4.00x |" in card


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_numbers_are_absent(fmt):
    card = model_card(facts(fmt))
    assert "| Perplexity (held-out) | not measured |" in card
    for absent in (
        "None",
        "nan",
        "inf",
        "Reference perplexity",
        "vs reference",
        "MB",
        "Measured on",
        "## Notes",
    ):
        assert absent not in card, absent
    assert "## How it was made" not in card
    table = [line for line in card.splitlines() if line.startswith("| ")]
    assert table == ["| Metric | Value |", "| Perplexity (held-out) | not measured |"]


def test_reference_without_ppl_shows_no_ratio():
    card = model_card(facts("transformers", reference_ppl=52.61, dense_bytes=1_000_000))
    assert "| Reference perplexity | 52.61 |" in card and "not measured" in card
    assert "vs reference" not in card and "Compression" not in card and "Size on disk" not in card


@pytest.mark.parametrize(
    ("fmt", "present", "absent"),
    [
        (
            "lightcook",
            [
                "from lightcook.export import load_compressed",
                "load_compressed(path)",
                "from_pretrained(path, trust_remote_code=True)",
                'python -m lightcook.export "$path" --format compressed-tensors --out',
            ],
            ["vllm", "gguf_file"],
        ),
        (
            "compressed-tensors",
            [
                "pip install transformers compressed-tensors",
                "from_pretrained(path)",
                'vllm serve "$path"',
                "LLM(model=path",
            ],
            ["trust_remote_code", "load_compressed", "gguf_file"],
        ),
        (
            "gguf",
            [
                'llama-cli -m "$path/smol-q8_0.gguf"',
                'llama-server -m "$path/smol-q8_0.gguf"',
                'Llama(model_path=f"{path}/smol-q8_0.gguf")',
                'from_pretrained(path, gguf_file="smol-q8_0.gguf")',
                "pip install transformers gguf",
            ],
            ["trust_remote_code", "load_compressed", "vllm"],
        ),
        (
            "transformers",
            ["AutoModelForCausalLM.from_pretrained(path)"],
            ["trust_remote_code", "vllm", "gguf_file"],
        ),
    ],
)
def test_loading_snippets_fit_the_format(fmt, present, absent):
    card = model_card(facts(fmt, techniques=("quantized",)))
    how = card.split("## How to load", 1)[1]
    for text in present:
        assert text in how, text
    for text in absent:
        assert text not in how, text
    for code in blocks(card, "python"):
        compile(code, f"<{fmt} card>", "exec")  # every Python snippet is valid Python
    if shutil.which("bash"):
        for code in blocks(card, "bash"):
            subprocess.run(["bash", "-n", "-c", code], check=True)


def test_lightcook_folder_of_another_shape_offers_no_conversion():
    card = model_card(facts("lightcook", techniques=("structured", "moe")))
    assert "python -m lightcook.export" not in card
    assert "holds MoEfication" in card
    sliced = model_card(facts("lightcook", techniques=("structured",)))  # uniform slices convert
    assert "python -m lightcook.export" in sliced


def test_command_with_backticks_gets_a_longer_fence():
    card = model_card(facts("transformers", command="echo ```x``` `date`"))
    assert "````bash\necho ```x``` `date`\n````" in card


def test_pipes_in_table_cells_are_escaped():
    card = model_card(facts("transformers", reference_ppl=10.0, reference="a | b", speed={"x|y": 2.0}))
    assert "| Reference perplexity (a \\| b) | 10.00 |" in card and "| x\\|y | 2.00 |" in card


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (
            dict(format="onnx"),
            r"format: 'onnx' is not one of 'lightcook', 'compressed-tensors', 'gguf', 'transformers'",
        ),
        (dict(format="gguf"), r"gguf_file: format 'gguf' needs"),
        (dict(format="gguf", gguf_file="sub/model.gguf"), r"gguf_file: must be a bare file name"),
        (dict(format="gguf", gguf_file="model.bin"), r"gguf_file: must be a bare file name ending in \.gguf"),
        (dict(format="transformers", gguf_file="m.gguf"), r"gguf_file: only for format 'gguf'"),
        (dict(format="transformers", bytes=-1), r"bytes: must be a positive whole number of bytes, got -1"),
        (dict(format="transformers", dense_bytes=0), r"dense_bytes: must be a positive"),
        (dict(format="transformers", bytes=1.5), r"bytes: must be a positive whole number"),
        (dict(format="transformers", ppl=0.0), r"ppl: must be a positive finite perplexity, got 0.0"),
        (dict(format="transformers", ppl=-3.0), r"ppl: must be a positive"),
        (
            dict(format="transformers", ppl=float("nan")),
            r"ppl: must be a positive finite perplexity, got nan",
        ),
        (
            dict(format="transformers", reference_ppl=float("inf")),
            r"reference_ppl: must be a positive finite",
        ),
        (
            dict(format="transformers", techniques=("quant",)),
            r"techniques: unknown 'quant'; known: 'quantized'",
        ),
        (dict(format="transformers", techniques="kd"), r"techniques: must be a tuple of strings"),
        (dict(format="transformers", notes="one note"), r"notes: must be a tuple of strings"),
        (dict(format="transformers", speed={"decode": float("nan")}), r"speed: 'decode' must be a positive"),
        (dict(format="transformers", base_model=""), r"base_model: must be a non-empty string"),
        (dict(format="transformers", recipe="a\nb"), r"recipe: must be one line"),
    ],
)
def test_bad_facts_name_the_field(kw, message):
    with pytest.raises(ValueError, match=message):
        CardFacts(**kw)


def test_write_is_atomic_and_leaves_only_the_card(tmp_path):
    (tmp_path / "README.md").write_text("old card")
    path = write_model_card(tmp_path, facts("gguf", **FULL))
    assert path == tmp_path / "README.md"
    assert path.read_text() == model_card(facts("gguf", **FULL))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]  # no temporary file left


def test_write_refuses_a_missing_folder_or_a_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such export folder"):
        write_model_card(tmp_path / "missing", facts("transformers"))
    assert not (tmp_path / "missing").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        write_model_card(tmp_path / "file", facts("transformers"))


def test_real_consumers_read_the_folder_with_its_card(tmp_path):
    """huggingface_hub parses the card's metadata; transformers still loads the folder beside it."""
    import torch
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    given = CardFacts(
        format="transformers",
        base_model="HuggingFaceTB/SmolLM2-135M",
        techniques=("structured", "kd"),
        ppl=31.5,
    )
    write_model_card(tmp_path, given)

    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert card.data.tags == ["lightcook", "compressed", "pruned", "distillation"]
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert "| Perplexity (held-out) | 31.50 |" in card.text

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits)
