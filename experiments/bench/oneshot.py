"""Benchmark one-shot pruning and weight quantization (no training step) of SmolLM2-135M-Instruct (CPU).

Measures, in one process, the held-out perplexity of the dense model and of the model pruned once
through :class:`~lightcook.callbacks.sparsity.SparsityCallback`'s own code path (``setup`` then the
mask step) — 2:4 magnitude, 2:4 Wanda, 2:4 SparseGPT, unstructured 50% Wanda and SparseGPT — with the
wall time of each one-shot (calibration pass included) over all 210 block Linears. The SparseGPT and
GPTQ rows come twice: with the calibration defaults (``true_sequential`` and ``dense_targets``, see
:mod:`lightcook.ops.calibrate`) and with both off ("one H per block"), to show what each pass gives. Same data and
evaluation as issue 15's table: block 128, batch 4, held-out ppl over 8 validation batches (4,064
predicted tokens), 64 calibration sequences (16 training batches).

The quantization rows (``--only quant``) are 4-bit weight-only (``activations: none``) absmax
quantization of the same 210 Linears through :class:`~lightcook.callbacks.quantization.QuantizationCallback`
(``setup`` swaps, then :meth:`~lightcook.callbacks.quantization.QuantizationCallback.gptq` for
``init: gptq``): round-to-nearest vs GPTQ, per output channel and per group of 64 inputs (128 does not
divide the model's 576 hidden features), and 3-bit and 2-bit group-64. Same data, calibration sequences and
evaluation. With ``--peers`` (run by ``.venv-bench/bin/python``, ``make bench-venv``) the peers' rows
of experiments/bench/peers.py (llm-compressor, torchao) join the tables, measured in the same process.

It rewrites the ``## One-shot pruning`` / ``## One-shot weight quantization`` section of
docs/benchmarks.md for the group of rows it ran (other sections are kept).

    .venv/bin/python experiments/bench/oneshot.py --threads 2
    OMP_NUM_THREADS=1 .venv/bin/python experiments/bench/oneshot.py --threads 1 --only quant
    .venv-bench/bin/python experiments/bench/oneshot.py --threads 2 --peers   # with the peer rows
    # a smoke run that leaves docs/benchmarks.md alone
    .venv/bin/python experiments/bench/oneshot.py --eval-batches 1 --calibration-batches 1 --no-docs
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from _common import BENCHMARKS_MD, header, shakespeare_batches

from lightcook.callbacks.quantization import QuantizationCallback
from lightcook.callbacks.sparsity import SparsityCallback
from lightcook.measure import perplexity
from lightcook.modules import CausalLMModule
from lightcook.render import table, write_section

MODEL = "smollm2-135m-instruct"
SECTION = "## One-shot pruning"
QUANT_SECTION = "## One-shot weight quantization"
GROUP = 64  # inputs per scale of the group rows: divides 576 (hidden) and 1536 (MLP); 128 does not
PLAIN = {"true_sequential": False, "dense_targets": False}  # one H per block, compressed targets
PLAIN_LABEL = "one H per block"
VARIANTS = [  # (label, SparsityCallback options)
    ("2:4 magnitude", {"criterion": "magnitude"}),
    ("2:4 Wanda", {"criterion": "wanda"}),
    (f"2:4 SparseGPT, {PLAIN_LABEL}", {"criterion": "sparsegpt", **PLAIN}),
    ("2:4 SparseGPT", {"criterion": "sparsegpt"}),
    ("unstructured 50% Wanda", {"mode": "unstructured", "sparsity": 0.5, "criterion": "wanda"}),
    (
        f"unstructured 50% SparseGPT, {PLAIN_LABEL}",
        {"mode": "unstructured", "sparsity": 0.5, "criterion": "sparsegpt", **PLAIN},
    ),
    ("unstructured 50% SparseGPT", {"mode": "unstructured", "sparsity": 0.5, "criterion": "sparsegpt"}),
]
_CHANNEL, _GROUP = {"granularity": "channel"}, {"granularity": "group", "group_size": GROUP}
QUANT_VARIANTS = [  # (label, QuantizationCallback options), weight-only absmax
    ("W4 per-channel RTN", {**_CHANNEL, "init": "none"}),
    ("W4 per-channel GPTQ", {**_CHANNEL, "init": "gptq"}),
    (f"W4 group-{GROUP} RTN", {**_GROUP, "init": "none"}),
    (f"W4 group-{GROUP} GPTQ, {PLAIN_LABEL}", {**_GROUP, "init": "gptq", **PLAIN}),
    (f"W4 group-{GROUP} GPTQ", {**_GROUP, "init": "gptq"}),
    (f"W3 group-{GROUP} RTN", {**_GROUP, "bits": 3, "init": "none"}),
    (f"W3 group-{GROUP} GPTQ", {**_GROUP, "bits": 3, "init": "gptq"}),
    (f"W2 group-{GROUP} RTN", {**_GROUP, "bits": 2, "init": "none"}),
    (f"W2 group-{GROUP} GPTQ", {**_GROUP, "bits": 2, "init": "gptq"}),
]
GROUPS = {"prune": VARIANTS, "quant": QUANT_VARIANTS}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-batches", type=int, default=8, help="held-out batches (4 x 128 tokens)")
    parser.add_argument("--calibration-batches", type=int, default=16, help="training batches of 4 sequences")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--only", nargs="*", default=None, help="run only these variant labels or groups (prune, quant)"
    )
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md")
    parser.add_argument(
        "--peers",
        action="store_true",
        help="add the peers' rows (llm-compressor, torchao; run with .venv-bench/bin/python, make bench-venv)",
    )
    return parser.parse_args(argv)


def one_shot(calib: list[dict], options: dict) -> tuple[CausalLMModule, float]:
    """A fresh model pruned once through the callback's code path; returns it and the seconds taken."""
    module = CausalLMModule(name_or_path=MODEL)
    cb = SparsityCallback(calibration_batches=len(calib), **options)
    cb.prepare_once(None, module)  # registers the weight_mask buffers
    started = time.perf_counter()
    cb.compute_masks(module, batches=calib)
    return module, time.perf_counter() - started


