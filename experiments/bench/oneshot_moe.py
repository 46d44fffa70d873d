"""Benchmark one-shot carved MoE (CMoE) of SmolLM2-135M-Instruct's gated FFNs (CPU).

Measures, in one process, the held-out perplexity of

* the dense model;
* carved MoE, 25% of each FFN computed — ``num_experts`` 32, ``shared_experts`` 4 always-on, top 4 of
  the 28 routed experts: (4 + 4) / 32 — through :class:`~lightcook.callbacks.moefication.MoEficationCallback`
  (``split: carve``, ``router: representative``: no router training), no training step;
* the existing co-activation split at 25% (top 8 of 32, MLP router fitted), without ReLU-fication,
  no training step, for comparison;
* carved MoE + ``--steps`` fine-tuning steps (experts = the FFN weights, and the routers, with
  the model; a real ``Trainer.fit`` with the callback), against the dense model fine-tuned the same
  steps on the same data (the ratio that counts);

and the forward time of one FFN (layer 15) at batch-1 decode (1 x 1 token) and at a 1 x 128 prefill:
Hugging Face ``LlamaMLP`` vs the carved ``MoEFFN`` (sparse path) with the same weights, interleaved
repeats, medians. It rewrites the ``## One-shot carved MoE`` section of docs/benchmarks.md.

    .venv/bin/python experiments/bench/oneshot_moe.py --threads 2
    # a smoke run that leaves docs/benchmarks.md alone
    .venv/bin/python experiments/bench/oneshot_moe.py --eval-batches 1 --calibration-batches 1 --steps 2 \
        --repeats 3 --no-docs
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
from _common import BENCHMARKS_MD, cpu_trainer, header, shakespeare_batches

from lightcook.callbacks.moefication import MoEficationCallback
from lightcook.measure import interleaved, perplexity
from lightcook.modules import CausalLMModule
from lightcook.ops.moe import MoEFFN
from lightcook.render import table, write_section

MODEL = "smollm2-135m-instruct"
SECTION = "## One-shot carved MoE"
LAYER = 15  # the FFN timed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-batches", type=int, default=8, help="held-out batches (4 x 128 tokens)")
    parser.add_argument("--calibration-batches", type=int, default=16, help="training batches of 4 sequences")
    parser.add_argument("--steps", type=int, default=100, help="fine-tuning steps after the carve")
    parser.add_argument("--lr", type=float, default=1e-4, help="fine-tuning peak learning rate (AdamW)")
    parser.add_argument("--experts", type=int, default=32, help="compress.moe.num_experts")
    parser.add_argument("--shared", type=int, default=4, help="compress.moe.shared_experts (always on)")
    parser.add_argument(
        "--top-k", type=int, default=4, help="routed experts per token: (shared + top-k) / experts"
    )
    parser.add_argument("--active-fraction", type=float, default=0.25, help="compress.moe.active_fraction")
    parser.add_argument("--repeats", type=int, default=30, help="interleaved FFN timing repeats")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md")
    return parser.parse_args(argv)


def carve_callback(args: argparse.Namespace, calibration: int, **kwargs) -> MoEficationCallback:
    return MoEficationCallback(
        num_experts=args.experts,
        shared_experts=args.shared,
        top_k=args.top_k,
        split="carve",
        router="representative",
        active_fraction=args.active_fraction,
        calibration_batches=calibration,
        plot=False,
        **kwargs,
    )


def one_shot(cb: MoEficationCallback, calib: list[dict]) -> tuple[CausalLMModule, float]:
    """A fresh model MoEfied once through the callback's code path; returns it and the seconds taken."""
    module = CausalLMModule(name_or_path=MODEL)
    cb.prepare_model(None, module)
    started = time.perf_counter()
    cb.split_experts(module, calib)
    return module, time.perf_counter() - started


def fine_tuned(args: argparse.Namespace, data, callbacks: list) -> tuple[CausalLMModule, float]:
    """``args.steps`` AdamW steps on the training data (same order for every run: seed 0)."""
    module = CausalLMModule(name_or_path=MODEL, lr=args.lr, warmup_steps=3)
    torch.manual_seed(0)
    started = time.perf_counter()
    cpu_trainer(args.steps, callbacks, gradient_clip_val=None).fit(module, data)
    return module, time.perf_counter() - started


