"""Benchmark StructuredPruningCallback on SmolLM2-135M-Instruct with the Shakespeare corpus (CPU).

Measures, in one process:

1. held-out perplexity of the dense model;
2. a pruning run: hard-concrete gates + Lagrangian towards ``--target`` sparsity of the layer
   (non-embedding) parameters, the target warming up over ``--warmup`` steps, gates frozen once met,
   then fine-tuning with the structure fixed, ``--steps`` AdamW steps in all; the sliced export is
   reloaded and its held-out perplexity, parameter counts and structure are reported;
3. the same run with distillation from the dense model added (``DistillationCallback``, logits KL),
   when ``lightcook.callbacks.distillation`` is importable (``--no-kd`` skips it);
4. forward speed of the sliced model vs the dense model: interleaved repeats, medians, ratio.

It rewrites the ``## Structured pruning`` section of docs/benchmarks.md (other sections are kept).

    .venv/bin/python experiments/bench/structured_pruning.py --uniform-baseline   # about 20 min on 2 idle CPU threads
    .venv/bin/python experiments/bench/structured_pruning.py --steps 4 --warmup 2 --eval-batches 2 \
        --repeats 1 --no-kd --no-docs                                        # smoke run
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from _common import BENCHMARKS_MD, StepTimer, cpu_trainer, header

from lightcook.callbacks.structured_pruning import StructuredPruningCallback
from lightcook.data import TextDataModule
from lightcook.export import load_compressed, read_manifest, save_compressed
from lightcook.measure import interleaved, perplexity
from lightcook.modules import CausalLMModule
from lightcook.ops.architectures import get_architecture, layer_parameter_count
from lightcook.render import write_section

MODEL = "smollm2-135m-instruct"
SECTION = "## Structured pruning"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.5, help="target sparsity of the layer parameters")
    parser.add_argument("--steps", type=int, default=120, help="AdamW steps per run (search + fine-tune)")
    parser.add_argument("--warmup", type=int, default=50, help="steps over which the target rises from 0")
    parser.add_argument("--lr", type=float, default=2e-4, help="peak learning rate of the weights")
    parser.add_argument("--gate-lr", type=float, default=0.5, help="Adam learning rate of the gates")
    parser.add_argument(
        "--lambda-lr",
        type=float,
        default=50.0,
        help="Adam learning rate of the multipliers (large: short run)",
    )
    parser.add_argument("--droprate-init", type=float, default=0.05, help="initial gate drop rate")
    parser.add_argument("--init", choices=["uniform", "taylor"], default="taylor", help="gate initialisation")
    parser.add_argument(
        "--uniform-baseline", action="store_true", help="with --init taylor: one more run with uniform init"
    )
    parser.add_argument("--block-size", type=int, default=64, help="tokens per row (training and held-out)")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per batch")
    parser.add_argument("--eval-batches", type=int, default=8, help="held-out batches")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved forward timings per model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-kd", action="store_true", help="skip the run with distillation")
    parser.add_argument(
        "--no-dense-reference", action="store_true", help="skip the dense model fine-tuned for --steps"
    )
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- runs


class SparsityTrace(L.Callback):
    """Expected and deterministic sparsity after every training batch."""

    def __init__(self) -> None:
        self.rows: list[tuple[float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = trainer.callback_metrics
        expected = float(metrics.get("compress/expected_sparsity", float("nan")))
        self.rows.append((expected, float(metrics.get("compress/sparsity", float("nan")))))


def prune_run(
    data: TextDataModule, args: argparse.Namespace, kd: str | None, init: str | None = None
) -> dict[str, Any]:
    """Fit with the pruning callback (and distillation from the teacher ``kd``: a path, or
    ``"student"``); return the callback, timer and export path."""
    module = CausalLMModule(name_or_path=MODEL, lr=args.lr, warmup_steps=3)
    cb = StructuredPruningCallback(
        target_sparsity=args.target,
        end_step=args.warmup,
        gate_lr=args.gate_lr,
        lambda_lr=args.lambda_lr,
        droprate_init=args.droprate_init,
        init=init or args.init,
    )
    callbacks: list[L.Callback] = [cb]
    if kd:
        from lightcook.callbacks.distillation import DistillationCallback

        callbacks.append(DistillationCallback(teacher=kd, task_scale=1.0, logits_scale=1.0, temperature=1.0))
    timer, trace = StepTimer(), SparsityTrace()
    L.seed_everything(0, verbose=False)  # same data order for both runs
    root = tempfile.mkdtemp(prefix="lightcook-bench-structured-")
    trainer = cpu_trainer(args.steps, [timer, *callbacks, trace], root)
    trainer.fit(module, datamodule=data)
    export = save_compressed(cb.network(module), Path(root) / "compressed", nm=None)  # the sliced network
    return {"cb": cb, "timer": timer, "trace": trace, "export": export}


def dense_fine_tuned(data: TextDataModule, args: argparse.Namespace) -> torch.nn.Module:
    """The dense model fine-tuned for the same ``--steps`` (same data order, optimizer and schedule):
    the same-budget reference for the pruned runs, which also learn the corpus while pruning."""
    module = CausalLMModule(name_or_path=MODEL, lr=args.lr, warmup_steps=3)
    L.seed_everything(0, verbose=False)
    cpu_trainer(args.steps, []).fit(module, datamodule=data)
    return module.model


def describe(run: dict[str, Any], val: list[dict], dense_layers: int) -> dict[str, Any]:
    """Held-out ppl, parameter counts and structure of a run's sliced export."""
    sliced = load_compressed(run["export"])
    structured = read_manifest(run["export"])["structured"]
    blocks = structured["blocks"].values()
    attention = [b for b in blocks if b["kind"] == "attention"]
    ffn = [b for b in blocks if b["kind"] == "ffn"]
    layers = structured["layer_parameters"]
    cb = run["cb"]
    return {
        "model": sliced,
        "ppl": perplexity(sliced, val).value,
        "layer_params": layers,
        "sparsity": 1 - layers / dense_layers,
        "attention_kept": sum(not b["removed"] for b in attention),
        "kv_groups_kept": sum(b["units"] for b in attention),
        "ffn_kept": sum(not b["removed"] for b in ffn),
        "neurons_kept": sum(b["units"] for b in ffn),
        "num_layers": sliced.config.num_hidden_layers,
        "frozen_at": cb.state["frozen_at"],
        "step_s": statistics.median(run["timer"].times[1:] or run["timer"].times),
        "target_met": cb.summary()["target_met"],
        "trace": run["trace"].rows,
    }


