"""Benchmark one-shot structured pruning (no training step) of SmolLM2-135M-Instruct (CPU).

Measures, in one process, the held-out perplexity of the dense model and of the model pruned once
to 25% and 50% of its transformer-layer parameters through
:class:`~lightcook.callbacks.structured_pruning.StructuredPruningCallback`'s own code path
(``prepare_once``, then :meth:`~lightcook.callbacks.structured_pruning.StructuredPruningCallback.obs_init`
for ``init: obs`` with ``end_step: 0``): heads (a key/value head with its 3 query heads) and FFN
neurons ranked by their OBS error under the calibration Hessian of the following projection's input,
removed, and the kept columns of ``o_proj`` / ``down_proj`` refit by least squares, block by block
(two sequential passes). For comparison, ``init: taylor`` with the same one-shot: the gates ranked by
``|Σ ∂loss/∂z|`` on the same calibration batches, the lowest per parameter closed until the target
is met (the same allocation, no reconstruction), no training. The perplexity is the one of
the *sliced export* (``lightcook.export.save_compressed`` then ``load_compressed``). Same data and
evaluation as the other one-shot benchmarks: block 128, batch 4, held-out ppl over 8 validation
batches (4,064 predicted tokens), 64 calibration sequences (16 training batches).

It rewrites the ``## One-shot structured pruning`` section of docs/benchmarks.md (other sections kept).

    .venv/bin/python experiments/bench/oneshot_structured.py --threads 2
    # levers: allocation (default uniform), damping, neurons only
    .venv/bin/python experiments/bench/oneshot_structured.py --allocation global --no-docs
    .venv/bin/python experiments/bench/oneshot_structured.py --units neurons --no-docs
    # a smoke run that leaves docs/benchmarks.md alone
    .venv/bin/python experiments/bench/oneshot_structured.py --eval-batches 1 --calibration-batches 1 --no-docs
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import torch
from _common import BENCHMARKS_MD, header, shakespeare_batches

from lightcook.callbacks.structured_pruning import StructuredPruningCallback
from lightcook.export import load_compressed, save_compressed
from lightcook.measure import perplexity
from lightcook.modules import CausalLMModule
from lightcook.ops.architectures import get_architecture, layer_parameter_count
from lightcook.ops.hard_concrete import BLOCK_UNIT, gate_gradients
from lightcook.render import table, write_section

MODEL = "smollm2-135m-instruct"
SECTION = "## One-shot structured pruning"
TARGETS = (0.25, 0.5)
GOALS = {0.25: 1.6, 0.5: 4.0}  # issue 15: held-out ppl / dense


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-batches", type=int, default=8, help="held-out batches (4 x 128 tokens)")
    parser.add_argument("--calibration-batches", type=int, default=16, help="training batches of 4 sequences")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--allocation", default="uniform", choices=["global", "uniform"])
    parser.add_argument("--percdamp", type=float, default=0.01)
    parser.add_argument("--units", nargs="+", default=["heads", "neurons"], help="unit kinds to prune")
    parser.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    parser.add_argument("--no-taylor", action="store_true", help="skip the init=taylor rows")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md")
    return parser.parse_args(argv)


def _callback(args: argparse.Namespace, target: float, init: str, calib: list) -> StructuredPruningCallback:
    return StructuredPruningCallback(
        init=init,
        target_sparsity=target,
        units=args.units,
        start_step=0,
        end_step=0,
        calibration_batches=len(calib),
        percdamp=args.percdamp,
        allocation=args.allocation,
    )


def obs_one_shot(args: argparse.Namespace, target: float, calib: list) -> tuple[CausalLMModule, float]:
    """A fresh model pruned once by ``init: obs`` through the callback; returns it and the seconds taken."""
    module = CausalLMModule(name_or_path=MODEL)
    cb = _callback(args, target, "obs", calib)
    cb.prepare_once(None, module)  # attaches the gates
    started = time.perf_counter()
    cb.obs_init(module, batches=calib)
    seconds = time.perf_counter() - started
    assert cb.state["phase"] == "fixed", cb.summary()  # end_step 0: frozen at the target
    return module, seconds


def taylor_one_shot(args: argparse.Namespace, target: float, calib: list) -> tuple[CausalLMModule, float]:
    """A fresh model whose gates are ranked by ``init: taylor``'s scores and the lowest per parameter
    closed to the target with the same allocation as ``obs`` (no reconstruction, no training)."""
    module = CausalLMModule(name_or_path=MODEL)
    cb = _callback(args, target, "taylor", calib)
    cb.prepare_once(None, module)
    gates = cb.gates
    assert gates is not None
    started = time.perf_counter()
    network = module.model.eval()
    scores = {k: v.abs() for k, v in gate_gradients(gates, lambda b: network(**b).loss, calib).items()}
    blocks = [b for b in gates.blocks if b.unit_offset is not None]
    spans = [scores[BLOCK_UNIT[b.kind]][b.unit_offset : b.unit_offset + b.units] for b in blocks]
    orders = [torch.sort(s, stable=True).indices for s in spans]  # least important first
    curves = [s[o] for s, o in zip(spans, orders, strict=True)]
    counts = cb._allocate(network, blocks, {b.output: c for b, c in zip(blocks, curves, strict=True)})
    removed = {kind: torch.zeros_like(scores[kind], dtype=torch.bool) for kind in scores}
    for block, order, count in zip(blocks, orders, counts, strict=True):
        removed[BLOCK_UNIT[block.kind]][block.unit_offset + order[:count]] = True
    gates.fix_units_(removed)
    cb.freeze()
    return module, time.perf_counter() - started


def sliced_ppl(module: CausalLMModule, val: list) -> tuple[float, float]:
    """Held-out ppl of the sliced export of ``module``'s gated network, and its layer parameters (M)."""
    with tempfile.TemporaryDirectory() as tmp:
        sliced = load_compressed(save_compressed(module.model, Path(tmp) / "compressed"))
    return perplexity(sliced, val).value, layer_parameter_count(sliced, get_architecture(sliced)) / 1e6


