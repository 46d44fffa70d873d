"""2:4 semi-structured sparse Linear vs dense on CUDA, at SmolLM2's shapes and larger ones.

    python experiments/bench/sparse_gpu.py --out gpu_sparse.md   # needs a CUDA GPU

Weights are pruned to 2:4 with ``lightcook.ops.sparsity.nm_mask`` and converted with
``torch.sparse.to_sparse_semi_structured`` (what ``lightcook.export.load_compressed`` does on CUDA).
Dense and sparse products are timed interleaved (``lightcook.measure.interleaved``, CUDA-synchronized,
3 warm-up rounds, 50 products per sample); medians of the rounds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lightcook.measure import interleaved, machine  # noqa: E402
from lightcook.ops.sparsity import nm_mask  # noqa: E402

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (4096, 4096), (4096, 11008), (11008, 4096)]


def measure(
    in_f: int, out_f: int, tokens: int, dtype: torch.dtype, rounds: int = 7
) -> tuple[float, float, float]:
    weight = torch.randn(out_f, in_f, device="cuda", dtype=dtype)
    weight = weight * nm_mask(weight.abs().float(), 2, 4).to(dtype)
    sparse = torch.sparse.to_sparse_semi_structured(weight)
    x = torch.randn(tokens, in_f, device="cuda", dtype=dtype)
    err = (F.linear(x, sparse) - F.linear(x, weight)).abs().max().item()
    fns = {"dense": lambda: F.linear(x, weight), "sparse": lambda: F.linear(x, sparse)}
    seconds = interleaved(fns, rounds, warmup=3, inner=50, sync=torch.cuda.synchronize)
    return 1e3 * seconds["dense"], 1e3 * seconds["sparse"], err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA")
    lines = [
        f"GPU: {machine()['cuda']}; torch {torch.__version__}; {args.tokens} tokens; "
        "median of 7 interleaved rounds × 50 products",
        "",
        "| in → out | dtype | dense ms | 2:4 sparse ms | speedup | max abs diff |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for dtype in (torch.float16, torch.bfloat16):
        for in_f, out_f in SHAPES:
            dense, sparse, err = measure(in_f, out_f, args.tokens, dtype)
            name = str(dtype).split(".")[1]
            lines.append(
                f"| {in_f} → {out_f} | {name} | {dense:.4f} | {sparse:.4f} | {dense / sparse:.2f}× | {err:.2e} |"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
