"""Benchmark the export formats of SmolLM2-135M-Instruct: bytes on disk and held-out perplexity of
each folder as its real consumer reloads it (CPU).

For each compressed model — one-shot, no training step: W8A8 (per-channel weights, per-token
dynamic int8 activations, RTN), W4A16 group 32 and group 64 (GPTQ), 2:4 SparseGPT, and 2:4 SparseGPT
then W8A8 — it writes, in one process:

- the lightcook folder (``save_compressed``), reloaded with ``load_compressed`` (its kernels);
- the compressed-tensors folder (``save_compressed_tensors``), reloaded with plain
  ``transformers.AutoModelForCausalLM.from_pretrained``;
- the GGUF file (``save_gguf``, float weights bf16; trained codes kept where Q8_0 / Q4_0 hold them),
  reloaded with transformers' ``gguf_file=`` reader (dequantized to float);

and the dense fp32 ``save_pretrained`` folder, plus dense GGUF bf16 / Q8_0 / Q4_0 files for reference.
Bytes: the weights, config and manifest (tokenizer files excluded). Held-out ppl over 8 validation
batches of 4 x 128 tokens (4,064 predicted tokens), 64 calibration sequences, as in
experiments/bench/oneshot.py. It rewrites the ``## Export formats`` section of docs/benchmarks.md.

    .venv/bin/python experiments/bench/formats.py --threads 2
    .venv/bin/python experiments/bench/formats.py --eval-batches 1 --calibration-batches 1 --only W8A8 --no-docs
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import torch
from _common import BENCHMARKS_MD, header, shakespeare_batches
from oneshot import MODEL, one_shot

from lightcook.callbacks.quantization import QuantizationCallback
from lightcook.export import load_compressed, save_compressed
from lightcook.export.compressed_tensors import save_compressed_tensors
from lightcook.export.convert import GGUF_FILE, open_with_transformers
from lightcook.export.gguf import save_gguf
from lightcook.io import model_bytes
from lightcook.measure import perplexity
from lightcook.modules import CausalLMModule
from lightcook.ops.names import MASK
from lightcook.ops.quant import QuantLinear
from lightcook.render import table, write_section

SECTION = "## Export formats"
W8A8 = {"bits": 8, "granularity": "channel", "activations": "dynamic", "init": "none"}
VARIANTS = [  # (label, N:M one-shot or None, QuantizationCallback options or None)
    ("W8A8 (RTN)", None, W8A8),
    (
        "W4A16 g32 (GPTQ)",
        None,
        {"bits": 4, "granularity": "group", "group_size": 32, "activations": "none", "init": "gptq"},
    ),
    (
        "W4A16 g64 (GPTQ)",
        None,
        {"bits": 4, "granularity": "group", "group_size": 64, "activations": "none", "init": "gptq"},
    ),
    ("2:4 (SparseGPT)", {"criterion": "sparsegpt"}, None),
    ("2:4 (SparseGPT) + W8A8", {"criterion": "sparsegpt"}, W8A8),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--calibration-batches", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None, help="variant labels (prefix match)")
    parser.add_argument("--no-docs", action="store_true")
    return parser.parse_args(argv)


def compressed(calib: list, prune: dict | None, quant: dict | None) -> CausalLMModule:
    """SmolLM2 pruned once (SparseGPT) and/or quantized once (RTN or GPTQ) through the callbacks."""
    module = one_shot(calib, prune)[0] if prune is not None else CausalLMModule(name_or_path=MODEL)
    masks = {
        n: getattr(m, MASK)
        for n, m in module.model.named_modules()
        if isinstance(getattr(m, MASK, None), torch.Tensor)
    }
    if quant is not None:
        cb = QuantizationCallback(calibration_batches=len(calib), **quant)
        cb.prepare_once(None, module)
        for name, mask in masks.items():  # the pruned zeros stay in the quantized layers' codes
            layer = module.model.get_submodule(name)
            if isinstance(layer, QuantLinear):
                layer.register_buffer(MASK, mask)
        if cb.config.init == "gptq":
            cb.gptq(module, batches=calib)
    return module


def measure(
    label: str, module: CausalLMModule, nm: tuple[int, int] | None, val: list, root: Path
) -> list[list[str]]:
    """One row per folder of ``module``: format, bytes, held-out ppl as reloaded."""
    model = module.model.eval()
    live = perplexity(model, val).value
    out = [[label, "live network (fake-quant / masked)", "—", f"{live:.2f}"]]
    lc = save_compressed(model, root / "lc", nm=nm)
    out.append([label, "lightcook (`load_compressed`)", _mb(model_bytes(lc)), _ppl(load_compressed(lc), val)])
    ct = save_compressed_tensors(model, root / "ct", nm=nm)
    out.append(
        [
            label,
            "compressed-tensors (transformers)",
            _mb(model_bytes(ct)),
            _ppl(open_with_transformers(ct, "compressed-tensors"), val),
        ]
    )
    (root / "gguf").mkdir(exist_ok=True)
    written = save_gguf(model, root / "gguf" / GGUF_FILE, gguf_type="bf16", nm=nm)
    kinds = sorted({written.types[f"{n}.weight"] for n in written.exact})
    note = (
        f"GGUF bf16 + {'/'.join(kinds)} exact (transformers `gguf_file=`)"
        if kinds
        else "GGUF bf16 (transformers `gguf_file=`)"
    )
    if written.requantized:
        note += f"; {len(written.requantized)} layers re-quantized"
    out.append(
        [
            label,
            note,
            _mb(model_bytes(written.path)),
            _ppl(open_with_transformers(root / "gguf", "gguf"), val),
        ]
    )
    for row in out:
        print(row, flush=True)
    return out


def _ppl(model: torch.nn.Module, val: list) -> str:
    value = perplexity(model.eval(), val).value
    del model
    gc.collect()
    return f"{value:.2f}"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    _, val, calib = shakespeare_batches(MODEL, args.eval_batches, args.calibration_batches)
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dense = CausalLMModule(name_or_path=MODEL).model.eval()
        dense_ppl = perplexity(dense, val)
        dense.save_pretrained(root / "dense")
        rows.append(
            ["dense", "fp32 `save_pretrained`", _mb(model_bytes(root / "dense")), f"{dense_ppl.value:.2f}"]
        )
        for gguf_type in ("bf16", "q8_0", "q4_0"):
            folder = root / f"dense-{gguf_type}"
            folder.mkdir()
            save_gguf(dense, folder / GGUF_FILE, gguf_type=gguf_type)
            label = (
                f"GGUF {gguf_type}"
                + (" (embedding Q8_0)" if gguf_type == "q4_0" else "")
                + ", re-quantized by gguf"
            )
            rows.append(
                [
                    "dense",
                    label,
                    _mb(model_bytes(folder / GGUF_FILE)),
                    _ppl(open_with_transformers(folder, "gguf"), val),
                ]
            )
            print(rows[-1], flush=True)
        del dense
        for label, prune, quant in VARIANTS:
            if args.only and not any(label.startswith(o) for o in args.only):
                continue
            module = compressed(calib, prune, quant)
            rows += measure(
                label, module, (2, 4) if prune else None, val, root / label.split()[0].replace(":", "")
            )
            del module
            gc.collect()
    text = "\n".join(
        [
            SECTION,
            "",
            *header("formats.py", wall=time.time() - started),
            f"Model: SmolLM2-135M-Instruct; one-shot, no training step ({4 * args.calibration_batches} "
            "calibration sequences; W8A8 = per-channel int8 weights RTN + per-token dynamic int8 activations, "
            "W4A16 = 4-bit symmetric GPTQ weights, float activations; 2:4 = SparseGPT; LM head and embeddings "
            f"float). Held-out ppl over {args.eval_batches} validation batches ({dense_ppl.tokens} predicted "
            "tokens) of each folder as its consumer reloads it: lightcook through `load_compressed`, "
            "compressed-tensors through plain `AutoModelForCausalLM.from_pretrained`, GGUF through "
            "transformers' `gguf_file=` reader. Bytes: weights + config + manifest (tokenizer files and model "
            "card excluded). The GGUF float weights (embeddings, norms) are bf16; the quantized layers keep "
            "their trained codes in Q8_0 / Q4_0 blocks (fp16 block scales). 2:4 is stored dense in "
            "compressed-tensors and GGUF (no sparse format there). compressed-tensors W8A8 rounds activations "
            "with amax/127.5 where lightcook uses amax/127; transformers' GGUF reader computes in float.",
            "",
            *table(["model", "folder (reloaded by)", "bytes", "held-out ppl"], rows, "llrr"),
            "",
        ]
    )
    print(text)
    if not args.no_docs:
        write_section(BENCHMARKS_MD, SECTION, text)


if __name__ == "__main__":
    main()