def forward_speed(models: dict[str, torch.nn.Module], repeats: int) -> dict[str, float]:
    """Median forward time of each model on a 4 x 128 batch, interleaved, after one warm-up each."""
    ids = torch.randint(0, 49152, (4, 128), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return interleaved(
            {name: partial(model.eval(), input_ids=ids) for name, model in models.items()}, repeats
        )


# --------------------------------------------------------------------------- report


def trace_line(name: str, rows: list[tuple[float, float]]) -> str:
    """Expected / deterministic sparsity every 4 steps."""
    points = [
        f"{i + 1}: {e:.2f}/{d:.2f}" for i, (e, d) in enumerate(rows) if (i + 1) % 4 == 0 or i + 1 == len(rows)
    ]
    return f"- {name}: " + ", ".join(points)


def render(
    args,
    dense_ppl: float,
    tuned_ppl: float | None,
    dense_layers: int,
    results: dict[str, dict],
    speed: dict,
    kd_note: str,
    wall: float,
) -> str:
    lines = [
        SECTION,
        "",
        *header("structured_pruning.py", wall=wall),
        f"Model: SmolLM2-135M-Instruct (30 layers, 3 KV groups of 3 query heads, 1536 FFN neurons; "
        f"{dense_layers:,} layer parameters = everything but the tied embedding and final norm). "
        f"Data: Shakespeare, block {args.block_size}, batch {args.batch_size}; held-out ppl over "
        f"{args.eval_batches} validation batches ({args.eval_batches * args.batch_size * (args.block_size - 1)} "
        f"predicted tokens, context {args.block_size}). Each run: {args.steps} AdamW steps "
        f"(lr {args.lr}, warmup 3, cosine), target sparsity {args.target} reached linearly over {args.warmup} "
        f"steps (gate Adam lr {args.gate_lr}, multiplier lr {args.lambda_lr}, droprate_init {args.droprate_init}, "
        f"gate init {args.init}), "
        "gates frozen once met, then fine-tuning with the structure fixed. This is a short CPU budget: "
        "CoFi-style pruning usually runs thousands of steps, so the perplexities below are far from converged.",
        "",
        "| model | held-out ppl | layer params | sparsity | attention blocks kept | KV groups kept | "
        "FFN blocks kept | neurons kept | layers | frozen at step | median step s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| dense | {dense_ppl:.2f} | {dense_layers:,} | 0 | 30 | 90 | 30 | 46,080 | 30 | - | - |",
    ]
    if tuned_ppl is not None:
        lines.append(
            f"| dense, fine-tuned {args.steps} steps (same budget, no pruning) | {tuned_ppl:.2f} | "
            f"{dense_layers:,} | 0 | 30 | 90 | 30 | 46,080 | 30 | - | - |"
        )
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['ppl']:.2f} | {r['layer_params']:,} | {r['sparsity']:.3f} | {r['attention_kept']} | "
            f"{r['kv_groups_kept']} | {r['ffn_kept']} | {r['neurons_kept']:,} | {r['num_layers']} | "
            f"{r['frozen_at'] if r['frozen_at'] is not None else 'not met'} | {r['step_s']:.2f} |"
        )
    lines += [
        "",
        kd_note,
        "",
        "Sparsity during the runs, `step: expected/deterministic` (expected stops updating once the gates freeze):",
        *[trace_line(name, r["trace"]) for name, r in results.items()],
        "",
        f"Forward pass, 4 x 128 tokens, `torch.inference_mode`, interleaved, {args.repeats} repeats after one "
        "warm-up each (the LM head, 49,152 x 576, is not pruned and costs the same in all models):",
        "",
        "| model | sparsity | median forward s | speed-up vs dense |",
        "|---|---:|---:|---:|",
        f"| dense | 0 | {speed['dense']:.3f} | 1.00x |",
        *[
            f"| {name} | {r['sparsity']:.3f} | {speed[name]:.3f} | **{speed['dense'] / speed[name]:.2f}x** |"
            for name, r in results.items()
        ],
        "",
    ]
    return "\n".join(lines)


