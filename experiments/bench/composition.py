"""Benchmark the techniques composed, BMCook-style: dense, D, P+D, P+D+Q, P+D+Q+M on one budget (CPU).

Every row is one run of the Hydra app (``lightcook.app.train``) in this process, one after the
other, with the same training budget: the same steps, learning rate, data, block and batch size and
seed. D = distillation from the starting model (``kd``), P = pruning (``--pruning structured``: CoFi
gates towards ``--structured-target`` of the layer parameters; ``--pruning nm``: 2:4 masks, Wanda
criterion), Q = int8 quantization-aware training (``quant``, default settings), M = MoEfication with
25% of the experts per token (``moe``, 32 experts, top 8). Each row then ships one model folder —
the combined compressed export (``summary["exports"]["compressed"]``, reloaded with
``load_compressed``) for rows with compression, the fp32 ``save_pretrained`` folder for the dense and
D rows — and the script measures on that shipped model:

1. held-out perplexity on the same fixed Shakespeare validation batches for every row;
2. the bytes of the folder on disk;
3. forward speed on CPU (random token ids, ``torch.inference_mode``), interleaved in one call with
   the dense model cast to bfloat16 (the baseline) and the dense fp32 model; medians after a warm-up.

It prints the table, writes ``<out>/composition.json`` with every number, and rewrites the
``## Composition`` section of docs/benchmarks.md (``--docs``; other sections are kept).

    .venv/bin/python experiments/bench/composition.py                      # SmolLM2: minutes of CPU per row
    .venv/bin/python experiments/bench/composition.py --pruning nm         # P = 2:4 (Wanda) instead
    .venv/bin/python experiments/bench/composition.py --model tiny_llama --steps 3 --eval-batches 2 \\
        --out /tmp/comp_smoke --docs /tmp/comp_smoke/benchmarks.md         # smoke run: seconds
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import shlex
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from _common import BENCHMARKS_MD
from omegaconf import OmegaConf

from lightcook.app import CONFIG_DIR, build_datamodule, build_module, compose_config, train
from lightcook.io import write_json_atomic
from lightcook.measure import bytes_on_disk, interleaved, machine, perplexity
from lightcook.render import machine_line, table, write_section

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Composition"
#: Structured-pruning units: all four without MoE; with MoE no single neurons (experts stay equal-sized).
UNITS = "[heads,neurons,attention_layers,ffn_layers]"
UNITS_WITH_MOE = "[heads,attention_layers,ffn_layers]"
#: MoE settings for the tiny random models (FFN 128 wide): still 25% of the experts per token.
TINY_MOE = [
    "compress.moe.num_experts=4",
    "compress.moe.top_k=1",
    "compress.moe.calibration_batches=2",
    "compress.moe.router_steps=5",
]
#: The rows: name -> (label, techniques with P standing for the chosen pruning).
ROWS = {
    "dense": ("dense (plain fine-tune)", []),
    "D": ("D: distillation", ["kd"]),
    "P+D": ("P+D", ["P", "kd"]),
    "P+D+Q": ("P+D+Q", ["P", "kd", "quant"]),
    "P+D+Q+M": ("P+D+Q+M", ["P", "kd", "quant", "moe"]),
}
PRUNING = {"structured": "structured", "nm": "prune"}
#: Techniques with their own export folder (the combined export of the report replaces them here).
EXPORTS = ("structured", "prune", "quant", "moe")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", help="conf/model/ entry (tiny_llama for smoke runs)")
    parser.add_argument(
        "--pruning",
        choices=sorted(PRUNING),
        default="structured",
        help="P: structured (CoFi gates: heads, neurons, blocks) or nm (2:4 masks, Wanda)",
    )
    parser.add_argument("--structured-target", type=float, default=0.5, help="structured target sparsity")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of every row")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (model.lr) of every row")
    parser.add_argument("--block-size", type=int, default=128, help="tokens per row (data.block_size)")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per training batch (data.batch_size)")
    parser.add_argument("--eval-batches", type=int, default=16, help="held-out validation batches for ppl")
    parser.add_argument("--speed-batch", type=int, default=1, help="rows of the timed forward pass")
    parser.add_argument("--speed-seq", type=int, default=256, help="tokens per row of the timed forward pass")
    parser.add_argument("--repeats", type=int, default=10, help="interleaved timed forwards per model")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, all)")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VAL",
        help="extra Hydra override for every row (repeatable); compress.<name>.* only where <name> runs",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "outputs" / "bench" / "composition", help="run dirs"
    )
    parser.add_argument("--docs", type=Path, default=BENCHMARKS_MD, help="markdown file to update")
    parser.add_argument("--no-docs", action="store_true", help="print and write the JSON only")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- overrides


def report_overrides() -> list[str]:
    """Turn off the report callback's own timing, scoring and plots (this script measures), for the
    keys that its config has (none when conf/report/default.yaml does not exist)."""
    path = CONFIG_DIR / "report" / "default.yaml"
    if not path.is_file():
        return []
    keys = OmegaConf.load(path).keys()
    wanted = {"measure_speed": "false", "eval_batches": "0", "plots": "false"}
    return [f"report.{k}={v}" for k, v in wanted.items() if k in keys]


def common_overrides(args: argparse.Namespace) -> list[str]:
    """What every row shares: model, budget, data, no checkpoints, no validation during the fit."""
    return [
        f"model={args.model}",
        f"trainer.max_steps={args.steps}",
        "trainer.limit_val_batches=0",
        f"model.lr={args.lr}",
        f"data.block_size={args.block_size}",
        f"data.batch_size={args.batch_size}",
        "callbacks=none",
        "logger=csv",
        "validate_before=false",
        "ckpt_path=null",
        *report_overrides(),
    ]


def techniques(row: str, pruning: str) -> list[str]:
    return [PRUNING[pruning] if t == "P" else t for t in ROWS[row][1]]


def technique_overrides(names: list[str], args: argparse.Namespace) -> list[str]:
    """Settings of each technique in a row (the defaults of conf/compress/ otherwise). Rows with
    compression ship only the combined export: the per-technique exports, the MoE plot and the app's
    ``<run_dir>/model`` copy of the live network are turned off (time and disk, not results); a
    technique without an ``export_dir`` key in its conf/compress/ file has no export of its own."""
    out = [f"+compress=[{','.join(names)}]"] if names else []
    shipped = [n for n in names if n in EXPORTS]
    if shipped:
        own = [n for n in shipped if "export_dir" in OmegaConf.load(CONFIG_DIR / "compress" / f"{n}.yaml")]
        out += ["save_model=false", *(f"compress.{n}.export_dir=null" for n in own)]
    if "structured" in names:
        end = max(1, round(0.6 * args.steps))
        out += [
            f"compress.structured.target_sparsity={args.structured_target}",
            f"compress.structured.end_step={end}",
            f"compress.structured.units={UNITS_WITH_MOE if 'moe' in names else UNITS}",
        ]
    if "prune" in names:
        out += ["compress.prune.n=2", "compress.prune.m=4", "compress.prune.criterion=wanda"]
    if "moe" in names:
        out += ["compress.moe.plot=false", *(TINY_MOE if args.model.startswith("tiny") else [])]
    return out


def applies(override: str, names: list[str]) -> bool:
    """A ``compress.<name>.*`` override only where ``<name>`` runs; any other override everywhere."""
    key = override.split("=", 1)[0].lstrip("+~")
    parts = key.split(".")
    return parts[0] != "compress" or (len(parts) > 1 and parts[1] in names)


def row_overrides(row: str, args: argparse.Namespace) -> list[str]:
    names = techniques(row, args.pruning)
    run_dir = (args.out / row).resolve()
    return [
        *common_overrides(args),
        *technique_overrides(names, args),
        *(o for o in args.override if applies(o, names)),
        f"paths.run_dir={run_dir}",
    ]


# --------------------------------------------------------------------------- runs


def held_out(args: argparse.Namespace) -> list[dict]:
    """The fixed validation batches every row is scored on (the app's data, same overrides)."""
    cfg = compose_config(row_overrides("dense", args))
    datamodule = build_datamodule(cfg, build_module(cfg))
    datamodule.setup("validate")
    batches = list(itertools.islice(datamodule.val_dataloader(), args.eval_batches))
    if len(batches) < args.eval_batches:
        print(f"[composition] only {len(batches)} validation batches available", file=sys.stderr)
    return batches


def shipped_folder(row: str, names: list[str], summary: dict[str, Any]) -> Path:
    """The folder the row ships: the combined export with compression, else the fp32 HF model."""
    if not any(n != "kd" for n in names):
        return Path(summary["run_dir"]) / "model"
    exports = summary.get("exports") or {}
    if "compressed" not in exports:
        raise RuntimeError(
            f"{row}: summary['exports'] has no 'compressed' entry (got {sorted(exports)}); the combined "
            "export comes from the report callback (conf/report/default.yaml, report.export_dir)"
        )
    error = run_report(summary).get("export_error")
    if error:
        raise RuntimeError(f"{row}: the combined export failed: {error}")
    return Path(exports["compressed"])


def run_report(summary: dict[str, Any]) -> dict[str, Any]:
    """The report callback's ``report.json`` of a run ({} when there is none)."""
    path = Path(summary["run_dir"]) / "report.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def load_shipped(folder: Path, compressed: bool) -> torch.nn.Module:
    if compressed:
        from lightcook.export import load_compressed

        return load_compressed(folder)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def structure_kept(manifest: dict[str, Any]) -> dict[str, int] | None:
    """Attention / FFN blocks and their units (KV groups, neurons) kept by structured pruning."""
    blocks = (manifest.get("structured") or {}).get("blocks")
    if not blocks:
        return None
    out: dict[str, int] = {}
    for kind in ("attention", "ffn"):
        mine = [b for b in blocks.values() if b["kind"] == kind]
        out[f"{kind}_blocks"] = len(mine)
        out[f"{kind}_kept"] = sum(not b["removed"] for b in mine)
        out[f"{kind}_units_kept"] = sum(b["units"] for b in mine)
    return out


def structured_state(summary: dict[str, Any]) -> dict[str, Any]:
    """The structured-pruning callback's state at the end of the run, from ``report.json``."""
    entries = run_report(summary).get("callbacks", {}).values()
    return next((e.get("state", {}) for e in entries if e.get("class") == "StructuredPruningCallback"), {})


def run_row(row: str, args: argparse.Namespace, val: list[dict]) -> dict[str, Any]:
    """Train one row through the app, reload what it ships, score its held-out perplexity."""
    names = techniques(row, args.pruning)
    overrides = row_overrides(row, args)
    cfg = compose_config(overrides)
    print(f"[composition] {row}: python run.py {shlex.join(overrides)}", flush=True)
    summary = train(cfg)
    folder = shipped_folder(row, names, summary)
    compressed = any(n != "kd" for n in names)
    model = load_shipped(folder, compressed)
    manifest = {}
    if compressed:
        from lightcook.export import read_manifest

        manifest = read_manifest(folder)
    return {
        "row": row,
        "label": ROWS[row][0],
        "techniques": names,
        "overrides": overrides,
        "compress_config": OmegaConf.to_container(cfg.compress, resolve=True) if names else {},
        "warmup_steps": cfg.model.get("warmup_steps"),
        "folder": str(folder),
        "format": "lightcook compressed export" if compressed else "HF save_pretrained, fp32 safetensors",
        "bytes": bytes_on_disk(folder),
        "manifest_techniques": manifest.get("techniques"),
        "weight_bytes": manifest.get("weight_bytes"),
        "fp32_weight_bytes": manifest.get("fp32_weight_bytes"),
        "structure": structure_kept(manifest),
        "structured_frozen_at": structured_state(summary).get("frozen_at", "n/a"),
        "ppl": perplexity(model, val).value,
        "train_steps": summary.get("train_steps"),
        "fit_seconds": summary.get("fit_seconds"),
        "train_tokens_per_second": summary.get("train_tokens_per_second"),
        "model": model,
    }


def bf16_baseline(dense: torch.nn.Module, out: Path, val: list[dict]) -> dict[str, Any]:
    """The dense fine-tuned model cast to bfloat16: the speed baseline (saved to count its bytes)."""
    model = copy.deepcopy(dense).to(torch.bfloat16).eval()
    folder = (out / "dense-bf16").resolve()
    model.save_pretrained(folder)
    return {
        "row": "dense-bf16",
        "label": "dense cast to bf16 (speed baseline)",
        "folder": str(folder),
        "format": "HF save_pretrained, bf16 safetensors",
        "bytes": bytes_on_disk(folder),
        "ppl": perplexity(model, val).value,
        "model": model,
    }


def forward_speed(
    models: dict[str, torch.nn.Module], args: argparse.Namespace, vocab: int
) -> dict[str, float]:
    """Median forward seconds of each model on random ids, all interleaved in one call."""
    ids = torch.randint(
        0, vocab, (args.speed_batch, args.speed_seq), generator=torch.Generator().manual_seed(0)
    )
    with torch.inference_mode():
        fns = {name: partial(model.eval(), input_ids=ids) for name, model in models.items()}
        return interleaved(fns, args.repeats)


# --------------------------------------------------------------------------- report


def megabytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def table_row(r: dict[str, Any], dense: dict[str, Any], base_s: float) -> list[str]:
    return [
        r["label"],
        f"{r['ppl']:.2f}",
        f"{r['ppl'] / dense['ppl']:.3f}x",
        f"{megabytes(r['bytes'])} ({r['bytes'] / dense['bytes']:.2f}x)",
        f"**{base_s / r['seconds']:.2f}x**",
    ]


def shipped_line(r: dict[str, Any]) -> str:
    """One note per compressed row: what the export holds."""
    parts = [f"techniques in the export: {', '.join(r['manifest_techniques'] or []) or 'none'}"]
    if r.get("weight_bytes"):
        parts.append(
            f"Linear weights of the blocks (LM head, embeddings and routers not included) {megabytes(r['weight_bytes'])} vs "
            f"{megabytes(r['fp32_weight_bytes'])} in fp32"
        )
    s = r.get("structure")
    if s:
        parts.append(
            f"kept {s['attention_kept']}/{s['attention_blocks']} attention blocks ({s['attention_units_kept']} "
            f"KV groups), {s['ffn_kept']}/{s['ffn_blocks']} FFN blocks ({s['ffn_units_kept']:,} neurons)"
        )
        frozen = r.get("structured_frozen_at")
        if frozen != "n/a":
            parts.append(
                "target not met (gates never froze)"
                if frozen is None
                else f"target met, gates frozen at step {frozen}"
            )
    return f"- {r['row']}: " + "; ".join(parts) + f"; fit {r['fit_seconds']} s."


def pruning_note(args: argparse.Namespace, rows: list[dict[str, Any]]) -> str:
    if args.pruning == "nm":
        return (
            "P = `prune`: 2:4 masks on every transformer-block Linear, criterion `wanda` (|W| x input-activation "
            "norm), set at step 0 and held after every optimizer step; the export packs kept values + 2-bit "
            "positions (integer codes when also quantized)."
        )
    config = next(r["compress_config"]["structured"] for r in rows if "structured" in r["compress_config"])
    return (
        f"P = `structured`: CoFi-style hard-concrete gates + Lagrangian towards target sparsity "
        f"{args.structured_target} of the layer parameters, target rising linearly to step "
        f"{config['end_step']} (~60% of the steps), gates frozen once met; units {UNITS} in P+D and P+D+Q, "
        f"{UNITS_WITH_MOE} in P+D+Q+M (MoE experts must stay equal-sized, so single FFN neurons cannot be "
        "pruned there; the app refuses that combination). The export is physically sliced."
    )


def render(args, rows: list[dict], baseline: dict, speed: dict, info: dict, argv: list[str]) -> str:
    dense = rows[0]
    base_s = speed[baseline["row"]]
    moe = next((r["compress_config"]["moe"] for r in rows if "moe" in r["compress_config"]), None)
    kd = next((r["compress_config"]["kd"] for r in rows if "kd" in r["compress_config"]), None)
    quant = next((r["compress_config"]["quant"] for r in rows if "quant" in r["compress_config"]), None)
    val_tokens = info["eval_rows"] * (info["eval_block"] - 1)
    lines = [
        SECTION,
        "",
        f"Command: `{shlex.join(['.venv/bin/python', 'experiments/bench/composition.py', *argv])}`",
        f"Machine (at the end): {machine_line(info['machine'])} Wall time: {info['wall_seconds']:.0f} s.",
        f"Model: `{args.model}`; data: Shakespeare (held-out plays for evaluation). Same budget in every row: "
        f"{args.steps} AdamW steps, lr {args.lr} (warmup {dense['warmup_steps']}, cosine), block {args.block_size}, "
        f"batch {args.batch_size}, seed 0, same data order. P = **{args.pruning}**.",
        "",
        *table(
            ["model", "ppl", "relative to dense", "exported bytes", "measured forward speedup vs bf16 (CPU)"],
            [table_row(r, dense, base_s) for r in [dense, baseline, *rows[1:]]],
            "lrrrr",
        ),
        "",
        "Notes:",
        "",
        f"- {pruning_note(args, rows)}",
        f"- D = `kd`: teacher = the starting model (teacher `{kd['teacher']}`, dtype {kd['teacher_dtype'] or 'fp32'}), "
        f"loss = {kd['task_scale']} x task + {kd['logits_scale']} x T^2 KL(teacher || student) at T={kd['temperature']}."
        if kd
        else "- D: not run.",
        f"- Q = `quant`: {quant['bits']}-bit {quant['granularity']} {quant['method']} weights, activations "
        f"{quant['activations']} ({quant['act_bits']}-bit), fake-quantized during training; exported as real int8 "
        "codes + scales and reloaded on the int8 GEMM (`torch._int_mm`)."
        if quant
        else "- Q: not run.",
        f"- M = `moe`: {moe['num_experts']} experts per FFN, top {moe['top_k']} per token "
        f"({moe['top_k'] / moe['num_experts']:.0%} of the FFN), split `{moe['split']}` at step {moe['split_step']}"
        f"{' (ReLU-fied: ReLU in place of SiLU from step 0, dense before the split)' if moe.get('relufy') else ''}, "
        f"router `{moe['router']}`; the reloaded model computes only the routed experts."
        if moe
        else "- M: not run.",
        f"- ppl: token-weighted perplexity of the **shipped** model (reloaded from its folder, not the live "
        f"training model) over the same {info['eval_batches']} held-out validation batches in every row "
        f"({info['eval_rows']} rows x {info['eval_block'] - 1} predicted tokens = {val_tokens:,} tokens). "
        "Relative to dense = ppl / dense ppl.",
        "- Exported bytes: every file in the shipped folder (MB = 10^6 bytes; ratio vs dense in brackets). Dense "
        "and D ship the app's `<run_dir>/model` (`save_pretrained`, fp32 safetensors); compressed rows ship the "
        "combined export `summary['exports']['compressed']` (manifest + safetensors + config), loaded with "
        "`load_compressed`; the bf16 baseline row is the dense model cast and saved with `save_pretrained`.",
        f"- Speed: forward only, `torch.inference_mode`, random token ids {args.speed_batch} x {args.speed_seq}, "
        f"{info['machine']['torch_threads']} threads; all models timed in one interleaved call "
        f"(`lightcook.measure.interleaved`: one warm-up each, then {args.repeats} rounds, median). Speedup = "
        "t(dense bf16) / t(row). Medians: "
        + ", ".join(f"{name} {s * 1e3:.1f} ms" for name, s in speed.items())
        + ".",
        "- What each compressed row shipped:",
        *(f"  {shipped_line(r)}" for r in rows if r["manifest_techniques"] is not None),
        "",
    ]
    return "\n".join(lines)


def public(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k != "model"}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    val = held_out(args)
    rows = [run_row(row, args, val) for row in ROWS]
    baseline = bf16_baseline(rows[0]["model"], args.out, val)
    models = {baseline["row"]: baseline["model"], **{r["row"]: r["model"] for r in rows}}
    speed = forward_speed(models, args, rows[0]["model"].config.vocab_size)
    for r in [baseline, *rows]:
        r["seconds"] = speed[r["row"]]
        r["speedup_vs_bf16"] = speed[baseline["row"]] / speed[r["row"]]
        r["ppl_relative_to_dense"] = r["ppl"] / rows[0]["ppl"]
    facts = machine()
    info = {
        "machine": facts,
        "date": facts["date"],
        "wall_seconds": time.time() - started,
        "eval_batches": len(val),
        "eval_rows": sum(b["input_ids"].shape[0] for b in val),
        "eval_block": val[0]["input_ids"].shape[1],
    }
    text = render(args, rows, baseline, speed, info, argv)
    print(text)
    write_json_atomic(
        args.out / "composition.json",
        {
            "command": shlex.join(["experiments/bench/composition.py", *argv]),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            **info,
            "pruning": args.pruning,
            "baseline": public(baseline),
            "rows": [public(r) for r in rows],
            "median_forward_seconds": speed,
        },
    )
    if not args.no_docs:
        args.docs.parent.mkdir(parents=True, exist_ok=True)
        write_section(args.docs, SECTION, text)


if __name__ == "__main__":
    main()