def quant_one_shot(calib: list[dict], options: dict) -> tuple[CausalLMModule, float]:
    """A fresh model quantized once (4-bit weights unless ``bits`` is given; RTN, or GPTQ on one
    sequential pass)."""
    module = CausalLMModule(name_or_path=MODEL)
    options = {"bits": 4, **options}
    cb = QuantizationCallback(activations="none", calibration_batches=len(calib), **options)
    cb.prepare_once(None, module)  # the QuantLinear swaps; RTN is the fake-quant forward itself
    started = time.perf_counter()
    if cb.config.init == "gptq":
        cb.gptq(module, batches=calib)
    return module, time.perf_counter() - started


def rows(
    val: list, calib: list, only: list[str] | None, peers: bool = False
) -> tuple[dict[str, list[tuple[str, float, float | None]]], int]:
    """Per group that ran: ``(label, held-out ppl, seconds)`` of the dense model and each variant;
    the predicted tokens."""
    dense = perplexity(CausalLMModule(name_or_path=MODEL).model, val)
    print(("dense", dense.value), flush=True)
    runners = {"prune": one_shot, "quant": quant_one_shot}
    result: dict[str, list[tuple[str, float, float | None]]] = {}
    for group, variants in GROUPS.items():
        for label, options in variants:
            if only and label not in only and group not in only:
                continue
            module, seconds = runners[group](calib, options)
            found = result.setdefault(group, [("dense", dense.value, None)])
            found.append((label, perplexity(module.model, val).value, seconds))
            print(found[-1], flush=True)
            del module
            gc.collect()
    if peers:
        import peers as peer_rows  # experiments/bench/peers.py: imports the peers only when asked

        for group, run in (("prune", peer_rows.prune_rows), ("quant", peer_rows.quant_rows)):
            if group in result:
                result[group] += run(val, calib)
    return result, dense.tokens


