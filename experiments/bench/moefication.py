"""Benchmark MoEficationCallback on SmolLM2-135M-Instruct with the Shakespeare corpus (CPU).

Measures, in one process:

1. activation sparsity of SmolLM2's SwiGLU FFNs (SiLU), and after ReLU-fication + fine-tune;
2. held-out perplexity at 10 / 25 / 50 % of the experts with the MLP router (and the oracle router
   at 25 % for reference), for (a) the original SiLU model MoEfied as is (split + router fit, no
   training) and (b) ReLU-fication: ``--relu-steps`` dense ReLU fine-tuning steps, then the split,
   then ``--moe-steps`` routed fine-tuning steps at 25 % (a real ``Trainer.fit`` with the callback);
3. speed of one FFN at SmolLM2's shapes (d 576, d_ff 1536, 8 x 256 tokens): the Hugging Face
   ``LlamaMLP`` vs the MoE FFN at 25 % of the experts with the trained router of (b), interleaved
   repeats, medians, at 1 and 2 threads; and the end-to-end forward of the whole model (dense vs
   MoE at 25 %) on the same tokens;
4. the expert-load heatmap (layers x experts) of model (b) on the held-out batches, as
   docs/moefication_expert_load.png.

It rewrites the ``## MoEfication`` section of docs/benchmarks.md (other sections are kept).

    .venv/bin/python experiments/bench/moefication.py                 # ~30 min on 2 idle CPU cores
    .venv/bin/python experiments/bench/moefication.py --relu-steps 1 --moe-steps 1 --eval-batches 1 \
        --repeats 1 --router-steps 5 --calibration-batches 1 --no-docs  # smoke run
"""

from __future__ import annotations

import argparse
import copy
import itertools
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from _common import BENCHMARKS_MD, cpu_trainer, header

from lightcook.callbacks.moefication import MoEficationCallback
from lightcook.data import TextDataModule
from lightcook.measure import interleaved, perplexity
from lightcook.modules import CausalLMModule
from lightcook.ops.moe import (
    MoEFFN,
    OracleRouter,
    coactivation_partition,
    expert_mass,
    moe_modules,
    partition_permutation,
    release_workspaces,
    set_top_k,
    train_mlp_router,
)
from lightcook.render import expert_load_figure, save_figure, write_section

MODEL = "smollm2-135m-instruct"
ROOT = Path(__file__).resolve().parents[2]
HEATMAP = ROOT / "docs" / "moefication_expert_load.png"
SECTION = "## MoEfication"
FRACTIONS = (0.10, 0.25, 0.50)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=32, help="experts per FFN (1536 / 32 = 48 neurons)")
    parser.add_argument(
        "--relu-steps", type=int, default=120, help="dense ReLU fine-tuning steps before the split"
    )
    parser.add_argument("--moe-steps", type=int, default=40, help="routed fine-tuning steps after the split")
    parser.add_argument("--lr", type=float, default=3e-4, help="fine-tune peak learning rate")
    parser.add_argument("--eval-batches", type=int, default=4, help="held-out batches (4 x 128 tokens)")
    parser.add_argument(
        "--calibration-batches", type=int, default=16, help="batches captured for split + routers"
    )
    parser.add_argument("--router-steps", type=int, default=200, help="Adam steps per MLP router")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing repeats")
    parser.add_argument(
        "--threads", type=int, default=2, help="threads for training, evaluation, model speed"
    )
    parser.add_argument(
        "--no-dense-reference",
        action="store_true",
        help="skip the dense SiLU model fine-tuned for the same steps (the same-budget reference row)",
    )
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- helpers


def moe_callback(args: argparse.Namespace, **kwargs) -> MoEficationCallback:
    return MoEficationCallback(
        num_experts=args.experts,
        top_k=args.experts // 4,
        calibration_batches=args.calibration_batches,
        router_steps=args.router_steps,
        plot=False,
        **kwargs,
    )


def sweep(
    model: torch.nn.Module, val: list[dict], label: str, rows: list, oracle: bool = True
) -> dict[float, float]:
    """ppl at every fraction of experts (MLP router), then the oracle router at 25 %."""
    out = {}
    for fraction in FRACTIONS:
        set_top_k(model, fraction)
        out[fraction] = perplexity(model, val).value
        rows.append((label, f"{fraction:.0%}", "MLP", out[fraction]))
        print(f"[moe] {label}: {fraction:.0%} experts, MLP router: ppl {out[fraction]:.2f}", flush=True)
    if oracle:
        layers = moe_modules(model)
        routers = {name: m.router for name, m in layers.items()}
        for m in layers.values():
            m.router = OracleRouter(m.num_experts)
        set_top_k(model, 0.25)
        ppl = perplexity(model, val).value
        rows.append((label, "25%", "oracle", ppl))
        print(f"[moe] {label}: 25% experts, oracle router: ppl {ppl:.2f}", flush=True)
        for name, m in layers.items():
            m.router = routers[name]
    set_top_k(model, 0.25)
    return out


