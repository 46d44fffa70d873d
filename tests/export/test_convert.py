"""One converter command (``python -m lightcook.export``) and ``report.formats``: a real run's export
written as compressed-tensors, GGUF or a lightcook copy, opened by transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightcook.app import train
from lightcook.export import load_compressed, save_compressed
from lightcook.export.convert import GGUF_FILE, convert, main
from lightcook.ops.slicing import BlockPlan, slice_model
from tests.helpers import REPO
from tests.helpers.quant_sparsity import tiny_hf

IDS = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))  # in every vocabulary here


@pytest.fixture(scope="module")
def w4_run(tmp_path_factory) -> dict:
    """A real tiny W4 group-32 QAT run that also writes both ecosystem formats at fit end."""
    from lightcook.app import compose_config

    out = tmp_path_factory.mktemp("runs")
    cfg = compose_config(
        [
            "model=tiny_llama",
            "trainer=fast",
            "+compress=[quant]",
            "compress.quant.bits=4",
            "compress.quant.granularity=group",
            "compress.quant.group_size=32",
            "compress.quant.activations=none",
            "validate_before=false",
            "report.formats=[compressed-tensors,gguf]",
            "report=fast",
            f"paths.output_dir={out}",
        ]
    )
    return train(cfg)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


def test_report_formats_are_written_reloaded_with_transformers_and_scored(w4_run) -> None:
    run = Path(w4_run["run_dir"])
    report = json.loads((run / "report.json").read_text())
    own = load_compressed(run / "compressed", dtype=torch.float32, backend="reference")
    for fmt, folder in (("compressed-tensors", run / "compressed-tensors"), ("gguf", run / "gguf")):
        entry = report["formats"][fmt]
        assert entry["error"] is None and entry["path"] == str(folder) and entry["bytes"] > 0
        assert w4_run["exports"][fmt] == str(folder)
        # the score is that of the folder as transformers loads it, on the report's batches
        assert entry["ppl"] == pytest.approx(report["ppl"]["export"], rel=0.01)
    ct = AutoModelForCausalLM.from_pretrained(run / "compressed-tensors")
    assert torch.allclose(_logits(ct), _logits(own), atol=1e-4)
    gguf = AutoModelForCausalLM.from_pretrained(run / "gguf", gguf_file=GGUF_FILE)
    assert (_logits(gguf) - _logits(own)).abs().max() < 2e-2  # fp16 block scales, bf16 embedding
    # the tokenizer travels: in the compressed-tensors folder as files, in the GGUF as metadata
    source = AutoTokenizer.from_pretrained(run / "compressed", trust_remote_code=False)
    text = "Now is the winter of our discontent 1594"
    assert (
        AutoTokenizer.from_pretrained(run / "compressed-tensors")(text)["input_ids"]
        == source(text)["input_ids"]
    )
    rebuilt = AutoTokenizer.from_pretrained(run / "gguf", gguf_file=GGUF_FILE)
    assert rebuilt(text)["input_ids"] == source(text)["input_ids"]


def test_the_command_converts_a_run_directory(w4_run, tmp_path) -> None:
    run = w4_run["run_dir"]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightcook.export",
            run,
            "--format",
            "gguf",
            "--gguf-type",
            "q8_0",
            "--out",
            str(tmp_path / "g"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"wrote {tmp_path / 'g'} (gguf, " in done.stdout and " MB)" in done.stdout
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file=GGUF_FILE)
    own = load_compressed(Path(run) / "compressed", dtype=torch.float32, backend="reference")
    assert (_logits(loaded) - _logits(own)).abs().max() < 5e-2  # Q8_0 embedding (re-quantized: it was float)
    assert main([run, "--format", "lightcook", "--out", str(tmp_path / "copy")]) == 0
    assert torch.equal(_logits(load_compressed(tmp_path / "copy", backend="reference")), _logits(own))


def test_uniform_slices_convert_to_a_smaller_stock_config(tmp_path) -> None:
    """Even slices need no padding: the config's widths are the kept ones (uneven: test_hf_padding)."""
    net = tiny_hf(seed=2, hidden_size=64, intermediate_size=128)
    even = {f"model.layers.{i}.mlp": BlockPlan(kept=list(range(0, 128, 2))) for i in range(2)}
    sliced = slice_model(net, even).eval()
    src = save_compressed(sliced, tmp_path / "even", sliced=True)
    for fmt in ("compressed-tensors", "gguf"):
        out = convert(src, tmp_path / fmt, fmt, gguf_type="f32")
        extra = {"gguf_file": GGUF_FILE} if fmt == "gguf" else {}
        loaded = AutoModelForCausalLM.from_pretrained(out, **extra)
        assert loaded.config.intermediate_size == 64
        assert "padded" not in (getattr(loaded.config, "lightcook", None) or {})
        assert torch.allclose(_logits(loaded), _logits(sliced), atol=1e-5)


def test_bad_input_exits_2_with_the_reason_and_writes_nothing(tmp_path, capsys) -> None:
    from tests.export.codecs.test_moe import moefied
    from tests.helpers import TINY_LLAMA

    assert main([str(tmp_path / "nope"), "--format", "gguf", "--out", str(tmp_path / "o")]) == 2
    assert "nope: no such run directory or export folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no lightcook.json" in capsys.readouterr().err
    moe = save_compressed(moefied(TINY_LLAMA)[0], tmp_path / "moe")
    assert main([str(moe), "--format", "gguf", "--out", str(tmp_path / "o")]) == 2
    assert "GGUF cannot hold moe" in capsys.readouterr().err
    assert main([str(moe), "--format", "lightcook", "--out", str(moe)]) == 2
    assert "is the source export itself" in capsys.readouterr().err
    assert main([str(moe)]) == 2
    assert "--out DIR is required" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "moe"]