_PASS = (
    f"'{PLAIN_LABEL}' rows: `true_sequential: false, dense_targets: false` (one Hessian per layer from "
    "one forward of its block, fitted to the compressed model's own outputs); the other rows use the "
    "defaults `true_sequential: true` (q/k/v, o, gate/up, down in turn, each Hessian after the ones "
    "before were compressed) and `dense_targets: true` (each layer fitted to the dense model's outputs, "
    "`lightcook.ops.calibrate`)."
)


def _body(results: list) -> list[list[str]]:
    dense = results[0][1]
    return [
        [label, f"{ppl:.2f}", f"{ppl / dense:.2f}x", "—" if secs is None else f"{secs:.1f} s"]
        for label, ppl, secs in results
    ]


def render_quant(args: argparse.Namespace, results: list, tokens: int, wall: float) -> str:
    """The ``## One-shot weight quantization`` section."""
    lines = [
        QUANT_SECTION,
        "",
        *header("oneshot.py", wall=wall),
        f"Model: SmolLM2-135M-Instruct (30 layers, 210 targeted Linears); data: Shakespeare, block 128, "
        f"batch 4; held-out ppl over {args.eval_batches} validation batches ({tokens} predicted tokens); "
        f"calibration: {4 * args.calibration_batches} training sequences. 4-bit (W3 / W2 rows: 3 / 2-bit) symmetric absmax "
        "weights, "
        f"activations float (`activations: none`), per output channel or per group of {GROUP} inputs "
        f"(128 does not divide the 576 hidden features); LM head and embeddings float. RTN = "
        "round-to-nearest (`init: none`); GPTQ = `init: gptq` (`blocksize` 128, `percdamp` 0.01, no "
        "act-order, one sequential block-by-block pass) through `QuantizationCallback.gptq`, no training "
        f"step; {_PASS} Time: the one-shot on {args.threads} threads (calibration included; RTN has none). "
        "3-bit codes are stored bit-packed (8 codes in 3 bytes). Peer rows (`--peers`) ran in the same "
        "process (experiments/bench/peers.py), when present.",
        "",
        *table(["one-shot, no training", "held-out ppl", "vs dense", "time"], _body(results), "lrrr"),
        "",
    ]
    return "\n".join(lines)


def render(args: argparse.Namespace, results: list, tokens: int, wall: float) -> str:
    body = _body(results)
    lines = [
        SECTION,
        "",
        *header("oneshot.py", wall=wall),
        f"Model: SmolLM2-135M-Instruct (30 layers, 210 targeted Linears); data: Shakespeare, block 128, "
        f"batch 4; held-out ppl over {args.eval_batches} validation batches ({tokens} predicted tokens); "
        f"calibration: {4 * args.calibration_batches} training sequences. One-shot = masks (and, for "
        "SparseGPT, updated kept weights; `blocksize` 128, `percdamp` 0.01, one sequential block-by-block "
        f"pass) computed once through `SparsityCallback`, no training step; {_PASS} Time: the whole "
        f"one-shot on {args.threads} threads (calibration included). Peer rows (`--peers`) ran in the same "
        "process (experiments/bench/peers.py), when present.",
        "",
        *table(["one-shot, no training", "held-out ppl", "vs dense", "time"], body, "lrrr"),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    data, val, calib = shakespeare_batches(MODEL, args.eval_batches, args.calibration_batches)
    results, tokens = rows(val, calib, args.only, args.peers)
    renderers = {"prune": (SECTION, render), "quant": (QUANT_SECTION, render_quant)}
    for group, found in results.items():
        section, draw = renderers[group]
        text = draw(args, found, tokens, time.time() - started)
        print(text)
        if not args.no_docs:
            write_section(BENCHMARKS_MD, section, text)


if __name__ == "__main__":
    main()
