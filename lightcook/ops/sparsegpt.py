"""SparseGPT (Frantar & Alistarh, 2023): one-shot N:M / unstructured pruning of a Linear weight with
the Optimal-Brain-Surgeon update of the weights that remain, in pure torch.

Pruning weight ``j`` of a row costs ``w_j² / [H⁻¹]_jj`` of the layer's squared reconstruction error
``‖WX − ŴX‖²`` (``H = 2 XᵀX``), and the best the later weights of the row can do to compensate is
``−w_j / [H⁻¹]_jj · H⁻¹[j, :]``. SparseGPT visits the columns left to right: the upper Cholesky factor
``U`` of ``H⁻¹`` holds in row ``j`` exactly that update restricted to the columns not yet visited,
and ``U_jj²`` the matching denominator. Masks are chosen by ``w² / U_jj²`` on the weights as updated
so far: per column block (``blocksize``) for unstructured sparsity, per group of ``m`` columns for
N:M. Errors of a block are pushed onto the columns after it in one matrix product.

Example:
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(256, 8) @ torch.randn(8, 8)  # (rows, in): correlated inputs
    >>> weight = torch.randn(4, 8)
    >>> keep = sparsegpt_(weight, 2 * x.T @ x / 256 + 0.01 * torch.eye(8), n=2, m=4)
    >>> keep.sum(1).tolist(), bool((weight[~keep] == 0).all())
    ([4, 4, 4, 4], True)
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightcook.ops.sparsity import nm_mask

__all__ = ["inverse_hessian_factor", "sparsegpt_"]


def _check_pattern(sparsity: float | None, n: int | None, m: int | None, in_f: int) -> None:
    if (sparsity is None) == (n is None or m is None) or (n is None) != (m is None):
        raise ValueError(f"give either sparsity or both n and m, got sparsity={sparsity}, n={n}, m={m}")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity: must lie in [0, 1), got {sparsity!r}")
    if n is not None and m is not None:
        if m < 2 or not 1 <= n < m:
            raise ValueError(f"n: N:M needs 1 <= n < m, got n={n}, m={m}")
        if in_f % m:
            raise ValueError(f"m: {in_f} input features are not divisible by m={m}")


@torch.no_grad()
def inverse_hessian_factor(hessian: Tensor) -> Tensor:
    """Upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``), float32.

    A zero diagonal entry (an input that never varied) is set to 1 first; if ``H`` is still not
    positive definite, growing multiples of its mean diagonal are added until it is.

    Raises:
        ValueError: ``H`` is not square, or not finite.

    Example:
        >>> u = inverse_hessian_factor(torch.tensor([[4.0, 0.0], [0.0, 0.0]]))
        >>> torch.allclose(u.T @ u, torch.tensor([[0.25, 0.0], [0.0, 1.0]]))
        True
    """
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"hessian: must be square (in, in), got shape {tuple(hessian.shape)}")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("hessian: holds NaN or infinite entries")
    work = hessian.detach().float().clone()
    diag = work.diagonal()
    diag.masked_fill_(diag == 0, 1.0)
    scale, extra = float(diag.mean()), 0.0
    for _attempt in range(8):
        factor, info = torch.linalg.cholesky_ex(work + extra * torch.eye(len(work), device=work.device))
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            return torch.linalg.cholesky(inverse, upper=True)
        extra = scale * (1e-6 if extra == 0.0 else 10 * extra / scale)
    raise ValueError("hessian: not positive definite even after damping; raise percdamp")


def _block_quotas(sparsity: float, rows: int, in_f: int, blocksize: int) -> list[int]:
    """Weights to drop per column block, so the total is exactly ``round(sparsity * rows * in_f)``."""
    edges = [*range(0, in_f, blocksize), in_f]
    cumulative = [round(sparsity * rows * e) for e in edges]
    return [b - a for a, b in zip(cumulative, cumulative[1:], strict=False)]


def _drop_k(scores: Tensor, k: int) -> Tensor:
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        keep.view(-1)[scores.reshape(-1).topk(k, largest=False).indices] = False
    return keep


@torch.no_grad()
def sparsegpt_(
    weight: Tensor,
    hessian: Tensor,
    *,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
    blocksize: int = 128,
) -> Tensor:
    """Prune ``weight`` ``(out, in)`` in place with SparseGPT; return the keep-mask (True = kept).

    Math in float32; the result is written back in ``weight``'s dtype, pruned entries exactly zero.

    Args:
        weight: a Linear weight ``(out, in)`` (a transposed view of a ``Conv1D`` weight works).
        hessian: the layer's input Hessian ``2 XᵀX / rows`` ``(in, in)``, dampened
            (:func:`lightcook.ops.calibrate.dampen_`).
        sparsity: unstructured: drop exactly ``round(sparsity * numel)`` weights, chosen per column
            block (the adaptive mask of the paper), in ``[0, 1)``.
        n, m: N:M: keep ``n`` of every ``m`` consecutive inputs in each row (give both, not ``sparsity``).
        blocksize: columns per block (>= 1; for N:M rounded up to a multiple of ``m``).

    Returns:
        Bool mask ``(out, in)``.

    Raises:
        ValueError: neither or both patterns, a pattern outside its range, ``in`` not divisible by
            ``m``, ``blocksize < 1``, shapes that do not match, a Hessian that is not finite.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight: must be 2-D (out, in), got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    _check_pattern(sparsity, n, m, in_f)
    if blocksize < 1:
        raise ValueError(f"blocksize: must be >= 1, got {blocksize!r}")
    if hessian.shape != (in_f, in_f):
        raise ValueError(f"hessian: expected shape ({in_f}, {in_f}) for weight {tuple(weight.shape)}")
    if m is not None:
        blocksize = -(-blocksize // m) * m
    u = inverse_hessian_factor(hessian.to(weight.device))  # (in, in), upper
    w = weight.detach().float().clone()  # (out, in)
    keep = torch.ones_like(w, dtype=torch.bool)
    quotas = _block_quotas(sparsity, out_f, in_f, blocksize) if sparsity is not None else None
    for index, start in enumerate(range(0, in_f, blocksize)):
        end = min(start + blocksize, in_f)
        quota = quotas[index] if quotas is not None else None
        errors = _prune_block(w[:, start:end], u[start:end, start:end], keep[:, start:end], quota, n, m)
        w[:, end:] -= errors @ u[start:end, end:]  # (out, B) @ (B, rest)
    weight.copy_(w * keep)
    return keep


def _prune_block(
    w: Tensor, u: Tensor, keep: Tensor, quota: int | None, n: int | None, m: int | None
) -> Tensor:
    """Prune one column block in place (``w``, ``keep`` are views); return the scaled errors ``(out, B)``."""
    diag = u.diagonal()  # (B,)
    if quota is not None:
        keep.copy_(_drop_k(w.square() / diag.square(), quota))
    errors = torch.zeros_like(w)
    for col in range(w.shape[1]):
        if n is not None and m is not None and col % m == 0:
            group = slice(col, col + m)
            keep[:, group] = nm_mask(w[:, group].square() / diag[group].square(), n, m)
        kept = w[:, col] * keep[:, col]
        err = (w[:, col] - kept) / diag[col]  # (out,)
        w[:, col + 1 :].addr_(err, u[col, col + 1 :], alpha=-1.0)  # rank-1 OBS update of the later columns
        w[:, col] = kept
        errors[:, col] = err
    return errors
