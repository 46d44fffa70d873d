"""The one-shot peers (llm-compressor, torchao) on the one-shot benchmark's model and tokens (CPU).

Same model, data and evaluation as ``oneshot.py``: SmolLM2-135M-Instruct, Shakespeare block 128,
batch 4, held-out perplexity over 8 validation batches (4,064 predicted tokens) with
:func:`lightcook.measure.perplexity`, 64 calibration sequences of 128 tokens (the 16 calibration
batches of ``_common.shakespeare_batches``). Every peer compresses the 210 Linears of the 30 decoder
layers (LM head and embeddings float) of a freshly loaded model; the time is the peer's one-shot call
alone (its calibration pass included, the model load not) on the current torch thread count.

- :func:`prune_rows`: llm-compressor ``oneshot()`` with SparseGPT 2:4, Wanda 2:4 and SparseGPT
  unstructured 50% (its sequential pipeline, one decoder layer at a time).
- :func:`quant_rows`: 4-bit symmetric weight-only, per output channel and per group of 64 inputs
  (128 does not divide the 576 hidden features): llm-compressor GPTQ and round-to-nearest
  (``QuantizationModifier``, data-free), torchao ``IntxWeightOnlyConfig`` (int4 round-to-nearest,
  the CPU path of torchao 0.18) per channel and per group of 64 and 32.

The peers are benchmark-only, never a dependency of lightcook: they live in ``.venv-bench``
(``make bench-venv``). Where a peer does not import, its rows are skipped with a message saying so,
so ``oneshot.py`` can call :func:`prune_rows` / :func:`quant_rows` from any venv.

    make bench-peers                                      # = the command below, after make bench-venv
    .venv-bench/bin/python experiments/bench/peers.py --threads 2
    # a smoke run that leaves docs/benchmarks.md alone
    .venv-bench/bin/python experiments/bench/peers.py --eval-batches 1 --calibration-batches 1 --no-docs
"""

from __future__ import annotations

import argparse
import gc
import importlib
import time
from collections.abc import Callable
from typing import Any

import torch
from _common import BENCHMARKS_MD, header, shakespeare_batches

from lightcook.measure import perplexity
from lightcook.modules import CausalLMModule
from lightcook.render import table, write_section

MODEL = "smollm2-135m-instruct"
SECTION = "## One-shot peers"
GROUP = 64  # inputs per scale: divides 576 (hidden) and 1536 (MLP); 128 does not
# llm-compressor: every Linear but the LM head (the 210 block Linears). A regex (``re.match``): its
# pruning modifiers name a top-level target Linear "lm_head." which a plain "lm_head" does not match
# (the tied LM head, i.e. the embeddings, would be pruned too).
IGNORE = ["re:.*lm_head"]
PEERS = {"llm-compressor": "llmcompressor", "torchao": "torchao"}
Row = tuple[str, float, float]


def missing(peer: str) -> str | None:
    """Why ``peer`` (``llm-compressor`` or ``torchao``) cannot run here, or ``None`` when it imports."""
    try:
        importlib.import_module(PEERS[peer])
    except Exception as err:  # ImportError, or a broken install raising anything at import
        return (
            f"skipping the {peer} rows: `import {PEERS[peer]}` failed ({type(err).__name__}: {err}); "
            "the peers live in .venv-bench: `make bench-venv`, then run with .venv-bench/bin/python"
        )
    return None


def fresh_model() -> torch.nn.Module:
    """A freshly loaded SmolLM2-135M-Instruct (the transformers ``LlamaForCausalLM``), float32."""
    return CausalLMModule(name_or_path=MODEL).model


