"""Benchmark one-shot pruning (no training step) of SmolLM2-135M-Instruct on Shakespeare (CPU).

Measures, in one process, the held-out perplexity of the dense model and of the model pruned once
through :class:`~lightcook.callbacks.sparsity.SparsityCallback`'s own code path (``setup`` then the
mask step) — 2:4 magnitude, 2:4 Wanda, 2:4 SparseGPT, unstructured 50% Wanda and SparseGPT — with the
wall time of each one-shot (calibration pass included) over all 210 block Linears. Same data and
evaluation as issue 15's table: block 128, batch 4, held-out ppl over 8 validation batches (4,064
predicted tokens), 64 calibration sequences (16 training batches).

It rewrites the ``## One-shot pruning`` section of docs/benchmarks.md (other sections are kept).

    .venv/bin/python experiments/bench/oneshot.py --threads 2
    # a smoke run that leaves docs/benchmarks.md alone
    .venv/bin/python experiments/bench/oneshot.py --eval-batches 1 --calibration-batches 1 --no-docs
"""

from __future__ import annotations

import argparse
import gc
import itertools
import time

import torch
from _common import BENCHMARKS_MD, header

from lightcook.callbacks.sparsity import SparsityCallback
from lightcook.data import TextDataModule
from lightcook.measure import perplexity
from lightcook.modules import CausalLMModule
from lightcook.render import table, write_section

MODEL = "smollm2-135m-instruct"
SECTION = "## One-shot pruning"
VARIANTS = [  # (label, SparsityCallback options)
    ("2:4 magnitude", {"criterion": "magnitude"}),
    ("2:4 Wanda", {"criterion": "wanda"}),
    ("2:4 SparseGPT", {"criterion": "sparsegpt"}),
    ("unstructured 50% Wanda", {"mode": "unstructured", "sparsity": 0.5, "criterion": "wanda"}),
    ("unstructured 50% SparseGPT", {"mode": "unstructured", "sparsity": 0.5, "criterion": "sparsegpt"}),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-batches", type=int, default=8, help="held-out batches (4 x 128 tokens)")
    parser.add_argument("--calibration-batches", type=int, default=16, help="training batches of 4 sequences")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None, help="run only these variant labels")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md")
    return parser.parse_args(argv)


def one_shot(calib: list[dict], options: dict) -> tuple[CausalLMModule, float]:
    """A fresh model pruned once through the callback's code path; returns it and the seconds taken."""
    module = CausalLMModule(name_or_path=MODEL)
    cb = SparsityCallback(calibration_batches=len(calib), **options)
    cb.prepare_once(None, module)  # registers the weight_mask buffers
    started = time.perf_counter()
    cb.compute_masks(module, batches=calib)
    return module, time.perf_counter() - started


def rows(val: list, calib: list, only: list[str] | None) -> tuple[list[tuple[str, float, float | None]], int]:
    """``(label, held-out ppl, seconds)`` for the dense model and each variant; the predicted tokens."""
    dense = perplexity(CausalLMModule(name_or_path=MODEL).model, val)
    result: list[tuple[str, float, float | None]] = [("dense", dense.value, None)]
    print(result[-1], flush=True)
    for label, options in VARIANTS:
        if only and label not in only:
            continue
        module, seconds = one_shot(calib, options)
        result.append((label, perplexity(module.model, val).value, seconds))
        print(result[-1], flush=True)
        del module
        gc.collect()
    return result, dense.tokens


def render(args: argparse.Namespace, results: list, tokens: int, wall: float) -> str:
    dense = results[0][1]
    body = [
        [label, f"{ppl:.2f}", f"{ppl / dense:.2f}x", "—" if secs is None else f"{secs:.1f} s"]
        for label, ppl, secs in results
    ]
    lines = [
        SECTION,
        "",
        *header("oneshot.py", wall=wall),
        f"Model: SmolLM2-135M-Instruct (30 layers, 210 targeted Linears); data: Shakespeare, block 128, "
        f"batch 4; held-out ppl over {args.eval_batches} validation batches ({tokens} predicted tokens); "
        f"calibration: {4 * args.calibration_batches} training sequences. One-shot = masks (and, for "
        "SparseGPT, updated kept weights; `blocksize` 128, `percdamp` 0.01, one sequential block-by-block "
        "pass) computed once through `SparsityCallback`, no training step. Time: the whole one-shot on "
        f"{args.threads} threads (calibration included).",
        "",
        *table(["one-shot, no training", "held-out ppl", "vs dense", "time"], body, "lrrr"),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    data = TextDataModule(tokenizer=MODEL, block_size=128, batch_size=4)
    data.setup("fit")
    val = list(itertools.islice(data.val_dataloader(), args.eval_batches))
    torch.manual_seed(0)
    calib = list(itertools.islice(data.train_dataloader(), args.calibration_batches))
    results, tokens = rows(val, calib, args.only)
    text = render(args, results, tokens, time.time() - started)
    print(text)
    if not args.no_docs:
        write_section(BENCHMARKS_MD, SECTION, text)


if __name__ == "__main__":
    main()
