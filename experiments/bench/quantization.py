"""Benchmark QuantizationCallback on SmolLM2-135M-Instruct with the Shakespeare corpus (CPU).

Measures, in one process:

1. quality: held-out perplexity (ctx 128) of the dense model, the dense model fine-tuned ``--steps``
   AdamW steps, W8A8 and W4A8 (and W2A8 with ``--w2``) post-training quantization, and QAT with the
   same data and token budget through a real ``Trainer`` (W8A8 absmax; W4A8 / W2A8 with PACT, LSQ
   and dynamic scaling side by side). Quantized models are evaluated with gradients off, i.e. on
   the integer kernel, exactly as the export runs;
2. QAT step time / plain step time: both models in one process, steps interleaved, medians;
3. exported bytes: quantized-layer weights (codes + scales) vs the same weights in fp32, and the
   whole export folder vs the dense fp32 ``save_pretrained`` folder;
4. inference speed: per-Linear forward at SmolLM2 shapes on 2048 tokens (fp32, bf16, int8 layer
   with dynamic activation quantization, int8 GEMM alone) and end to end at 8 x 256 tokens (dense
   fp32, dense bf16, exported W8A8 model), interleaved repeats, medians;
5. agreement: max / mean |delta logit| between the fake-quant model (no grad) and its export.

It rewrites the ``## Quantization`` section of docs/benchmarks.md (other sections are kept).

    .venv/bin/python experiments/bench/quantization.py                    # ~15 min on 2 quiet cores
    .venv/bin/python experiments/bench/quantization.py --steps 2 --eval-batches 1 --repeats 1 --no-docs
    .venv/bin/python experiments/bench/quantization.py --gpu --out gpu.md  # CUDA kernels only, random weights
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import BENCHMARKS_MD, cpu_trainer

from lightcook.measure import bytes_on_disk, interleaved, machine, perplexity
from lightcook.ops.quant import Int8Linear
from lightcook.render import machine_line, write_section

MODEL = "smollm2-135m-instruct"
SECTION = "## Quantization"
#: SmolLM2-135M Linear shapes (in -> out): q/o, k/v, gate/up, down.
SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
METHODS = ("pact", "lsq", "dynamic")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="fine-tune / QAT steps (4 x 128 tokens each)")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (dense and QAT)")
    parser.add_argument("--eval-batches", type=int, default=4, help="held-out batches of 4 x 128 tokens")
    parser.add_argument("--w2", action="store_true", help="also W2A8 PTQ and QAT with each method")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing repeats (medians)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gpu", action="store_true", help="only the CUDA kernel microbenchmarks")
    parser.add_argument("--out", type=Path, default=None, help="--gpu: write results (markdown + json) here")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md")
    parser.add_argument(
        "--tiny", action="store_true", help="smoke test: random 2-layer model, implies --no-docs"
    )
    parser.add_argument("--json", type=Path, default=None, help="also save the raw results here")
    parser.add_argument(
        "--from-json", type=Path, default=None, help="re-render saved results (measures nothing)"
    )
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- timing


def linear_variants(x: torch.Tensor, in_f: int, out_f: int) -> dict[str, Callable[[], Any]]:
    """fp32 / bf16 / int8 forward of one Linear (random weights, SmolLM2 init scale) on ``x``."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(in_f, out_f, bias=False, device=x.device)
    torch.nn.init.normal_(lin.weight, std=0.02)
    lin.weight.requires_grad_(False)
    q = Int8Linear.from_float(lin)  # per-channel absmax weights, dynamic per-token activations
    w32, w16, x16 = lin.weight, lin.weight.bfloat16(), x.bfloat16()
    a8 = torch.randint(-127, 128, (x.shape[0], in_f), dtype=torch.int8, device=x.device)
    w8t = q.weight_codes.t()
    return {
        "fp32": lambda: F.linear(x, w32),
        "bf16": lambda: F.linear(x16, w16),
        "int8 layer": lambda: q(x),
        "int8 GEMM": lambda: torch._int_mm(a8, w8t),
    }


# --------------------------------------------------------------------------- CUDA kernels (--gpu)