def kd_available() -> bool:
    try:
        from lightcook.callbacks.distillation import DistillationCallback  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    data = TextDataModule(tokenizer=MODEL, block_size=args.block_size, batch_size=args.batch_size)
    data.setup("fit")
    val = list(itertools.islice(data.val_dataloader(), args.eval_batches))
    dense = CausalLMModule(name_or_path=MODEL).model
    dense_layers = layer_parameter_count(dense, get_architecture(dense))
    dense_ppl = perplexity(dense, val).value
    teacher, tuned_ppl = "student", None  # KD teacher: the dense fine-tuned model when there is one
    if not args.no_dense_reference:
        tuned = dense_fine_tuned(data, args)
        tuned_ppl = perplexity(tuned, val).value
        teacher = tempfile.mkdtemp(prefix="lightcook-bench-teacher-")
        tuned.save_pretrained(teacher)
        del tuned
    results = {
        f"pruned + fine-tuned (task loss, {args.init} init)": describe(
            prune_run(data, args, kd=None), val, dense_layers
        )
    }
    if args.init == "taylor" and args.uniform_baseline:
        results["pruned + fine-tuned (task loss, uniform init)"] = describe(
            prune_run(data, args, kd=None, init="uniform"), val, dense_layers
        )
    if args.no_kd:
        kd_note = "Distillation run: skipped (`--no-kd`)."
    elif not kd_available():
        kd_note = "Distillation run: pending (lightcook.callbacks.distillation is not available yet)."
    else:
        results[f"pruned + fine-tuned (task + KD from dense, {args.init} init)"] = describe(
            prune_run(data, args, kd=teacher), val, dense_layers
        )
        source = (
            f"the dense model fine-tuned {args.steps} steps, the row above"
            if teacher != "student"
            else "the dense starting model"
        )
        kd_note = (
            f"The KD run adds DistillationCallback (teacher = {source}; logits KL, T=1) to the same recipe."
        )
    speed = forward_speed({"dense": dense} | {name: r["model"] for name, r in results.items()}, args.repeats)
    text = render(args, dense_ppl, tuned_ppl, dense_layers, results, speed, kd_note, time.time() - started)
    print(text)
    if not args.no_docs:
        write_section(BENCHMARKS_MD, SECTION, text)


if __name__ == "__main__":
    main()