def compressed_linears(model: torch.nn.Module) -> list[str]:
    """The Linears a peer compressed: at least 49% zero weights (pruned), an llm-compressor
    ``quantization_scheme``, or a torchao tensor-subclass weight."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        weight = module.weight
        subclass = type(weight) not in (torch.Tensor, torch.nn.Parameter)
        if subclass or hasattr(module, "quantization_scheme") or (weight == 0).float().mean() >= 0.49:
            found.append(name)
    return found


def _measure(label: str, val: list, compress: Callable[[torch.nn.Module], None]) -> Row:
    """``(label, held-out ppl, seconds)`` of ``compress`` applied once to a fresh model; raises
    ``RuntimeError`` unless exactly the block Linears (not the LM head) came out compressed."""
    model = fresh_model()
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    started = time.perf_counter()
    compress(model)
    seconds = time.perf_counter() - started
    done = compressed_linears(model)
    if done != targets:
        extra, lacking = sorted(set(done) - set(targets)), sorted(set(targets) - set(done))
        raise RuntimeError(
            f"{label}: compressed {len(done)} Linears, not the {len(targets)} block ones "
            f"(extra {extra[:3]}, missing {lacking[:3]})"
        )
    row = (label, perplexity(model, val).value, seconds)
    print(row, flush=True)
    del model
    gc.collect()
    return row


def _calibration_dataset(calib: list[dict]) -> Any:
    """The calibration token batches as a tokenized ``datasets.Dataset`` (one row a sequence)."""
    from datasets import Dataset

    ids = torch.cat([batch["input_ids"] for batch in calib])
    mask = torch.cat([batch.get("attention_mask", torch.ones_like(batch["input_ids"])) for batch in calib])
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist()})


def _llmc_oneshot(calib: list[dict] | None, recipe: Any) -> Callable[[torch.nn.Module], None]:
    """llm-compressor's ``oneshot()`` on the model with ``recipe``, calibrated on ``calib`` (in its
    order, all of it) or data-free when ``None``; nothing saved."""
    from llmcompressor import oneshot

    from lightcook.data.text import load_tokenizer

    tokenizer, data = load_tokenizer(MODEL), {}
    if calib is not None:
        dataset = _calibration_dataset(calib)
        data = {
            "dataset": dataset,
            "num_calibration_samples": len(dataset),
            "max_seq_length": len(dataset[0]["input_ids"]),
            "shuffle_calibration_samples": False,
            "batch_size": len(calib[0]["input_ids"]),  # the calibration batches' own size (4)
        }

    def run(model: torch.nn.Module) -> None:
        oneshot(model=model, tokenizer=tokenizer, recipe=recipe, **data)

    return run


def _w4(strategy: str) -> dict[str, Any]:
    """llm-compressor's 4-bit symmetric int weight scheme over the Linears, per channel or per group."""
    weights: dict[str, Any] = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": strategy}
    if strategy == "group":
        weights["group_size"] = GROUP
    return {"group_0": {"targets": ["Linear"], "weights": weights}}


def prune_rows(val: list, calib: list) -> list[Row]:
    """``(label, held-out ppl, seconds)`` of llm-compressor's one-shot pruning of the 210 block
    Linears: SparseGPT 2:4, Wanda 2:4, SparseGPT unstructured 50%, calibrated on ``calib``
    (``[]`` with a printed message when llm-compressor does not import)."""
    why = missing("llm-compressor")
    if why:
        print(why, flush=True)
        return []
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

    variants = [  # llm-compressor's defaults otherwise: dampening_frac 0.01, block_size 128
        ("llm-compressor SparseGPT 2:4", SparseGPTModifier, {"mask_structure": "2:4"}),
        ("llm-compressor Wanda 2:4", WandaPruningModifier, {"mask_structure": "2:4"}),
        ("llm-compressor SparseGPT unstructured 50%", SparseGPTModifier, {}),
    ]
    return [
        _measure(label, val, _llmc_oneshot(calib, cls(sparsity=0.5, ignore=IGNORE, **options)))
        for label, cls, options in variants
    ]


def _torchao(granularity: Any) -> Callable[[torch.nn.Module], None]:
    """torchao ``quantize_`` with int4 symmetric weight-only round-to-nearest on the block Linears."""
    from torchao.quantization import IntxWeightOnlyConfig, quantize_

    def run(model: torch.nn.Module) -> None:
        config = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=granularity)
        quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn != "lm_head")

    return run