def gpu_kernels(args: argparse.Namespace, device: str = "cuda") -> dict[str, Any]:
    """int8 GEMMs (torch._int_mm, cpm_kernels when importable) and the int8 layer vs bf16 / fp16 on CUDA."""
    from lightcook.ops.quant import _cpm_int8_matmul

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA")
    sync = torch.cuda.synchronize if device == "cuda" else None
    facts = machine()
    name = facts["cuda"] if device == "cuda" else facts["cpu"]
    device, tokens, rows = torch.device(device), 2048, []
    for in_f, out_f in SHAPES:
        x = torch.randn(tokens, in_f, device=device)
        fns = linear_variants(x, in_f, out_f)
        a8 = torch.randint(-127, 128, (tokens, in_f), dtype=torch.int8, device=device)
        w8 = torch.randint(-127, 128, (out_f, in_f), dtype=torch.int8, device=device)
        x_half, w_half = x.half(), (0.02 * torch.randn(out_f, in_f, device=device)).half()
        fns["fp16"] = lambda x_half=x_half, w_half=w_half: F.linear(x_half, w_half)
        if _cpm_int8_matmul(a8, w8) is not None:  # None: not installed or unusable here
            fns["cpm_kernels GEMM"] = lambda a8=a8, w8=w8: _cpm_int8_matmul(a8, w8)
        times = interleaved(fns, args.repeats, inner=50, sync=sync)
        rows.append({"shape": f"{in_f}->{out_f}", **{k: v * 1e6 for k, v in times.items()}})
    return {
        "device": name,
        "torch": torch.__version__,
        "tokens": tokens,
        "us": rows,
        "int8 layer kernel": "cpm_kernels" if "cpm_kernels GEMM" in rows[0] else "torch._int_mm (padded)",
    }


def gpu_markdown(res: dict[str, Any]) -> str:
    cols = [c for c in res["us"][0] if c != "shape"]
    lines = [
        f"CUDA kernels on {res['device']} (torch {res['torch']}), {res['tokens']} tokens, microseconds "
        f"per call (median); the int8 layer (dynamic per-token quantization + GEMM + rescale) used "
        f"{res['int8 layer kernel']}.",
        "",
        "| shape (in->out) | " + " | ".join(cols) + " | bf16 / int8 layer |",
        "|---|" + "---:|" * (len(cols) + 1),
    ]
    for r in res["us"]:
        cells = " | ".join(f"{r[c]:.1f}" for c in cols)
        lines.append(f"| {r['shape']} | {cells} | {r['bf16'] / r['int8 layer']:.2f}x |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- quality (CPU)


#: ``--tiny`` swaps SmolLM2 for a random 2-layer Llama with its tokenizer (a smoke test of this script).
TINY = {
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
}
_SOURCE: dict[str, Any] = {"name_or_path": MODEL}


def load_module(lr: float) -> Any:
    from lightcook.modules import CausalLMModule

    return CausalLMModule(**_SOURCE, lr=lr, warmup_steps=3)


def quant_callback(bits: int, method: str):
    from lightcook.callbacks.quantization import QuantizationCallback

    return QuantizationCallback(bits=bits, method=method)


def fine_tune(args, data, callbacks: list) -> tuple[Any, float]:
    """``--steps`` AdamW steps through a real Trainer (same seed, same batches for every run)."""
    import lightning as L

    L.seed_everything(0, verbose=False)
    module = load_module(args.lr)
    trainer = cpu_trainer(args.steps, callbacks)
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=data.train_dataloader())
    seconds = time.perf_counter() - start
    module.zero_grad(set_to_none=True)
    module.trainer = None  # drop the trainer and its AdamW state (2 x 540 MB): memory is shared here
    return module, seconds


def quality(args, data, evals: list[dict]) -> tuple[list[dict], dict[str, Any]]:
    """Perplexity rows, plus the models the later sections reuse (W8A8 / W4A8-LSQ QAT)."""
    rows, keep = [], {}

    def row(name: str, model, seconds: float | None = None) -> None:
        ppl = perplexity(model, evals).value
        rows.append({"model": name, "ppl": ppl, "train_s": seconds})
        print(f"  {name:28s} ppl {ppl:8.2f}" + (f"  ({seconds:.0f} s)" if seconds else ""), flush=True)

    row("dense (pretrained)", load_module(args.lr).model)
    module, seconds = fine_tune(args, data, [])
    row(f"dense fine-tuned {args.steps} steps", module.model, seconds)
    del module
    for bits in (8, 4, 2) if args.w2 else (8, 4):
        ptq = load_module(args.lr)
        quant_callback(bits, "absmax").prepare_model(None, ptq)
        row(f"W{bits}A8 PTQ (absmax)", ptq.model)
        del ptq
        for method in ("absmax",) if bits == 8 else METHODS:
            module, seconds = fine_tune(args, data, [quant_callback(bits, method)])
            row(f"W{bits}A8 QAT {method} {args.steps} steps", module.model, seconds)
            if (bits, method) in ((8, "absmax"), (4, "lsq")):
                keep[f"W{bits}A8"] = module
            del module
    return rows, keep


