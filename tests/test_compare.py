"""python -m lightcook.compare: run discovery (nested sweep folders), the table, the plots, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from lightcook.callbacks.quantization import QuantizationCallback
from lightcook.callbacks.report import CompressionReport
from lightcook.callbacks.sparsity import SparsityCallback
from lightcook.compare import COMPARE_MD, PPL_VS_BYTES, PPL_VS_SPEED, find_runs, load_run, main
from lightcook.modules import CausalLMModule
from tests.helpers import REPO, TINY_LLAMA, make_trainer, token_loader


def real_run(run_dir: Path) -> dict:
    """A run directory whose report.json the callback itself wrote (quant + 2:4, tiny Llama)."""
    report = CompressionReport(
        speed_batch=(1, 8), speed_repeats=1, plots=False, eval_batches=1, decode_tokens=2
    )
    callbacks = [QuantizationCallback(), SparsityCallback(mode="nm"), report]
    trainer = make_trainer(run_dir, callbacks, max_steps=2, limit_val_batches=1)
    trainer.fit(CausalLMModule(config=TINY_LLAMA, tokenizer=None), token_loader(2), token_loader(1, seed=1))
    return json.loads((run_dir / "report.json").read_text())


def fake_run(run_dir: Path, compress: list[str], ppl: float | None, size: int, speedup: float | None) -> None:
    run_dir.mkdir(parents=True)
    report = {
        "compress": compress,
        "techniques": [],
        "ppl": {"export": ppl, "val": 99.0},
        "bytes": {"measured": size, "estimated": size, "dense_fp32": 4_000_000},
        "speed": {
            "speedup_vs_bf16": speedup,
            "speedup_vs_fp32": speedup and 2 * speedup,
            "decode": {"speedup_vs_bf16": speedup and speedup / 2},
        },
    }
    (run_dir / "report.json").write_text(json.dumps(report))


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "multiruns" / "20250101-000000"
    fake_run(root / "10", ["kd"], 31.5, 4_000_000, 1.0)
    fake_run(root / "2", ["quant", "prune"], 40.25, 1_000_000, 1.8)
    fake_run(root / "1", ["moe"], None, 2_000_000, None)  # no export: falls back to the live ppl
    (root / "1" / "summary.json").write_text(json.dumps({"val_ppl_after": 50.0}))
    real_run(root / "0")
    return tmp_path / "multiruns"


def test_table_rows_and_plots(sweep, capsys):
    assert main([str(sweep)]) == 0
    lines = (sweep / COMPARE_MD).read_text().splitlines()
    rows = [line for line in lines if line.startswith("| 2025")]
    assert [row.split(" | ")[0] for row in rows] == [f"| 20250101-000000/{n}" for n in (0, 1, 2, 10)]
    assert rows[0].split(" | ")[1] == "prune+quant"  # canonical callback order
    assert rows[1] == "| 20250101-000000/1 | moe | 99.00 (live) | 2.000 MB | 2.00 x | n/a | n/a |"
    assert rows[2] == "| 20250101-000000/2 | quant+prune | 40.25 | 1.000 MB | 4.00 x | 1.80 x | 0.90 x |"
    assert rows[3] == "| 20250101-000000/10 | kd | 31.50 | 4.000 MB | 1.00 x | 1.00 x | 0.50 x |"
    for name in (PPL_VS_BYTES, PPL_VS_SPEED):
        path = sweep / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
        assert matplotlib.image.imread(path).shape[:2] == (550, 800)
    assert "wrote" in capsys.readouterr().out


def test_real_report_fields_are_read(sweep):
    run = load_run(sweep / "20250101-000000" / "0", sweep)
    report = json.loads((sweep / "20250101-000000" / "0" / "report.json").read_text())
    assert run.ppl == report["ppl"]["export"] and run.ppl_source == "export"
    assert run.bytes == report["bytes"]["measured"] and run.ratio_vs_fp32 > 1
    assert run.speedup_vs_bf16 == report["speed"]["speedup_vs_bf16"] > 0
    assert run.decode_speedup_vs_bf16 == report["speed"]["decode"]["speedup_vs_bf16"] > 0


def test_several_dirs_and_out(tmp_path):
    fake_run(tmp_path / "a" / "run", ["quant"], 30.0, 1_000_000, 2.0)
    fake_run(tmp_path / "b", ["prune"], 35.0, 2_000_000, 1.2)  # a run directory given directly
    assert (
        main(
            [
                str(tmp_path / "a"),
                str(tmp_path / "b"),
                str(tmp_path / "a"),
                "--out",
                str(tmp_path / "o"),
                "--quiet",
            ]
        )
        == 0
    )
    text = (tmp_path / "o" / COMPARE_MD).read_text()
    assert "| run | quant |" in text and "| b | prune |" in text and text.count("| quant |") == 1
    assert (tmp_path / "o" / PPL_VS_SPEED).is_file() and not (tmp_path / "a" / COMPARE_MD).exists()
    summary_only = tmp_path / "c"
    summary_only.mkdir()
    (summary_only / "report.json").write_text(json.dumps({"bytes": {"estimated": 10}}))
    (summary_only / "summary.json").write_text(json.dumps({"val_ppl_after": 12.0, "compress": ["kd"]}))
    run = load_run(summary_only)
    assert (run.name, run.techniques, run.ppl, run.ppl_source, run.bytes) == ("c", "kd", 12.0, "summary", 10)


def test_no_report_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"no report\.json found under .*empty"):
        main([str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match="missing is not a directory"):
        find_runs([tmp_path / "missing"])


def test_module_entry_point(tmp_path):
    fake_run(tmp_path / "r", ["quant"], 30.0, 1_000_000, 2.0)
    done = subprocess.run(
        [sys.executable, "-m", "lightcook.compare", str(tmp_path), "--quiet"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    empty = subprocess.run(
        [sys.executable, "-m", "lightcook.compare", str(tmp_path / "r" / "nothing")],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert empty.returncode == 1 and "is not a directory" in empty.stderr