# --------------------------------------------------------------------------- parts


def without_relu(args, train, val, rows) -> dict:
    module = CausalLMModule(name_or_path=MODEL)
    cb = moe_callback(args)
    cb.prepare_model(None, module)
    started = time.time()
    cb.split_experts(module, train)
    split_seconds = time.time() - started
    print(f"[moe] SiLU split + router fit: {split_seconds:.0f} s; state {cb.state}", flush=True)
    sweep(module.model, val, "SiLU (original), no training", rows)
    return {"sparsity": cb.state["sparsity_before"], "split_seconds": split_seconds}


def dense_fine_tuned(args, data, val) -> float:
    """Held-out ppl of the dense SiLU model fine-tuned as long as the ReLU-fied one (same data order,
    optimizer and schedule): what the same training budget buys without MoEfication."""
    module = CausalLMModule(name_or_path=MODEL, lr=args.lr, warmup_steps=3)
    torch.manual_seed(0)
    cpu_trainer(args.relu_steps + args.moe_steps, [], gradient_clip_val=None).fit(module, data)
    ppl = perplexity(module.model, val).value
    print(f"[moe] dense SiLU fine-tuned {args.relu_steps + args.moe_steps} steps: ppl {ppl:.2f}", flush=True)
    return ppl


def with_relu(args, data, val, rows, root: Path) -> tuple[CausalLMModule, dict]:
    module = CausalLMModule(name_or_path=MODEL, lr=args.lr, warmup_steps=3)
    cb = moe_callback(args, relufy=True, split_step=args.relu_steps)
    trainer = cpu_trainer(args.relu_steps + args.moe_steps, [cb], root, gradient_clip_val=None)
    torch.manual_seed(0)  # the same data order as the dense reference
    started = time.time()
    trainer.fit(module, data)
    fit_seconds = time.time() - started
    print(f"[moe] ReLU-fication fit: {fit_seconds:.0f} s; state {cb.state}", flush=True)
    label = f"ReLU-fied, {args.relu_steps} dense + {args.moe_steps} routed steps"
    set_top_k(module.model, args.experts)
    dense_relu = perplexity(module.model, val).value  # every expert = the fine-tuned dense ReLU model
    rows.append((label, "100%", "-", dense_relu))
    sweep(module.model, val, label, rows)
    return module, {"state": cb.state, "fit_seconds": fit_seconds, "dense_relu": dense_relu}


@torch.no_grad()
def layer_inputs(module: CausalLMModule, batches: list[dict], layer: int = 0) -> torch.Tensor:
    """The inputs ``(N, d)`` of one FFN on ``batches`` (forward pre-hook)."""
    seen = []
    hook = module.model.model.layers[layer].mlp.register_forward_pre_hook(
        lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).clone())
    )
    module.model.eval()
    for batch in batches:
        module.model(input_ids=batch["input_ids"])
    hook.remove()
    return torch.cat(seen)