def quant_rows(val: list, calib: list, actorder: bool = False, gptq: bool = True) -> list[Row]:
    """``(label, held-out ppl, seconds)`` of the peers' 4-bit symmetric weight-only one-shot of the
    210 block Linears: llm-compressor GPTQ without act-order (as lightcook's; ``actorder``: also
    with llm-compressor's default ``actorder: static``), calibrated on ``calib``, and RTN, per
    channel and per group of 64; torchao int4 RTN per channel, group 64 and group 32 (the rows of a
    peer that does not import are skipped with a printed message); ``gptq=False``: the data-free
    (RTN) rows only."""
    rows: list[Row] = []
    why = missing("llm-compressor")
    if why:
        print(why, flush=True)
    else:
        from llmcompressor.modifiers.gptq import GPTQModifier
        from llmcompressor.modifiers.quantization import QuantizationModifier

        for strategy, name in (("channel", "per-channel"), ("group", f"group-{GROUP}")):
            for order in ((None, "static") if actorder else (None,)) if gptq else ():
                recipe = GPTQModifier(config_groups=_w4(strategy), ignore=IGNORE, actorder=order)
                suffix = "" if order is None else f", act-order {order}"
                rows.append(
                    _measure(f"llm-compressor GPTQ W4 {name}{suffix}", val, _llmc_oneshot(calib, recipe))
                )
            recipe = QuantizationModifier(config_groups=_w4(strategy), ignore=IGNORE)
            rows.append(_measure(f"llm-compressor RTN W4 {name}", val, _llmc_oneshot(None, recipe)))
    why = missing("torchao")
    if why:
        print(why, flush=True)
    else:
        from torchao.quantization.granularity import PerAxis, PerGroup

        for granularity, name in (
            (PerAxis(0), "per-channel"),
            (PerGroup(GROUP), f"group-{GROUP}"),
            (PerGroup(32), "group-32"),
        ):
            rows.append(_measure(f"torchao int4 RTN {name}", val, _torchao(granularity)))
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-batches", type=int, default=8, help="held-out batches (4 x 128 tokens)")
    parser.add_argument("--calibration-batches", type=int, default=16, help="training batches of 4 sequences")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--only",
        choices=["prune", "quant", "rtn"],
        default=None,
        help="one group of rows (rtn: the data-free quant rows only, about a minute)",
    )
    parser.add_argument(
        "--actorder", action="store_true", help="also GPTQ with llm-compressor's default actorder: static"
    )
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md")
    return parser.parse_args(argv)


def versions() -> str:
    """The peers' and transformers' versions installed here."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("llmcompressor", "compressed-tensors", "torchao", "transformers", "torch"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} missing")
    return ", ".join(found)


def render(args: argparse.Namespace, dense: float, tokens: int, rows: list[Row], wall: float) -> str:
    """The ``## One-shot peers`` section."""
    body = [["dense", f"{dense:.2f}", "1.00x", "—"]]
    body += [[label, f"{ppl:.2f}", f"{ppl / dense:.2f}x", f"{secs:.1f} s"] for label, ppl, secs in rows]
    lines = [
        SECTION,
        "",
        *[
            line.replace(".venv/bin/python", ".venv-bench/bin/python")
            for line in header("peers.py", wall=wall)
        ],
        f"Peers: {versions()} (`make bench-venv`: .venv-bench, benchmark-only). Model: SmolLM2-135M-Instruct; "
        f"data: Shakespeare, block 128, batch 4; held-out ppl over {args.eval_batches} validation batches "
        f"({tokens} predicted tokens), dense measured in the same run; calibration: "
        f"{4 * args.calibration_batches} training sequences of 128 tokens, the same batches as `oneshot.py`. "
        "Each peer compresses the 210 Linears of the 30 decoder layers of a fresh model (LM head and "
        "embeddings float). llm-compressor: `oneshot()` on a tokenized dataset of those sequences, "
        "batch 4, defaults otherwise (sequential pipeline, `dampening_frac` 0.01, `block_size` 128); W4 = 4-bit "
        f"symmetric int weights, per output channel or per group of {GROUP} inputs, activations float; "
        "GPTQ without act-order (as lightcook's)"
        + (" and with llm-compressor's default `actorder: static`" if args.actorder else "")
        + "; "
        "RTN = `QuantizationModifier`, data-free. torchao: `quantize_` with "
        "`IntxWeightOnlyConfig(weight_dtype=torch.int4)` (symmetric round-to-nearest, weights dequantized "
        f"in the forward on CPU). Time: the peer's one-shot call on {args.threads} threads (calibration "
        "included, model load excluded).",
        "",
        *table(
            ["one-shot, no training", "held-out ppl", "vs dense", "time"],
            body,
            "lrrr",
        ),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    _data, val, calib = shakespeare_batches(MODEL, args.eval_batches, args.calibration_batches)
    dense = perplexity(fresh_model(), val)
    print(("dense", dense.value, dense.tokens), flush=True)
    rows: list[Row] = []
    if args.only in (None, "prune"):
        rows += prune_rows(val, calib)
    if args.only in (None, "quant", "rtn"):
        rows += quant_rows(val, calib, actorder=args.actorder, gptq=args.only != "rtn")
    wall = time.perf_counter() - started
    text = render(args, dense.value, dense.tokens, rows, wall)
    print(text)
    if not args.no_docs and rows:
        write_section(BENCHMARKS_MD, SECTION, text)
        print(f"wrote {SECTION!r} of {BENCHMARKS_MD}")


if __name__ == "__main__":
    main()
