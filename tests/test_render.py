"""lightcook.render: markdown tables, the report text (speed and decode rows), the docs section
writer, machine sentence, and the figures (expert-load heatmap contents and labels, atomic PNG
output, curves, scatter, bad input)."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.image import imread

from lightcook.render import (
    curves_figure,
    expert_load_figure,
    machine_line,
    report_markdown,
    save_figure,
    scatter_figure,
    short_name,
    table,
    write_section,
)


def test_expert_load_heatmap_shows_load_over_layer_mean_with_labels(tmp_path):
    fig = expert_load_figure(
        [[3, 1, 0, 0], [1, 1, 1, 1]], ["model.layers.0.mlp", "model.layers.1.mlp"], "val"
    )
    ax = fig.axes[0]
    shares = np.asarray(ax.images[0].get_array())
    assert np.allclose(shares, [[3, 1, 0, 0], [1, 1, 1, 1]])  # the layer means are 1 here
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("expert", "FFN layer")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0.mlp", "1.mlp"]
    assert "val" in ax.get_title() and fig.axes[1].get_ylabel() == "tokens / layer mean"  # colour bar
    (tmp_path / "sub").mkdir()
    path = save_figure(fig, tmp_path / "sub" / "load.png")
    image = imread(path)
    assert image.shape[:2] == (300, 600) and image.std() > 0.05  # drawn, not blank
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["load.png"]  # no temp file left


@pytest.mark.parametrize(
    ("tokens", "names", "match"),
    [
        ([], [], "non-empty rows of equal length"),
        ([[1.0, 2.0], [3.0]], ["a", "b"], "non-empty rows of equal length"),
        ([[1.0, 2.0]], ["a", "b"], "2 layer names for 1 rows"),
    ],
)
def test_expert_load_figure_rejects_bad_input(tokens, names, match):
    with pytest.raises(ValueError, match=match):
        expert_load_figure(tokens, names, "x")


def test_short_name_abbreviates_block_modules():
    assert short_name("decoder.block.1.layer.0.SelfAttention.q") == "dec.1.l.0.attn.q"
    assert short_name("lm_head") == "lm_head"


def test_table_alignment_and_bad_rows():
    assert table(["a", "b", "c"], [[1, "x", None]], "lrr") == [
        "| a | b | c |",
        "|---|---:|---:|",
        "| 1 | x | None |",
    ]
    with pytest.raises(ValueError, match="2 cells for 3 columns"):
        table(["a", "b", "c"], [[1, 2]])
    with pytest.raises(ValueError, match="align 'lx'"):
        table(["a", "b"], [], "lx")


def _report(decode: dict | None) -> dict:
    speed = {
        "measured": True,
        "batch": [2, 16],
        "tokens": 16,
        "threads": 2,
        "device": "cpu",
        "seconds": {"compressed": 0.001, "dense_fp32": 0.002, "dense_bf16": 0.004},
        "speedup_vs_fp32": 2.0,
        "speedup_vs_bf16": 4.0,
        "note": None,
        "decode": decode,
    }
    return {
        "run_dir": "/r",
        "step": 4,
        "model": "LlamaForCausalLM",
        "techniques": ["quantized"],
        "callbacks": {"compress.quant": {"class": "QuantizationCallback", "state": {}}},
        "export_dir": "/r/compressed",
        "export_error": None,
        "bytes": {
            "measured": 2e6,
            "estimated": 1.9e6,
            "tensors_measured": 1.9e6,
            "dense_fp32": 8e6,
            "compression_ratio": 4.0,
        },
        "bits_per_weight": 8.5,
        "sparsity": 0.0,
        "ffn_fraction": 1.0,
        "ppl": {
            "val": 30.0,
            "live": 31.0,
            "export": 31.01,
            "eval_batches": 2,
            "eval_tokens": 60,
            "note": None,
        },
        "speed": speed,
        "history": [
            {
                "step": 2,
                "val_ppl": 33.0,
                "bytes_estimated": 1.9e6,
                "bits_per_weight": 8.5,
                "sparsity": 0.0,
                "ffn_fraction": 1.0,
            }
        ],
        "plots": ["report_layers.png"],
    }


def test_report_markdown_has_forward_and_decode_rows():
    decode = {
        "measured": True,
        "new_tokens": 8,
        "prompt_tokens": 16,
        "tokens_per_second": {"compressed": 100.0, "dense_fp32": 50.0, "dense_bf16": 25.0},
        "speedup_vs_fp32": 2.0,
        "speedup_vs_bf16": 4.0,
        "note": None,
    }
    lines = report_markdown(_report(decode)).splitlines()
    assert lines[0] == "# Compression report"
    assert (
        "| forward, 2x16 tokens, 2 threads, cpu: export / dense fp32 / dense bf16 | 1.00 ms / 2.00 ms / 4.00 ms |"
        in lines
    )
    assert (
        "| decode, batch 1, 8 new tokens after 16: export / dense fp32 / dense bf16 "
        "| 100.0 tokens/s / 50.0 tokens/s / 25.0 tokens/s |"
    ) in lines
    assert "| decode speedup vs dense fp32 / bf16 | 2.00 x / 4.00 x |" in lines
    assert "| 2 | 33.00 | 1.900 MB | 8.50 | 0.0 % | 100.0 % |" in lines
    assert "![report_layers.png](report_layers.png)" in lines


def test_report_markdown_without_decode_says_why():
    text = report_markdown(_report({"measured": False, "note": "encoder-decoder: not timed"}))
    assert "decode speedup" not in text and "Note: decode: encoder-decoder: not timed" in text
    assert "decode" not in report_markdown(_report(None))


def test_write_section_replaces_only_its_section(tmp_path):
    doc = tmp_path / "docs" / "bench.md"
    write_section(doc, "## A", "## A\n\nfirst\n")
    write_section(doc, "## B", "## B\n\nsecond\n")
    write_section(doc, "## A", "## A\n\nthird\n")
    text = doc.read_text()
    assert text.startswith("# Benchmarks") and text.index("## A") < text.index("## B")
    assert "third" in text and "second" in text and "first" not in text and text.endswith("second\n")


def test_machine_line_with_gpu_and_without_load():
    facts = {
        "cpu": "X",
        "isa": [],
        "physical_cores": None,
        "logical_cores": 8,
        "torch_threads": 4,
        "load_average": None,
        "cuda": "NVIDIA H200",
        "torch": "2",
        "python": "3",
        "date": "d",
    }
    assert (
        machine_line(facts)
        == "X, 8 logical cores, 4 torch threads, load average n/a, GPU NVIDIA H200; torch 2, Python 3; d."
    )


def test_curves_and_scatter_figures(tmp_path):
    fig = curves_figure(
        {"plain": [(0, 40.0), (10, 30.0)], "kd": [(0, 40.0), (10, 25.0)]},
        xlabel="step",
        ylabel="ppl",
        title="t",
        hline=(20.0, "dense"),
    )
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["plain", "kd", "dense"]
    assert list(ax.get_lines()[1].get_ydata()) == [40.0, 25.0] and ax.get_ylim()[0] == 0
    fig = scatter_figure(
        [(1.0, 30.0, "a"), (10.0, 20.0, "b")],
        xlabel="MB",
        ylabel="ppl",
        title="s",
        log_x=True,
        vline=(1.0, "ref"),
    )
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and [t.get_text() for t in ax.texts] == ["a", "b"]
    assert imread(save_figure(fig, tmp_path / "s.png")).shape[:2] == (550, 800)
    empty = scatter_figure([], xlabel="x", ylabel="y", title="e").axes[0]
    assert [t.get_text() for t in empty.texts] == ["no run measured this"]
