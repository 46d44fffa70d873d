"""Benchmark DistillationCallback on SmolLM2-135M-Instruct with the Shakespeare corpus (CPU).

The teacher is SmolLM2 fine-tuned on the training split for ``--teacher-steps`` steps (the usual
setting, as in BMCook: distil a model fine-tuned on the task into its compressed copy; ``0`` keeps the
pretrained model); the student is that model pruned one-shot to 2:4 with Wanda at step 0
(``SparsityCallback``, masks held through training), and ``teacher="student"`` is the copy of it taken
before compression. Measured in one process:

0. the teacher: fine-tuned, saved to a temporary folder, its held-out perplexity;
1. recovery: fine-tune the pruned student ``--steps`` AdamW steps with and without logit KD (same
   data order, same schedule); held-out perplexity every ``--eval-every`` steps (step 0 = pruned,
   untrained), plus the dense model's perplexity for reference;
2. overhead: step time with logit KD vs plain fine-tuning, interleaved runs in one process, median
   of the timed steps (first step of each run dropped), ratio (goal <= 1.40).

It rewrites the ``## Distillation`` section of docs/benchmarks.md (other sections are kept) and, if
matplotlib is installed, plots the curves to docs/distillation.png (otherwise the table stands alone).

    .venv/bin/python experiments/bench/distillation.py               # about 15 min on a quiet 2-core host
    .venv/bin/python experiments/bench/distillation.py --teacher-steps 1 --steps 2 --eval-every 1 --eval-batches 2 --repeats 1 --no-docs
"""

from __future__ import annotations

import argparse
import gc
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from _common import BENCHMARKS_MD, StepTimer, cpu_trainer, header

from lightcook.callbacks.distillation import DistillationCallback
from lightcook.callbacks.sparsity import SparsityCallback
from lightcook.data import TextDataModule
from lightcook.measure import interleaved_runs, perplexity
from lightcook.modules import CausalLMModule
from lightcook.render import curves_figure, save_figure, write_section

MODEL = "smollm2-135m-instruct"
DOCS = Path(__file__).resolve().parents[2] / "docs"
SECTION = "## Distillation"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-steps", type=int, default=40, help="dense fine-tune steps (0: pretrained)")
    parser.add_argument("--steps", type=int, default=40, help="fine-tune steps (with and without KD)")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW, warmup 4, cosine)")
    parser.add_argument("--temperature", type=float, default=1.0, help="KD temperature")
    parser.add_argument("--task-scale", type=float, default=1.0, help="KD run: weight of the task loss")
    parser.add_argument("--logits-scale", type=float, default=1.0, help="KD run: weight of the logits KL")
    parser.add_argument("--eval-every", type=int, default=10, help="steps between held-out evaluations")
    parser.add_argument("--eval-batches", type=int, default=8, help="held-out batches (4 x 128 tokens)")
    parser.add_argument("--calibration-batches", type=int, default=8, help="Wanda calibration batches")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing runs per variant")
    parser.add_argument("--timed-steps", type=int, default=4, help="steps per timing run (first dropped)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 on an oversubscribed host)")
    parser.add_argument("--phases", default="recovery,overhead", help="comma list: recovery, overhead")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/ untouched")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- helpers


def load_module(lr: float, path: str = MODEL) -> CausalLMModule:
    return CausalLMModule(name_or_path=path, lr=lr, warmup_steps=4, min_lr_ratio=0.1)


def fine_tuned_teacher(data: TextDataModule, args: argparse.Namespace, folder: Path) -> str:
    """The dense model fine-tuned ``--teacher-steps`` on the training split, saved to ``folder``."""
    if not args.teacher_steps:
        return MODEL
    print(f"fine-tune the dense teacher, {args.teacher_steps} steps", flush=True)
    module = load_module(args.lr)
    fit(module, data, args.teacher_steps, [])
    module.model.save_pretrained(folder)
    return str(folder)


def held_out(module: CausalLMModule, batches: list[dict]) -> float:
    """Held-out perplexity (127 predicted tokens per row) on the module's device; its modes are kept."""
    return perplexity(module, batches, device=module.device).value