def rows(args: argparse.Namespace, val: list, calib: list) -> tuple[list[tuple], int]:
    """``(label, ppl, layer params M, seconds)`` of the dense model and each one-shot; predicted tokens."""
    dense_module = CausalLMModule(name_or_path=MODEL)
    dense = perplexity(dense_module.model, val)
    dense_params = layer_parameter_count(dense_module.model, get_architecture(dense_module.model)) / 1e6
    del dense_module
    found: list[tuple] = [("dense", dense.value, dense_params, None)]
    print(found[-1], flush=True)
    runners = [("obs", obs_one_shot)] + ([] if args.no_taylor else [("taylor", taylor_one_shot)])
    for target in args.targets:
        for init, run in runners:
            module, seconds = run(args, target, calib)
            ppl, params = sliced_ppl(module, val)
            found.append((f"{target:.0%} removed, init={init}", ppl, params, seconds))
            print(found[-1], flush=True)
            del module
            gc.collect()
    return found, dense.tokens


def render(args: argparse.Namespace, results: list, tokens: int, wall: float) -> str:
    dense = results[0][1]
    body = [
        [
            label,
            f"{ppl:.2f}",
            f"{ppl / dense:.2f}x",
            f"{params:.1f} M",
            "—" if secs is None else f"{secs:.1f} s",
        ]
        for label, ppl, params, secs in results
    ]
    lines = [
        SECTION,
        "",
        *header("oneshot_structured.py", wall=wall),
        f"Model: SmolLM2-135M-Instruct (30 layers; layer parameters = everything but embeddings and final "
        f"norm); data: Shakespeare, block 128, batch 4; held-out ppl of the sliced export over "
        f"{args.eval_batches} validation batches ({tokens} predicted tokens); calibration: "
        f"{4 * args.calibration_batches} training sequences. Units: {', '.join(args.units)} (a head = one "
        "key/value head with its 3 query heads). `init=obs`: `StructuredPruningCallback(init='obs', "
        f"end_step=0, allocation='{args.allocation}', percdamp={args.percdamp})` through `obs_init`: a "
        "sequential pass records each `o_proj` / `down_proj`'s greedy OBS error curve, the allocation "
        "picks how many units each loses, a second sequential pass removes them and refits the kept "
        "columns by least squares. `init=taylor`: the gates ranked by `|Σ ∂loss/∂z|` on the same "
        "batches, the lowest per parameter closed with the same allocation, no reconstruction. No "
        f"training step. Time: the one-shot on {args.threads} threads (calibration included). Targets "
        "(issue 15): 25% removed ≤ 1.6x dense, 50% ≤ 4x.",
        "",
        *table(["one-shot, no training", "held-out ppl", "vs dense", "layer params", "time"], body, "lrrrr"),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    _data, val, calib = shakespeare_batches(MODEL, args.eval_batches, args.calibration_batches)
    results, tokens = rows(args, val, calib)
    text = render(args, results, tokens, time.time() - started)
    print(text)
    if not args.no_docs:
        write_section(BENCHMARKS_MD, SECTION, text)


if __name__ == "__main__":
    main()