# --------------------------------------------------------------------------- cost (CPU)


def step_time_ratio(args, data) -> dict[str, dict[str, float]]:
    """Seconds per AdamW step (4 x 128 tokens), plain vs QAT, interleaved, medians; one QAT
    variant at a time next to the plain model (W8A8 absmax, then W4A8 LSQ) to bound memory."""
    batch = next(iter(data.train_dataloader()))
    plain = load_module(args.lr).train()
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-6)
    results = {}
    for bits, method in ((8, "absmax"), (4, "lsq")):
        qat = load_module(args.lr).train()
        quant_callback(bits, method).prepare_model(None, qat)
        qat_opt = torch.optim.AdamW(qat.parameters(), lr=1e-6)
        times = interleaved(
            {
                "plain": lambda: _step(plain, plain_opt, batch),
                "qat": lambda m=qat, o=qat_opt: _step(m, o, batch),
            },
            args.repeats,
        )
        results[f"W{bits}A8 {method}"] = times
        del qat, qat_opt
    return results


def _step(module, optimizer, batch) -> None:
    loss, _ = module.compute_loss(batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def exported_bytes(keep: dict[str, Any], tmp: Path) -> tuple[list[dict], dict[str, Path]]:
    from lightcook.export import read_manifest, save_compressed

    load_module(1e-4).model.save_pretrained(tmp / "dense-fp32")
    dense_bytes = bytes_on_disk(tmp / "dense-fp32")
    rows, paths = [], {}
    for name, module in keep.items():
        paths[name] = save_compressed(module.model, tmp / name, nm=None)
        manifest = read_manifest(paths[name])
        rows.append(
            {
                "export": name,
                "layer_bytes": manifest["weight_bytes"],
                "layer_fp32_bytes": manifest["fp32_weight_bytes"],
                "folder_bytes": bytes_on_disk(paths[name]),
                "dense_folder_bytes": dense_bytes,
            }
        )
    return rows, paths


@torch.no_grad()
def agreement(keep: dict[str, Any], paths: dict[str, Path], evals: list[dict]) -> list[dict]:
    from lightcook.export import load_compressed

    rows = []
    for name, module in keep.items():
        loaded, gaps = load_compressed(paths[name]), []
        module.model.eval()
        for batch in evals:
            ids = batch["input_ids"]
            gaps.append((module.model(input_ids=ids).logits - loaded(input_ids=ids).logits).abs().flatten())
        gap = torch.cat(gaps)
        rows.append(
            {"export": name, "max": float(gap.max()), "mean": float(gap.mean()), "tokens": gap.numel()}
        )
    return rows


@torch.no_grad()
def speed(args, paths: dict[str, Path]) -> tuple[list[dict], dict[str, float]]:
    from lightcook.export import load_compressed

    layers = []
    x = torch.randn(2048, max(i for i, _ in SHAPES))
    for in_f, out_f in SHAPES:
        times = interleaved(
            linear_variants(x[:, :in_f].contiguous(), in_f, out_f), max(args.repeats, 5), inner=5
        )
        layers.append({"shape": f"{in_f}->{out_f}", **{k: v * 1e3 for k, v in times.items()}})
        print(
            f"  {in_f}->{out_f}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in times.items()), flush=True
        )
    fp32 = load_module(1e-4).model.eval()
    bf16 = load_module(1e-4).model.eval().to(torch.bfloat16)
    int8 = load_compressed(paths["W8A8"])
    ids = torch.randint(0, fp32.config.vocab_size, (8, 256), generator=torch.Generator().manual_seed(0))
    models = {"dense fp32": fp32, "dense bf16": bf16, "W8A8 int8 export": int8}
    e2e = interleaved(
        {k: (lambda m=m: m(input_ids=ids)) for k, m in models.items()}, max(2, args.repeats // 2)
    )
    return layers, e2e


# --------------------------------------------------------------------------- report


def markdown(args, res: dict[str, Any]) -> str:
    ppl = {r["model"]: r["ppl"] for r in res["quality"]}
    dense_ft = ppl[f"dense fine-tuned {args.steps} steps"]
    lines = [
        SECTION,
        "",
        f"Command: `{res['command']}`  ",
        f"Machine: {res['machine']} Total {res['wall_min']:.1f} min.  ",
        f"Model SmolLM2-135M-Instruct (weights converted from a Q4_1 GGUF), Shakespeare held-out plays, "
        f"ctx 128, {res['eval_tokens']} evaluation tokens. Fine-tune and QAT: {args.steps} AdamW steps of "
        f"4 x 128 tokens (same seed and batches for every run), lr {args.lr:g}, warmup 3, cosine; "
        f"per-channel symmetric weights, 8-bit dynamic per-token activations; quantized models evaluated "
        f"with gradients off (the int8 kernel the export uses).",
        "",
        "| model | held-out ppl | / dense fine-tuned | train s |",
        "|---|---:|---:|---:|",
    ]
    for r in res["quality"]:
        secs = f"{r['train_s']:.0f}" if r["train_s"] else ""
        lines.append(f"| {r['model']} | {r['ppl']:.2f} | {r['ppl'] / dense_ft:.3f} | {secs} |")
    lines += [
        "",
        f"QAT step time / plain step time (AdamW step at 4 x 128, {args.repeats} interleaved repeats, "
        "medians): "
        + ", ".join(
            f"{k} {t['qat'] / t['plain']:.3f} ({t['qat']:.2f} s vs {t['plain']:.2f} s)"
            for k, t in res["step_time"].items()
        )
        + ".",
        "",
        "| export | quantized-layer weights / fp32 | export folder / dense fp32 folder |",
        "|---|---:|---:|",
    ]
    for r in res["bytes"]:
        lines.append(
            f"| {r['export']} | {r['layer_bytes'] / r['layer_fp32_bytes']:.3f} "
            f"({r['layer_bytes'] / 2**20:.1f} / {r['layer_fp32_bytes'] / 2**20:.1f} MiB) | "
            f"{r['folder_bytes'] / r['dense_folder_bytes']:.3f} "
            f"({r['folder_bytes'] / 2**20:.1f} / {r['dense_folder_bytes'] / 2**20:.1f} MiB) |"
        )
    lines += [
        "",
        "Fake-quant model (no grad) vs loaded export, held-out logits: "
        + "; ".join(
            f"{r['export']} max {r['max']:.3g}, mean {r['mean']:.3g} ({r['tokens']:,} logits)"
            for r in res["agreement"]
        )
        + ".",
        "",
        "Per-Linear forward, 2048 tokens, ms (median); int8 layer = dynamic per-token activation "
        "quantization + `torch._int_mm` + rescale, fp32 in and out:",
        "",
        "| shape (in->out) | fp32 | bf16 | int8 layer | int8 GEMM only | fp32 / int8 layer | bf16 / int8 layer |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["layers"]:
        lines.append(
            f"| {r['shape']} | {r['fp32']:.2f} | {r['bf16']:.2f} | {r['int8 layer']:.2f} | {r['int8 GEMM']:.2f} "
            f"| {r['fp32'] / r['int8 layer']:.2f}x | {r['bf16'] / r['int8 layer']:.2f}x |"
        )
    e2e = res["e2e"]
    lines += [
        "",
        "End-to-end forward at 8 x 256 tokens, s (median): "
        + ", ".join(f"{k} {v:.2f}" for k, v in e2e.items())
        + f"; fp32 / int8 {e2e['dense fp32'] / e2e['W8A8 int8 export']:.2f}x, "
        f"bf16 / int8 {e2e['dense bf16'] / e2e['W8A8 int8 export']:.2f}x.",
        "",
        *goals(args, res, ppl, dense_ft),
        "",
    ]
    return "\n".join(lines)


def goals(args, res: dict[str, Any], ppl: dict[str, float], dense_ft: float) -> list[str]:
    """The issue's targets next to what this run measured."""
    steps = args.steps
    w8 = ppl[f"W8A8 QAT absmax {steps} steps"] / dense_ft
    w4_ptq = ppl["W4A8 PTQ (absmax)"]
    w4 = ", ".join(f"{m} {ppl[f'W4A8 QAT {m} {steps} steps']:.2f}" for m in METHODS)
    steps_ratio = ", ".join(f"{k} {t['qat'] / t['plain']:.3f}" for k, t in res["step_time"].items())
    size = {r["export"]: r["layer_bytes"] / r["layer_fp32_bytes"] for r in res["bytes"]}
    fp32 = [r["fp32"] / r["int8 layer"] for r in res["layers"]]
    bf16 = [r["bf16"] / r["int8 layer"] for r in res["layers"]]
    e2e = res["e2e"]
    w2 = [] if args.w2 else ["- W2A8 (PTQ and QAT with each method) was not part of this run (`--w2`)."]
    return [
        "Targets of issue #3 against this run:",
        "",
        f"- W8A8 QAT ppl <= 1.01 x dense fine-tuned (same tokens): {w8:.3f}.",
        f"- W4A8 QAT clearly below W4A8 PTQ ({w4_ptq:.2f}): {w4}.",
        f"- QAT step time / plain <= 1.15: {steps_ratio}.",
        f"- exported quantized-layer weights int8 / fp32 <= 0.27: {size['W8A8']:.3f}; "
        f"int4 / fp32 <= 0.15: {size['W4A8']:.3f}.",
        f"- int8 Linear >= 3x fp32: {min(fp32):.2f}x to {max(fp32):.2f}x; >= 1.5x bf16: "
        f"{min(bf16):.2f}x to {max(bf16):.2f}x (end to end at 8 x 256: "
        f"{e2e['dense fp32'] / e2e['W8A8 int8 export']:.2f}x fp32, "
        f"{e2e['dense bf16'] / e2e['W8A8 int8 export']:.2f}x bf16).",
        *w2,
    ]


def cpu_main(args: argparse.Namespace) -> dict[str, Any]:
    from lightcook.data import TextDataModule

    started = time.perf_counter()
    data = TextDataModule(tokenizer=MODEL, block_size=128, batch_size=4)
    data.setup()
    evals = [b for _, b in zip(range(args.eval_batches), data.val_dataloader())]
    res: dict[str, Any] = {
        "command": "python " + " ".join([sys.argv[0].split("lightcook/", 1)[-1], *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(),
        "eval_tokens": sum(b["labels"][:, 1:].numel() for b in evals),
        "load_start": (machine()["load_average"] or [float("nan")])[0],  # other jobs skew timings
    }
    print("quality", flush=True)
    res["quality"], keep = quality(args, data, evals)
    print("step time", flush=True)
    res["step_time"] = step_time_ratio(args, data)
    print("bytes, agreement, speed", flush=True)
    with tempfile.TemporaryDirectory(prefix="lightcook-bench-") as tmp:
        res["bytes"], paths = exported_bytes(keep, Path(tmp))
        res["agreement"] = agreement(keep, paths, evals[:2])
        del keep
        res["layers"], res["e2e"] = speed(args, paths)
    res["wall_min"] = (time.perf_counter() - started) / 60
    res["machine"] = f"{machine_line(machine())} (load average {res.pop('load_start'):.1f} at the start)"
    return res


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.gpu:
        res = gpu_kernels(args)
        text = gpu_markdown(res)
        print(text)
        if args.out:
            args.out.write_text(text + "\n```json\n" + json.dumps(res, indent=2) + "\n```\n")
        return
    if args.tiny:
        _SOURCE.clear()
        _SOURCE.update(config=TINY, tokenizer=MODEL)
    if args.from_json:  # the run's own settings, from its recorded command line
        res = json.loads(args.from_json.read_text())
        args = parse_args(res["command"].split()[2:])
    else:
        res = cpu_main(args)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str) + "\n")
    text = markdown(args, res)
    print(text)
    print(json.dumps(res, indent=2, default=str))
    if not (args.no_docs or args.tiny):
        write_section(BENCHMARKS_MD, SECTION, text)


if __name__ == "__main__":
    main()