def coarse_moe(fine: MoEFFN, x_train: torch.Tensor, args) -> MoEFFN:
    """The same FFN split into half as many (twice larger) experts: co-activation split on the
    captured inputs, MLP router fitted like the callback does."""
    experts = args.experts // 2
    ffn = torch.nn.Module()
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(ffn, name, copy.deepcopy(getattr(fine, name)))
    ffn.act_fn = fine.act_fn
    moe = MoEFFN.from_ffn(ffn, ["gate_proj", "up_proj"], "down_proj", "act_fn", True, experts, experts // 4)
    moe.set_relu(bool(fine.relu))
    with torch.no_grad():
        h = moe.intermediate(x_train).abs()  # (N, d_ff)
        moe.permute_(partition_permutation(coactivation_partition(h.t() @ h, experts), experts))
        mass = expert_mass(moe.intermediate(x_train), experts)
    train_mlp_router(moe.router, x_train, mass, args.router_steps)
    moe.set_routed(True)
    return moe.eval()


def ffn_speed(module: CausalLMModule, train: list[dict], val: list[dict], args) -> dict:
    """Layer 0 of the ReLU-fied MoE model (its trained router) and a coarser split of it vs the
    Hugging Face dense ``LlamaMLP`` with the same weights, on 8 x 256 real layer-0 inputs."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    fine: MoEFFN = module.model.model.layers[0].mlp
    dense = LlamaMLP(module.model.config).eval()
    dense.act_fn = torch.nn.ReLU() if bool(fine.relu) else dense.act_fn
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(dense, name).weight.copy_(getattr(fine, name).weight)
    x_val = layer_inputs(module, val)
    x = x_val[torch.arange(8 * 256) % x_val.shape[0]].view(8, 256, -1)  # (B, T, d)
    coarse = coarse_moe(fine, layer_inputs(module, train), args)
    fine.set_top_k(args.experts // 4)
    with torch.no_grad():
        reference = dense(x)
        errors = {
            name: float((m(x) - reference).norm() / reference.norm())
            for name, m in (("fine", fine), ("coarse", coarse))
        }
    timings = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.no_grad():
            medians = interleaved(
                {"dense": partial(dense, x), "fine": partial(fine, x), "coarse": partial(coarse, x)},
                args.repeats,
            )
        timings.append((threads, medians))
        print(f"[moe] FFN 8x256, {threads} thread(s): {medians}; relative errors {errors}", flush=True)
    torch.set_num_threads(args.threads)
    return {"timings": timings, "errors": errors}


def model_speed(module: CausalLMModule, dense_model: torch.nn.Module, args) -> dict[str, float]:
    ids = torch.randint(
        0, module.model.config.vocab_size, (8, 256), generator=torch.Generator().manual_seed(1)
    )
    set_top_k(module.model, 0.25)
    module.model.eval()
    variants = {
        "dense": lambda: dense_model(input_ids=ids),
        "moe25": lambda: module.model(input_ids=ids),
    }
    with torch.no_grad():
        medians = interleaved(variants, max(1, args.repeats // 2))
    print(f"[moe] model forward 8x256: {medians}", flush=True)
    return medians


@torch.no_grad()
def heatmap(module: CausalLMModule, val: list[dict], path: Path) -> list[list[float]]:
    moes = moe_modules(module.model)
    for m in moes.values():
        m.load_counts.zero_()
    set_top_k(module.model, 0.25)
    perplexity(module.model, val)  # the forward passes count the routed tokens
    load = torch.stack([m.load_counts.double() for m in moes.values()])  # (layers, E)
    save_figure(expert_load_figure(load.tolist(), list(moes), "held-out tokens, 25% of the experts"), path)
    return (load / load.mean(1, keepdim=True)).tolist()


# --------------------------------------------------------------------------- report


def fmt_sparsity(s: dict | None) -> str:
    if not s:
        return "n/a"
    return f"zeros {s['zero_fraction']:.1%}, neurons for 90% of the mass {s['mass_fraction']:.1%}"


def threads_note(ms: dict[int, dict[str, float]]) -> str:
    """One sentence on 1 vs 2 threads, stating only what the measured medians show."""
    if 1 not in ms or 2 not in ms:
        return ""
    slower = [k for k in ("dense", "fine", "coarse") if ms[2][k] > ms[1][k]]
    if not slower:
        return "2 threads were faster than 1 for every variant."
    return (
        f"2 threads were slower than 1 here for: {', '.join(slower)}. With both cores shared with other busy "
        "processes, every OpenMP parallel region can wait for a descheduled thread; the dense FFN is 3 large "
        "kernels, the sparse path a few dozen smaller ones (two batched matmuls per expert group), so it "
        "suffers more."
    )


def ppl_table(args, dense_ppl: float, tuned_ppl: float | None, rows: list) -> list[str]:
    """The perplexity table: ratios to the pretrained dense model and, when measured, to the dense
    model fine-tuned for the same steps as the ReLU-fied rows (the fair reference for those)."""
    steps = args.relu_steps + args.moe_steps
    if tuned_ppl is None:
        return [
            "| model | experts used | router | held-out ppl | × dense |",
            "|---|---:|---|---:|---:|",
            f"| dense SmolLM2 (SiLU) | 100% | - | {dense_ppl:.2f} | 1.00 |",
            *[f"| {m} | {f} | {r} | {p:.2f} | {p / dense_ppl:.2f} |" for m, f, r, p in rows],
            "",
        ]
    return [
        f"| model | experts used | router | held-out ppl | × dense | × dense fine-tuned {steps} steps |",
        "|---|---:|---|---:|---:|---:|",
        f"| dense SmolLM2 (SiLU) | 100% | - | {dense_ppl:.2f} | 1.00 | {dense_ppl / tuned_ppl:.2f} |",
        f"| dense SmolLM2 (SiLU), fine-tuned {steps} steps | 100% | - | {tuned_ppl:.2f} | "
        f"{tuned_ppl / dense_ppl:.2f} | 1.00 |",
        *[
            f"| {m} | {f} | {r} | {p:.2f} | {p / dense_ppl:.2f} | {p / tuned_ppl:.2f} |"
            for m, f, r, p in rows
        ],
        "",
    ]


def report(args, wall, dense_ppl, tuned_ppl, rows, silu, relu, ffn, model, shares) -> str:
    fine_m, coarse_m = 1536 // args.experts, 2 * 1536 // args.experts
    ms = {t: {k: v * 1e3 for k, v in m.items()} for t, m in ffn["timings"]}
    imbalance = [max(r) for r in shares]
    lines = [
        SECTION,
        "",
        *header("moefication.py", wall=wall),
        "Timings are medians of interleaved repeats in one process.",
        f"Model: SmolLM2-135M-Instruct (30 SwiGLU FFNs, d_ff 1536) split into {args.experts} experts of "
        f"{fine_m} neurons (co-activation split); data: Shakespeare, block 128, batch 4; held-out "
        f"ppl over {args.eval_batches} validation batches ({args.eval_batches * 4 * 127} predicted tokens); "
        f"split and routers from {args.calibration_batches} training batches, MLP routers (hidden 128) fitted "
        f"for {args.router_steps} Adam steps; {args.threads} thread(s) for training and evaluation. CPU "
        f"budget: ReLU-fication is {args.relu_steps} dense + {args.moe_steps} routed AdamW steps "
        f"(lr {args.lr}, {(args.relu_steps + args.moe_steps) * 512} tokens), far below the paper's fine-tuning.",
        "",
        f"Activation sparsity (mean over FFNs, calibration tokens): SiLU original: {fmt_sparsity(silu['sparsity'])}; "
        f"ReLU-fied after {args.relu_steps} steps: {fmt_sparsity(relu['state']['sparsity_at_split'])}.",
        "",
        *ppl_table(args, dense_ppl, tuned_ppl, rows),
        "Speed of one FFN at SmolLM2's shapes: layer 0 of the ReLU-fied model on 8 × 256 of its real held-out "
        f"inputs; Hugging Face `LlamaMLP` (same weights) vs `MoEFFN` at 25% of the experts (sparse path, MLP "
        f"router): the trained {args.experts}-expert layer, and the same FFN re-split into {args.experts // 2} "
        f"experts of {coarse_m} neurons (router fitted on the layer's calibration inputs); median of "
        f"{args.repeats} interleaved repeats. Relative output error vs dense at 25%: {args.experts} experts "
        f"{ffn['errors']['fine']:.3f}, {args.experts // 2} experts {ffn['errors']['coarse']:.3f}.",
        "",
        f"| threads | dense FFN ms | {args.experts} experts, 25% ms | speed-up | {args.experts // 2} experts, 25% ms | speed-up |",
        "|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {t} | {m['dense']:.1f} | {m['fine']:.1f} | {m['dense'] / m['fine']:.2f}× | {m['coarse']:.1f} | "
            f"{m['dense'] / m['coarse']:.2f}× |"
            for t, m in ms.items()
        ],
        "",
        threads_note(ms),
        "",
        f"End-to-end forward of the whole model, 8 × 256 tokens, {args.threads} thread(s): dense "
        f"{model['dense']:.2f} s, MoE 25% ({args.experts} experts) {model['moe25']:.2f} s "
        f"({model['dense'] / model['moe25']:.2f}×; the LM head, embeddings and attention are unchanged).",
        "",
        f"Expert load on the held-out batches at 25% (`docs/{HEATMAP.name}`, layers × experts, colour = load / "
        f"the layer's mean load): max/mean per layer from {min(imbalance):.2f} to {max(imbalance):.2f} "
        f"(at most {args.experts // (args.experts // 4)} at 25%: some experts are picked by nearly every token).",
        "",
        f"![expert load]({HEATMAP.name})",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    torch.manual_seed(0)  # the training loader shuffles: the calibration batches are seeded too
    data = TextDataModule(tokenizer=MODEL, block_size=128, batch_size=4)
    data.setup("fit")
    val = list(itertools.islice(data.val_dataloader(), args.eval_batches))
    train = list(itertools.islice(data.train_dataloader(), args.calibration_batches))
    dense = CausalLMModule(name_or_path=MODEL).model.eval()
    dense_ppl = perplexity(dense, val).value
    print(f"[moe] dense ppl {dense_ppl:.2f}", flush=True)
    rows: list[tuple[str, str, str, float]] = []
    tuned_ppl = None if args.no_dense_reference else dense_fine_tuned(args, data, val)
    silu = without_relu(args, train, val, rows)
    release_workspaces()
    with tempfile.TemporaryDirectory() as root:
        module, relu = with_relu(args, data, val, rows, Path(root))
    shares = heatmap(module, val, Path(tempfile.mkdtemp()) / HEATMAP.name if args.no_docs else HEATMAP)
    ffn = ffn_speed(module, train, val, args)
    model = model_speed(module, copy.deepcopy(dense), args)
    text = report(args, time.time() - started, dense_ppl, tuned_ppl, rows, silu, relu, ffn, model, shares)
    print(text)
    if not args.no_docs:
        write_section(BENCHMARKS_MD, SECTION, text)


if __name__ == "__main__":
    main()