def ffn_speed(
    carved: CausalLMModule, args: argparse.Namespace, val: list[dict]
) -> dict[str, dict[str, float]]:
    """Median seconds of the dense ``LlamaMLP`` and of the carved ``MoEFFN`` (same weights) at decode
    (1 x 1) and prefill (1 x 128), on real inputs of that layer."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    moe: MoEFFN = carved.model.model.layers[LAYER].mlp
    dense = LlamaMLP(carved.model.config).eval()
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):  # permuted neurons: the same dense function
            getattr(dense, name).weight.copy_(getattr(moe, name).weight)
    seen: list[torch.Tensor] = []
    hook = moe.register_forward_pre_hook(lambda _m, a: seen.append(a[0][:1].clone()))
    with torch.no_grad():
        carved.model(input_ids=val[0]["input_ids"])
    hook.remove()
    prefill = seen[0]  # (1, 128, d)
    decode = prefill[:, -1:].contiguous()  # (1, 1, d)
    out: dict[str, dict[str, float]] = {}
    torch.set_num_threads(args.threads)
    with torch.no_grad():
        for label, x in (("decode 1x1", decode), ("prefill 1x128", prefill)):
            inner = 20 if x.shape[1] == 1 else 2
            out[label] = interleaved(
                {"dense": partial(dense, x), "carved": partial(moe, x)}, args.repeats, warmup=3, inner=inner
            )
            print(f"[carve] FFN {label}: {out[label]}", flush=True)
    return out


def run(args: argparse.Namespace) -> dict:
    data, val, calib = shakespeare_batches(MODEL, args.eval_batches, args.calibration_batches)
    res: dict = {"tokens": 0, "rows": []}
    dense = perplexity(CausalLMModule(name_or_path=MODEL).model, val)
    res["tokens"], res["dense"] = dense.tokens, dense.value
    print(("dense", dense.value), flush=True)

    cb = carve_callback(args, len(calib))
    carved, secs = one_shot(cb, calib)
    res["carved"] = (perplexity(carved.model, val).value, secs)
    print(("carved, no training", res["carved"]), flush=True)
    res["ffn"] = ffn_speed(carved, args, val)
    del carved

    co = MoEficationCallback(
        num_experts=args.experts, top_k=args.experts // 4, split="coactivation", router="mlp",
        calibration_batches=len(calib), plot=False,
    )  # fmt: skip
    coact, secs = one_shot(co, calib)
    res["coactivation"] = (perplexity(coact.model, val).value, secs)
    print(("coactivation 25%, no training", res["coactivation"]), flush=True)
    del coact

    if args.steps:
        tuned, secs = fine_tuned(args, data, [])
        res["dense_ft"] = (perplexity(tuned.model, val).value, secs)
        print((f"dense fine-tuned {args.steps}", res["dense_ft"]), flush=True)
        del tuned
        ft_cb = carve_callback(args, len(calib))
        tuned, secs = fine_tuned(args, data, [ft_cb])
        res["carved_ft"] = (perplexity(tuned.model, val).value, secs)
        print((f"carved + {args.steps}", res["carved_ft"], ft_cb.summary()), flush=True)
    return res


def render(args: argparse.Namespace, res: dict, wall: float) -> str:
    dense = res["dense"]
    share = f"{(args.shared + args.top_k) / args.experts:.1%}".replace(".0%", "%")
    body = [["dense", "100%", f"{dense:.2f}", "1.00x", "—", "—"]]
    body.append(
        [f"carved (CMoE): {args.shared} shared + top {args.top_k} of {args.experts - args.shared} routed, representative router",
         share, f"{res['carved'][0]:.2f}", f"{res['carved'][0] / dense:.2f}x", "—", f"{res['carved'][1]:.1f} s"]
    )  # fmt: skip
    body.append(
        [f"co-activation split, top {args.experts // 4} of {args.experts}, MLP router (no relufy)", "25%",
         f"{res['coactivation'][0]:.2f}", f"{res['coactivation'][0] / dense:.2f}x", "—",
         f"{res['coactivation'][1]:.1f} s"]
    )  # fmt: skip
    if "carved_ft" in res:
        ft = res["dense_ft"][0]
        body.append(
            [f"dense, fine-tuned {args.steps} steps", "100%", f"{ft:.2f}", f"{ft / dense:.2f}x", "1.00x",
             f"{res['dense_ft'][1]:.0f} s"]
        )  # fmt: skip
        body.append(
            [f"carved + {args.steps} fine-tuning steps (experts and routers)", share,
             f"{res['carved_ft'][0]:.2f}", f"{res['carved_ft'][0] / dense:.2f}x",
             f"{res['carved_ft'][0] / ft:.2f}x", f"{res['carved_ft'][1]:.0f} s"]
        )  # fmt: skip
    speed = [
        [label, f"{m['dense'] * 1e3:.3f}", f"{m['carved'] * 1e3:.3f}", f"{m['dense'] / m['carved']:.2f}x"]
        for label, m in res["ffn"].items()
    ]
    lines = [
        SECTION,
        "",
        *header("oneshot_moe.py", wall=wall),
        f"Model: SmolLM2-135M-Instruct (30 SwiGLU FFNs, d_ff 1536, no ReLU-fication); data: Shakespeare, "
        f"block 128, batch 4; held-out ppl over {args.eval_batches} validation batches ({res['tokens']} "
        f"predicted tokens); calibration: {4 * args.calibration_batches} training sequences (activations "
        f"captured on the dense model). Share of each FFN computed = (shared + routed top-k) / experts. Carve: "
        f"`split: carve`, `shared_experts: {args.shared}`, `top_k: {args.top_k}`, `num_experts: {args.experts}` "
        f"({1536 // args.experts} neurons "
        f"each), `active_fraction: {args.active_fraction}`, `router: representative` (built from the weights "
        "of each expert's representative neuron, no router training). Co-activation: the existing split, MLP "
        "routers fitted 200 Adam steps on the calibration tokens. Fine-tuning: AdamW, lr "
        f"{args.lr}, 3 warm-up steps, batch 4 x 128, {args.threads} threads, the same data order for dense and "
        "carved; the carved run trains every weight (experts = the FFN weights) and the representative routers "
        "(router loss added). Time: the one-shot (calibration capture + carve/split + router fit), or the fit.",
        "",
        *table(
            ["model", "FFN computed", "held-out ppl", "vs dense", "vs dense fine-tuned", "time"],
            body,
            "lrrrrr",
        ),
        "",
        f"FFN forward, layer {LAYER}, real inputs, {args.threads} threads, median of {args.repeats} interleaved "
        "repeats: Hugging Face `LlamaMLP` vs the carved `MoEFFN` (sparse path: the shared experts for every "
        "token, then the top-4 routed experts grouped by expert) with the same weights.",
        "",
        *table(["shape", "dense FFN ms", f"carved {share} ms", "speed-up"], speed, "lrrr"),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    res = run(args)
    text = render(args, res, time.time() - started)
    print(text)
    if not args.no_docs:
        write_section(BENCHMARKS_MD, SECTION, text)


if __name__ == "__main__":
    main()