class PerplexityCurve(L.Callback):
    """Held-out perplexity every ``every`` optimizer steps (after the masks of that step) and at the end."""

    def __init__(self, batches: list[dict], every: int) -> None:
        self.batches, self.every = batches, every
        self.curve: list[tuple[int, float]] = []

    def _record(self, step: int, pl_module) -> None:
        if not self.curve or self.curve[-1][0] != step:
            self.curve.append((step, held_out(pl_module, self.batches)))
            print(f"  step {step:3d}: held-out ppl {self.curve[-1][1]:.2f}", flush=True)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            self._record(trainer.global_step, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._record(trainer.global_step, pl_module)


def fit(module: CausalLMModule, data: TextDataModule, steps: int, callbacks: list) -> StepTimer:
    """Timed fine-tune, evaluation excluded: forward, teacher, backward and step of each batch."""
    timer = StepTimer()
    L.seed_everything(0, verbose=False)  # same data order for every variant
    trainer = cpu_trainer(steps, [*callbacks, timer])  # timer after the curve: its evaluation is not timed
    trainer.fit(module, datamodule=data)
    module.zero_grad(set_to_none=True)
    module._trainer = None  # drop the trainer (and its optimizer states) now, not at some later GC
    del trainer
    gc.collect()
    return timer


def kd_callback(args: argparse.Namespace, teacher_dtype: str | None = None) -> DistillationCallback:
    return DistillationCallback(
        temperature=args.temperature,
        task_scale=args.task_scale,
        logits_scale=args.logits_scale,
        teacher_dtype=teacher_dtype,
    )


# --------------------------------------------------------------------------- the measurements


def recovery(
    data: TextDataModule, val: list[dict], args, start: str
) -> tuple[dict, CausalLMModule, DistillationCallback]:
    """Pruned student fine-tuned with and without KD: perplexity curves and median step times."""
    runs = {}
    kd = kd_callback(args)
    for variant in ("plain", "kd"):
        print(f"fine-tune 2:4 student, {variant}", flush=True)
        module = load_module(args.lr, start)
        prune = SparsityCallback(n=2, m=4, criterion="wanda", calibration_batches=args.calibration_batches)
        curve = PerplexityCurve(val, args.eval_every)
        extra = [kd] if variant == "kd" else []
        timer = fit(module, data, args.steps, [prune, *extra, curve])  # prune first: masks, then KD
        runs[variant] = {"curve": curve.curve, "step_s": statistics.median(timer.times[1:])}
    return runs, module, kd


def overhead(module: CausalLMModule, kd: DistillationCallback, data: TextDataModule, args) -> dict:
    """Interleaved runs on the same module: plain, logit KD (fp32 teacher), logit KD (bf16 teacher).

    Median step time of each variant and its ratio to plain; the run order rotates every repeat.
    """
    callbacks = {"plain": [], "kd": [kd], "kd_bf16": [kd_callback(args, "bfloat16")]}  # teachers load once
    samples = interleaved_runs(
        lambda kind: fit(module, data, args.timed_steps, callbacks[kind]).times[1:],
        list(callbacks),
        args.repeats,
    )
    result = {kind: statistics.median(times) for kind, times in samples.items()}
    result.update(ratio=result["kd"] / result["plain"], ratio_bf16=result["kd_bf16"] / result["plain"])
    result["samples"] = len(samples["plain"])
    print(result, flush=True)
    return result


# --------------------------------------------------------------------------- report


def plot(runs: dict, dense_ppl: float, path: Path) -> bool:
    """Write the perplexity curves as a small PNG; False when matplotlib is not installed."""
    curves = {
        label: runs[v]["curve"]
        for v, label in (("plain", "2:4, fine-tune"), ("kd", "2:4, fine-tune + logit KD"))
    }
    try:
        fig = curves_figure(
            curves,
            xlabel="optimizer step",
            ylabel="held-out ppl",
            title="SmolLM2-135M, 2:4 Wanda",
            hline=(dense_ppl, "dense teacher"),
        )
    except ImportError:
        return False
    save_figure(fig, path)
    return True


def render_recovery(args, pretrained_ppl: float, dense_ppl: float, runs: dict, plotted: bool) -> list[str]:
    steps = [s for s, _ in runs["plain"]["curve"]]
    ppl = {v: dict(runs[v]["curve"]) for v in runs}
    teacher = (
        f"SmolLM2-135M-Instruct fine-tuned densely for {args.teacher_steps} steps on the training split "
        f"(same optimizer and schedule; pretrained ppl {pretrained_ppl:.2f})"
        if args.teacher_steps
        else "the dense pretrained SmolLM2-135M-Instruct"
    )
    lines = [
        f"Teacher: {teacher}. Student: the teacher pruned one-shot to 2:4 (Wanda, "
        f"{args.calibration_batches} calibration batches) at step 0, masks held through training; "
        "`teacher: student` is its copy before compression. Data: Shakespeare, block 128, batch 4, "
        f"same data order for both runs. AdamW lr {args.lr}, warmup 4, cosine to 0.1x, {args.steps} steps. "
        f"KD run: `task_scale={args.task_scale}, logits_scale={args.logits_scale}, "
        f"temperature={args.temperature}`. Held-out ppl over {args.eval_batches} validation batches "
        f"({args.eval_batches * 4 * 127} predicted tokens). Dense teacher: ppl **{dense_ppl:.2f}**.",
        "",
        "| step | 2:4 fine-tune (no KD) | 2:4 fine-tune + logit KD |",
        "|---:|---:|---:|",
        *[f"| {s} | {ppl['plain'][s]:.2f} | {ppl['kd'][s]:.2f} |" for s in steps],
        "",
        f"Median step time during these runs: {runs['plain']['step_s']:.2f} s without KD, "
        f"{runs['kd']['step_s']:.2f} s with KD (not interleaved; the overhead table below is the controlled comparison).",
        "",
    ]
    if plotted:
        return lines + ["![held-out perplexity, 2:4 SmolLM2 with and without KD](distillation.png)", ""]
    why = "--no-docs" if args.no_docs else "matplotlib is not installed here"
    return lines + [f"({why}: no plot; the table is the curve.)", ""]


def render_overhead(args, timing: dict, pruned: bool) -> list[str]:
    module = "the pruned module from the KD run" if pruned else "the dense pretrained module"
    return [
        f"Overhead, logit KD vs plain fine-tuning ({module}, no pruning callback in either), "
        f"interleaved {args.repeats} x {args.timed_steps}-step runs, first step of each run dropped "
        f"({timing['samples']} steps each, order rotated): median step time",
        "",
        "| variant | median s/step | ratio to plain |",
        "|---|---:|---:|",
        f"| plain fine-tuning | {timing['plain']:.3f} | 1.000 |",
        f"| + logit KD, fp32 teacher (default) | {timing['kd']:.3f} | **{timing['ratio']:.3f}** |",
        f"| + logit KD, bf16 teacher (`teacher_dtype: bfloat16`) | {timing['kd_bf16']:.3f} "
        f"| **{timing['ratio_bf16']:.3f}** |",
        "",
        "Goal: ratio <= 1.40.",
        "",
    ]


def render(args, parts: list[str], wall: float) -> str:
    return "\n".join([SECTION, "", *header("distillation.py", wall=wall), "", *parts])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    phases = set(args.phases.split(","))
    torch.set_num_threads(args.threads)
    started = time.time()
    data = TextDataModule(tokenizer=MODEL, block_size=128, batch_size=4)
    data.setup("fit")
    parts: list[str] = []
    module, kd = None, None
    with tempfile.TemporaryDirectory(prefix="kd_teacher_") as folder:  # `teacher: student` reloads from it
        if "recovery" in phases:
            val = list(itertools.islice(data.val_dataloader(), args.eval_batches))
            pretrained_ppl = held_out(load_module(args.lr), val)
            print(f"pretrained held-out ppl {pretrained_ppl:.2f}", flush=True)
            start = fine_tuned_teacher(data, args, Path(folder))
            dense_ppl = held_out(load_module(args.lr, start), val)
            print(f"teacher held-out ppl {dense_ppl:.2f}", flush=True)
            runs, module, kd = recovery(data, val, args, start)
            plotted = not args.no_docs and plot(runs, dense_ppl, DOCS / "distillation.png")
            parts += render_recovery(args, pretrained_ppl, dense_ppl, runs, plotted)
        if "overhead" in phases:
            pruned = module is not None
            module, kd = (module, kd) if pruned else (load_module(args.lr), kd_callback(args))
            parts += render_overhead(args, overhead(module, kd, data, args), pruned)
    text = render(args, parts, time.time() - started)
    print(text)
    if not args.no_docs:
        write_section(BENCHMARKS_MD, SECTION, text)


if __name__ == "__main__":
    main()
