"""N:M and unstructured sparsity math for Linear weights, in pure torch.

Weights are ``nn.Linear`` weights of shape ``(out, in)``. N:M groups run along the
input dim: each row is cut into consecutive groups of ``m`` elements, of which ``n``
are kept. Every function here is vectorised over groups and blocks.

Contents:
    masks: :func:`nm_mask`, :func:`nm_mask_transposable`, :func:`unstructured_mask`,
        :func:`global_unstructured_masks`, :func:`ramp_mask`, :func:`is_nm`.
    scores: :func:`wanda_scores`, :class:`InputNormAccumulator`.
    storage: :func:`pack_nm`, :func:`unpack_nm`, :func:`nm_index_bits`, :func:`nm_storage_bytes`.
    training: :func:`sr_ste`, :func:`apply_mask_`.
    configuration and transforms: :class:`NMConfig`, :func:`prepare_` (mask buffers, SR-STE),
        :func:`compute_masks_`, :func:`apply_masks_`, :func:`record_input_norms`,
        :func:`convert_` (fold SR-STE for inference); layouts: :func:`dense_weight`, :func:`as_out_in`.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightcook.ops.config import TechniqueConfig, check_choice, check_int, check_number
from lightcook.ops.names import MASK, is_conv1d, linear_like, linear_names

__all__ = [
    "MAX_TRANSPOSABLE_M",
    "InputNormAccumulator",
    "NMConfig",
    "apply_mask_",
    "apply_masks_",
    "as_out_in",
    "compute_masks_",
    "convert_",
    "dense_weight",
    "global_unstructured_masks",
    "is_nm",
    "nm_index_bits",
    "nm_mask",
    "nm_mask_transposable",
    "nm_storage_bytes",
    "pack_nm",
    "prepare_",
    "ramp_mask",
    "record_input_norms",
    "sparsity_of",
    "sr_ste",
    "unpack_nm",
    "unstructured_mask",
    "wanda_scores",
]

MAX_TRANSPOSABLE_M = 4
"""Largest ``m`` for :func:`nm_mask_transposable`: the pattern table explodes beyond it."""

_MAX_PACK_M = 16  # 4-bit position codes


# --------------------------------------------------------------------------- validation


def _check_nm(n: int, m: int) -> None:
    if m < 2 or not 1 <= n < m:
        raise ValueError(f"N:M sparsity needs 1 <= n < m, got n={n}, m={m}")


def _check_2d(name: str, t: Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (out, in), got shape {tuple(t.shape)}")


def _check_in_features(in_features: int, m: int) -> None:
    if in_features % m != 0:
        raise ValueError(f"in-features ({in_features}) must be divisible by m ({m}) for N:M sparsity")


def _check_same_shape(a: Tensor, b: Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")


# --------------------------------------------------------------------------- N:M masks


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive inputs.

    Args:
        scores: importance scores, shape ``(out, in)``; higher is kept.
        n: kept elements per group.
        m: group size along dim 1.

    Returns:
        Bool mask of shape ``(out, in)`` with exactly ``n`` True per group. Ties are
        broken deterministically by ``torch.topk``.

    Example:
        >>> nm_mask(torch.tensor([[4.0, 1.0, 3.0, 2.0]]), 2, 4)
        tensor([[ True, False,  True, False]])
    """
    _check_nm(n, m)
    _check_2d("scores", scores)
    out_f, in_f = scores.shape
    _check_in_features(in_f, m)
    groups = scores.reshape(out_f, in_f // m, m)  # (out, G, m)
    top = groups.topk(n, dim=-1).indices  # (out, G, n)
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return mask.reshape(out_f, in_f)


def is_nm(mask: Tensor, n: int, m: int) -> bool:
    """Whether a 2-D bool mask keeps exactly ``n`` of every ``m`` consecutive inputs.

    Example:
        >>> is_nm(torch.tensor([[True, False, True, False]]), 2, 4)
        True
    """
    if mask.dim() != 2 or mask.shape[1] % m != 0:
        return False
    counts = mask.reshape(mask.shape[0], -1, m).sum(-1)  # (out, G)
    return bool((counts == n).all())


@functools.lru_cache(maxsize=32)
def _transposable_patterns(n: int, m: int, device: torch.device) -> Tensor:
    """All m x m 0/1 matrices with ``n`` ones per row and column, shape ``(P, m*m)``.

    Built once per ``(n, m, device)``: 90 patterns for 2:4, 24 for 1:4.
    """
    rows = [[1 if j in c else 0 for j in range(m)] for c in itertools.combinations(range(m), n)]
    table = torch.tensor(list(itertools.product(rows, repeat=m)), dtype=torch.float32)  # (R^m, m, m)
    valid = (table.sum(1) == n).all(-1)  # column sums; row sums hold by construction
    return table[valid].reshape(-1, m * m).to(device)  # (P, m*m)


def nm_mask_transposable(scores: Tensor, n: int, m: int) -> Tensor:
    """Exact N:M mask whose transpose is also N:M (for sparse backward passes).

    Every ``m x m`` block gets exactly ``n`` kept entries per row and per column,
    choosing the pattern that maximises the kept score sum within the block. All
    valid patterns are enumerated once and scored against every block with one
    matmul, so ``m`` is limited to :data:`MAX_TRANSPOSABLE_M`.

    Args:
        scores: importance scores, shape ``(out, in)``; both dims divisible by ``m``.
        n: kept elements per row and column of each block.
        m: block size.

    Returns:
        Bool mask of shape ``(out, in)``.

    Example:
        >>> mask = nm_mask_transposable(torch.rand(8, 8), 2, 4)
        >>> is_nm(mask, 2, 4) and is_nm(mask.T, 2, 4)
        True
    """
    _check_nm(n, m)
    if m > MAX_TRANSPOSABLE_M:
        raise ValueError(
            f"nm_mask_transposable supports m <= {MAX_TRANSPOSABLE_M}, got m={m}: the table of "
            f"valid m x m patterns grows combinatorially (90 for 2:4, millions for 4:8)"
        )
    _check_2d("scores", scores)
    out_f, in_f = scores.shape
    if out_f % m or in_f % m:
        raise ValueError(f"out-features ({out_f}) and in-features ({in_f}) must both be divisible by m ({m})")
    patterns = _transposable_patterns(n, m, scores.device)  # (P, m*m)
    work_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    blocks = scores.to(work_dtype).reshape(out_f // m, m, in_f // m, m).permute(0, 2, 1, 3)  # (Bo, Bi, m, m)
    best = (blocks.reshape(-1, m * m) @ patterns.to(work_dtype).T).argmax(-1)  # (B,)
    chosen = patterns[best].bool().reshape(out_f // m, in_f // m, m, m)  # (Bo, Bi, m, m)
    return chosen.permute(0, 2, 1, 3).reshape(out_f, in_f)


# --------------------------------------------------------------------------- unstructured


def _drop_lowest(flat: Tensor, k: int) -> Tensor:
    """Bool keep-mask over 1-D ``flat`` dropping exactly its ``k`` lowest entries.

    Ties at the threshold are broken by position (earlier entries dropped first).
    """
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k <= 0:
        return keep
    if k >= flat.numel():
        return ~keep
    threshold = flat.kthvalue(k).values
    below = flat < threshold
    keep &= ~below
    at = (flat == threshold).nonzero().squeeze(-1)  # positions tied at the threshold
    keep[at[: k - int(below.sum())]] = False
    return keep


def unstructured_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Drop exactly ``round(sparsity * numel)`` lowest-scoring entries.

    Args:
        scores: importance scores, any shape.
        sparsity: fraction to drop, in ``[0, 1)``.

    Returns:
        Bool mask shaped like ``scores``.

    Example:
        >>> unstructured_mask(torch.tensor([3.0, 1.0, 2.0, 4.0]), 0.5)
        tensor([ True, False, False,  True])
    """
    _check_sparsity(sparsity)
    k = round(sparsity * scores.numel())
    return _drop_lowest(scores.reshape(-1), k).reshape(scores.shape)


def global_unstructured_masks(scores: dict[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """Unstructured masks with one threshold shared by all tensors.

    Exactly ``round(sparsity * total_numel)`` entries are dropped in total, so tensors
    with small scores are pruned more than tensors with large ones.

    Args:
        scores: name -> score tensor (any shapes, same device).
        sparsity: overall fraction to drop, in ``[0, 1)``.

    Returns:
        name -> bool mask shaped like the scores.

    Example:
        >>> masks = global_unstructured_masks({"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([9.0, 8.0])}, 0.5)
        >>> masks["a"].tolist(), masks["b"].tolist()
        ([False, False], [True, True])
    """
    _check_sparsity(sparsity)
    if not scores:
        return {}
    flats = [s.reshape(-1).float() for s in scores.values()]
    total = sum(f.numel() for f in flats)
    keep = _drop_lowest(torch.cat(flats), round(sparsity * total))
    parts = keep.split([f.numel() for f in flats])
    return {name: part.reshape(s.shape) for (name, s), part in zip(scores.items(), parts)}


def ramp_mask(scores: Tensor, final_mask: Tensor, fraction: float) -> Tensor:
    """Intermediate mask of a gradual pruning schedule.

    Of the entries ``final_mask`` drops, drop only the ``round(fraction * num_dropped)``
    lowest-scoring ones; everything else is kept. ``fraction=0`` keeps all,
    ``fraction=1`` reproduces ``final_mask``.

    Args:
        scores: importance scores, any shape.
        final_mask: bool mask at the end of the schedule, same shape.
        fraction: schedule progress in ``[0, 1]``.

    Returns:
        Bool mask, a superset of ``final_mask``.

    Example:
        >>> final = torch.tensor([True, False, False, False])
        >>> ramp_mask(torch.tensor([4.0, 1.0, 3.0, 2.0]), final, 0.5)
        tensor([ True, False,  True, False])
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    _check_same_shape(scores, final_mask, "ramp_mask scores/final_mask")
    dropped = ~final_mask.bool().reshape(-1)  # (numel,)
    candidates = scores.reshape(-1)[dropped]  # (num_dropped,)
    k = round(fraction * candidates.numel())
    keep = torch.ones_like(dropped)
    keep[dropped] = _drop_lowest(candidates, k)
    return keep.reshape(scores.shape)


# --------------------------------------------------------------------------- Wanda scores


def wanda_scores(weight: Tensor, input_sq_norm: Tensor) -> Tensor:
    """Wanda importance ``|W_ij| * ||X_j||_2`` (Sun et al. 2023), in float32.

    Args:
        weight: Linear weight, shape ``(out, in)``.
        input_sq_norm: per-input-feature sum of squared activations, shape ``(in,)``
            (see :class:`InputNormAccumulator`).

    Returns:
        Scores of shape ``(out, in)``.

    Example:
        >>> wanda_scores(torch.tensor([[-1.0, 2.0]]), torch.tensor([4.0, 1.0]))
        tensor([[2., 2.]])
    """
    _check_2d("weight", weight)
    if input_sq_norm.shape != (weight.shape[1],):
        raise ValueError(
            f"input_sq_norm must have shape ({weight.shape[1]},), got {tuple(input_sq_norm.shape)}"
        )
    return weight.detach().abs().float() * input_sq_norm.float().sqrt()  # (out, in) * (in,)


class InputNormAccumulator:
    """Running per-feature sum of squared inputs over all tokens, for Wanda.

    The state lives in tensors (``sum_sq``, ``num_tokens``) so a distributed caller
    can all-reduce them in place.

    Example:
        >>> acc = InputNormAccumulator(2)
        >>> acc.add(torch.tensor([[1.0, 2.0], [3.0, 0.0]]))
        >>> acc.sq_norm
        tensor([10.,  4.])
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.in_features = in_features
        self.sum_sq = torch.zeros(in_features, dtype=torch.float32, device=device)  # (in,)
        self.num_tokens = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, x: Tensor) -> None:
        """Accumulate activations of shape ``(..., in)``."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected last dim {self.in_features}, got shape {tuple(x.shape)}")
        flat = x.detach().reshape(-1, self.in_features).to(self.sum_sq.device, torch.float32)  # (T, in)
        self.sum_sq += flat.pow(2).sum(0)
        self.num_tokens += flat.shape[0]

    @property
    def sq_norm(self) -> Tensor:
        """Sum of squares per input feature, ``||X_j||_2^2``, shape ``(in,)``."""
        return self.sum_sq

    def reset(self) -> None:
        """Zero the state."""
        self.sum_sq.zero_()
        self.num_tokens.zero_()


# --------------------------------------------------------------------------- compact storage


def nm_index_bits(m: int) -> int:
    """Bits per stored position code: 2 for ``m <= 4``, 4 for ``m <= 16``.

    Example:
        >>> nm_index_bits(4), nm_index_bits(8)
        (2, 4)
    """
    if not 2 <= m <= _MAX_PACK_M:
        raise ValueError(f"packed N:M storage supports 2 <= m <= {_MAX_PACK_M}, got m={m}")
    return 2 if m <= 4 else 4


def nm_storage_bytes(out_features: int, in_features: int, n: int, m: int, dtype_bytes: int) -> int:
    """Exact byte count of :func:`pack_nm` output (values + packed indices).

    Example:
        >>> nm_storage_bytes(1, 576, 2, 4, 2) / (576 * 2)
        0.5625
    """
    _check_nm(n, m)
    _check_in_features(in_features, m)
    kept = in_features // m * n
    codes_per_byte = 8 // nm_index_bits(m)
    return out_features * (kept * dtype_bytes + math.ceil(kept / codes_per_byte))


def pack_nm(weight: Tensor, mask: Tensor, n: int, m: int) -> tuple[Tensor, Tensor]:
    """Pack an N:M sparse weight into kept values plus bit-packed in-group positions.

    Position codes (0..m-1) use :func:`nm_index_bits` bits each and are packed
    little-endian: code ``j`` of a byte occupies bits ``[j*b, (j+1)*b)``. Rows are
    zero-padded to whole bytes.

    Args:
        weight: dense weight, shape ``(out, in)``.
        mask: bool mask with exactly ``n`` True per group of ``m``.
        n: kept per group.
        m: group size (at most 16).

    Returns:
        ``values`` of shape ``(out, in // m * n)`` in ``weight.dtype`` and ``indices``
        uint8 of shape ``(out, ceil(in // m * n * bits / 8))``.

    Example:
        >>> w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
        >>> pack_nm(w, torch.tensor([[False, True, False, True]]), 2, 4)
        (tensor([[2., 4.]]), tensor([[13]], dtype=torch.uint8))
    """
    _check_nm(n, m)
    bits = nm_index_bits(m)
    _check_2d("weight", weight)
    _check_same_shape(weight, mask, "pack_nm weight/mask")
    _check_in_features(weight.shape[1], m)
    if not is_nm(mask, n, m):
        raise ValueError(f"mask is not {n}:{m}: every group of {m} must keep exactly {n}")
    out_f, in_f = weight.shape
    groups = mask.reshape(out_f, in_f // m, m).to(torch.uint8)  # (out, G, m)
    pos = groups.sort(dim=-1, descending=True, stable=True).indices[..., :n]  # (out, G, n), ascending
    values = weight.reshape(out_f, in_f // m, m).gather(-1, pos).reshape(out_f, -1)  # (out, G*n)
    return values, _pack_codes(pos.reshape(out_f, -1), bits)


def unpack_nm(values: Tensor, indices: Tensor, n: int, m: int, in_features: int) -> Tensor:
    """Rebuild the dense weight from :func:`pack_nm` output (exact inverse).

    Example:
        >>> unpack_nm(torch.tensor([[2.0, 4.0]]), torch.tensor([[13]], dtype=torch.uint8), 2, 4, 4)
        tensor([[0., 2., 0., 4.]])
    """
    _check_nm(n, m)
    bits = nm_index_bits(m)
    _check_in_features(in_features, m)
    out_f, kept = values.shape
    if kept != in_features // m * n:
        raise ValueError(
            f"values have {kept} columns, expected in_features // m * n = {in_features // m * n}"
        )
    pos = _unpack_codes(indices, bits, kept).reshape(out_f, -1, n)  # (out, G, n)
    dense = values.new_zeros(out_f, in_features // m, m)  # (out, G, m)
    dense.scatter_(-1, pos, values.reshape(out_f, -1, n))
    return dense.reshape(out_f, in_features)


def _pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack ``(rows, L)`` small ints into uint8, ``8 // bits`` per byte, little-endian."""
    per = 8 // bits
    rows, length = codes.shape
    padded = codes.new_zeros(rows, math.ceil(length / per) * per, dtype=torch.int32)
    padded[:, :length] = codes
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits  # (per,)
    return (padded.reshape(rows, -1, per) << shifts).sum(-1).to(torch.uint8)  # (rows, ceil(L/per))


def _unpack_codes(packed: Tensor, bits: int, length: int) -> Tensor:
    """Inverse of :func:`_pack_codes`: ``(rows, bytes)`` uint8 -> ``(rows, length)`` int64."""
    per = 8 // bits
    if packed.shape[1] != math.ceil(length / per):
        raise ValueError(f"indices have {packed.shape[1]} bytes per row, expected {math.ceil(length / per)}")
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits  # (per,)
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (rows, bytes, per)
    return codes.reshape(packed.shape[0], -1)[:, :length].long()


# --------------------------------------------------------------------------- training


class _SRSTE(torch.autograd.Function):
    """Sparse-refined straight-through estimator (Zhou et al. 2021)."""

    @staticmethod
    def forward(ctx, weight: Tensor, mask: Tensor, decay: float) -> Tensor:
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay
        return weight * mask

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        weight, mask = ctx.saved_tensors
        return grad + ctx.decay * (~mask) * weight, None, None


def sr_ste(weight: Tensor, mask: Tensor, decay: float) -> Tensor:
    """Masked weight whose gradient is ``grad + decay * (~mask) * weight`` (SR-STE).

    The dense weight receives the full straight-through gradient of the sparse
    weight, and pruned entries additionally decay towards zero (Zhou et al. 2021,
    "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch").

    Args:
        weight: dense weight, any shape.
        mask: bool mask, same shape.
        decay: sparse-refined decay ``lambda_W``.

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> sr_ste(w, torch.tensor([True, False]), 0.5).sum().backward()
        >>> w.grad
        tensor([1., 2.])
    """
    _check_same_shape(weight, mask, "sr_ste weight/mask")
    return _SRSTE.apply(weight, mask.bool(), decay)


def apply_mask_(weight: Tensor, mask: Tensor) -> None:
    """Zero the entries of ``weight`` where ``mask`` is False, in place (no autograd).

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> apply_mask_(w, torch.tensor([True, False]))
        >>> w.data
        tensor([1., 0.])
    """
    _check_same_shape(weight, mask, "apply_mask_ weight/mask")
    with torch.no_grad():
        weight.masked_fill_(~mask.bool(), 0)


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class NMConfig(TechniqueConfig):
    """N:M / unstructured sparsity settings (the ``compress.prune`` keys), validated on creation.

    Example:
        >>> NMConfig(n=1, m=4).shape()["n"], NMConfig(mode="unstructured").sparsity
        (1, 0.5)
        >>> NMConfig(n=4, m=4)
        Traceback (most recent call last):
        ...
        ValueError: n: N:M needs integers 1 <= n < m, got n=4, m=4
    """

    SHAPE_FIELDS: ClassVar[tuple[str, ...]] = (
        "mode",
        "n",
        "m",
        "pattern",
        "sparsity",
        "scope",
        "sr_ste_decay",
    )

    #: ``"nm"`` (default: ``n`` kept of every ``m`` inputs) or ``"unstructured"`` (drop ``sparsity``).
    mode: str = "nm"
    #: Kept weights per group (mode ``nm``; default 2); ``1 <= n < m``.
    n: int = 2
    #: Group size along the input dimension (mode ``nm``; default 4, >= 2).
    m: int = 4
    #: ``"1d"`` (default, groups along inputs) or ``"2d"`` (transposable: every ``m x m`` block is N:M
    #: along rows and columns, so the backward pass can be sparse too; ``m <= 4``, mode ``nm``).
    pattern: str = "1d"
    #: Fraction of weights to drop, in [0, 1): mode ``unstructured`` only (default there 0.5).
    sparsity: float | None = None
    #: ``"layer"`` (default: each layer loses ``sparsity``) or ``"global"`` (one threshold over all
    #: targeted layers; mode ``unstructured`` only).
    scope: str = "layer"
    #: ``"magnitude"`` (default, ``|W|``), ``"wanda"`` (``|W| * ||X||`` over calibration batches) or
    #: ``"sparsegpt"`` (one-shot: masks chosen and remaining weights updated block by block from each
    #: layer's input Hessian, :func:`lightcook.ops.sparsegpt.sparsegpt_`; no ramp, no recompute,
    #: ``pattern`` 1d, ``scope`` layer).
    criterion: str = "magnitude"
    #: Training batches per Wanda / SparseGPT calibration (one calibration per mask update; default 8, >= 1).
    calibration_batches: int = 8
    #: SparseGPT: columns per block of the OBS update (default 128, >= 1; rounded up to a multiple of ``m``).
    blocksize: int = 128
    #: SparseGPT: damping added to each Hessian's diagonal, a fraction of its mean (default 0.01, >= 0).
    percdamp: float = 0.01
    #: SparseGPT: visit each block's layers in groups sharing an input, in forward order, each with
    #: the Hessian taken after the groups before it were pruned (default True; see ``lightcook.ops.calibrate``).
    true_sequential: bool = True
    #: SparseGPT: fit each layer to the *dense* model's outputs from the pruned model's inputs
    #: (default True; the asymmetric calibration of ``lightcook.ops.calibrate``).
    dense_targets: bool = True
    #: Optimizer step at which the first mask is computed (default 0).
    start_step: int = 0
    #: End of the gradual ramp to the full pattern (default ``None``: one-shot at ``start_step``).
    end_step: int | None = None
    #: Steps between mask updates during the ramp (default 1, >= 1).
    ramp_every: int = 1
    #: After the ramp, recompute the masks every this many steps (default 0: never).
    recompute_every: int = 0
    #: SR-STE decay of pruned weights (default ``None``: hard masks, pruned weights zeroed; >= 0).
    sr_ste_decay: float | None = None

    def shape(self) -> dict[str, Any]:
        """The shape fields that matter in this mode: ``n``/``m``/``pattern`` for N:M, ``sparsity`` and
        ``scope`` for unstructured (a resumed 2:4 run may change an unused ``sparsity``)."""
        unused = ("sparsity", "scope") if self.mode == "nm" else ("n", "m", "pattern")
        return {k: v for k, v in super().shape().items() if k not in unused}

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, ("nm", "unstructured"))
        check_choice("pattern", self.pattern, ("1d", "2d"))
        check_choice("scope", self.scope, ("layer", "global"))
        check_choice("criterion", self.criterion, ("magnitude", "wanda", "sparsegpt"))
        if self.criterion == "sparsegpt" and self.calibration_batches == 0:
            raise ValueError("calibration_batches: criterion 'sparsegpt' needs >= 1 calibration batch, got 0")
        check_int("calibration_batches", self.calibration_batches, 1)
        check_int("blocksize", self.blocksize, 1)
        check_number("percdamp", self.percdamp, 0.0)
        check_choice("true_sequential", self.true_sequential, (True, False))
        check_choice("dense_targets", self.dense_targets, (True, False))
        if self.dense_targets and not self.true_sequential:
            raise ValueError(
                "dense_targets: needs true_sequential=true (fitted to inputs that later change within "
                "the block, the dense-target weights amplify the change: SmolLM2 2:4 SparseGPT 11.5x "
                "dense vs 1.56x with both)"
            )
        self._check_pattern()
        self._check_schedule()
        if self.criterion == "sparsegpt":
            self._check_sparsegpt()

    def _check_sparsegpt(self) -> None:
        """SparseGPT is one-shot: it changes the weights it keeps, so it runs once, at the full pattern."""
        why = "criterion 'sparsegpt' prunes once, at the full pattern, and updates the kept weights"
        if self.end_step is not None and self.end_step != self.start_step:
            raise ValueError(f"end_step: {why}; a ramp is not supported: use null, got {self.end_step!r}")
        if self.recompute_every:
            raise ValueError(f"recompute_every: {why}; use 0, got {self.recompute_every!r}")
        if self.pattern != "1d":
            raise ValueError(f"pattern: {why} along the inputs; allowed: '1d'")
        if self.scope != "layer":
            raise ValueError(f"scope: {why} layer by layer; allowed: 'layer'")

    def _check_pattern(self) -> None:
        if self.mode == "unstructured":
            if self.sparsity is None:
                object.__setattr__(self, "sparsity", 0.5)
            check_number("sparsity", self.sparsity, 0.0)
            if not float(self.sparsity) < 1.0:  # type: ignore[arg-type]
                raise ValueError(f"sparsity: must lie in [0, 1), got {self.sparsity!r}")
            if self.pattern != "1d":
                raise ValueError("pattern: '2d' (transposable N:M) needs mode='nm'; allowed here: '1d'")
            return
        if self.sparsity is not None:
            raise ValueError(
                f"sparsity: applies to mode='unstructured' only; N:M drops 1 - n/m (got {self.sparsity})"
            )
        if self.scope != "layer":
            raise ValueError(
                "scope: N:M groups are local; 'global' needs mode='unstructured'; allowed: 'layer'"
            )
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (self.n, self.m))
        if not (ints and self.m >= 2 and 1 <= self.n < self.m):
            raise ValueError(f"n: N:M needs integers 1 <= n < m, got n={self.n!r}, m={self.m!r}")
        if self.pattern == "2d" and self.m > MAX_TRANSPOSABLE_M:
            raise ValueError(f"m: pattern '2d' supports m <= {MAX_TRANSPOSABLE_M}, got m={self.m}")

    def _check_schedule(self) -> None:
        check_int("start_step", self.start_step, 0)
        if self.end_step is not None:
            check_int("end_step", self.end_step)
            if self.end_step < self.start_step:
                raise ValueError(
                    f"end_step: must be null or an integer >= start_step ({self.start_step}), got {self.end_step!r}"
                )
        check_int("ramp_every", self.ramp_every, 1)
        check_int("recompute_every", self.recompute_every, 0)
        if self.sr_ste_decay is not None:
            check_number("sr_ste_decay", self.sr_ste_decay, 0.0)


# --------------------------------------------------------------------------- weight layouts


def dense_weight(module: nn.Module) -> Tensor:
    """The trainable weight as stored (the unmasked original when SR-STE parametrizes it)."""
    if parametrize.is_parametrized(module, "weight"):
        return cast(Any, module.parametrizations).weight.original  # a ModuleDict of ParametrizationList
    return cast(Tensor, module.weight)


def as_out_in(tensor: Tensor, module: nn.Module) -> Tensor:
    """View a weight-shaped tensor as ``(out, in)`` (transposes GPT-2 ``Conv1D`` layouts).

    Example:
        >>> as_out_in(torch.zeros(2, 3), nn.Linear(3, 2)).shape
        torch.Size([2, 3])
    """
    return tensor.T if is_conv1d(module) else tensor


class SRSTEMask(nn.Module):
    """Parametrization ``weight -> sr_ste(weight, owner.weight_mask, decay)``.

    The owner is kept outside the module registry (no recursion in ``modules()``/``state_dict``)
    and the mask is looked up on every call, so ``.to(device)`` and checkpoint loads stay in sync.
    """

    def __init__(self, owner: nn.Module, decay: float) -> None:
        super().__init__()
        object.__setattr__(self, "_owner", owner)
        self.decay = decay

    def forward(self, weight: Tensor) -> Tensor:
        return sr_ste(weight, getattr(self._owner, MASK), self.decay)


# --------------------------------------------------------------------------- transforms


def prepare_(
    network: nn.Module, config: NMConfig | None = None, names: Iterable[str] | None = None
) -> dict[str, nn.Module]:
    """Give the named Linear layers a ``weight_mask`` bool buffer (all True) and, with SR-STE, the
    ``w * mask`` parametrization; in place. Masks are computed later (:func:`compute_masks_`).

    Args:
        network: the model, changed in place.
        config: the settings (default :class:`NMConfig()`, 2:4).
        names: qualified names of the layers to prune (default: every Linear / ``Conv1D``).

    Returns:
        The layers by name.

    Raises:
        ValueError: a name is not a Linear, or (mode ``nm``) its inputs (``2d``: also outputs) are not
            divisible by ``m`` (the message starts ``m: <layer> has ...``).

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        >>> layers = prepare_(net, NMConfig(n=2, m=4))
        >>> compute_masks_(layers, NMConfig(n=2, m=4))
        >>> sorted(layers), is_nm(net[0].weight_mask, 2, 4), bool((net[0].weight == 0).sum() == 32)
        (['0', '2'], True, True)
    """
    config = config or NMConfig()
    if names is None:
        names = linear_names(network)
    layers = {name: network.get_submodule(name) for name in names}
    for name, module in layers.items():
        _check_prunable(name, module, config)
    for module in layers.values():
        if MASK not in module._buffers:
            module.register_buffer(MASK, torch.ones_like(dense_weight(module), dtype=torch.bool))
    attach_sr_ste_(layers, config)
    return layers


def _check_prunable(name: str, module: nn.Module, config: NMConfig) -> None:
    if not linear_like(module):
        raise ValueError(f"targets: {name} is a {type(module).__name__}, not a Linear layer")
    if config.mode != "nm":
        return
    out_f, in_f = as_out_in(dense_weight(module), module).shape
    hint = f"exclude {name!r} or choose another m"
    if in_f % config.m:
        raise ValueError(f"m: {name} has {in_f} input features, not divisible by m={config.m}; {hint}")
    if config.pattern == "2d" and out_f % config.m:
        raise ValueError(
            f"m: {name} has {out_f} output features, not divisible by m={config.m} (pattern 2d); {hint}"
        )


def attach_sr_ste_(layers: Mapping[str, nn.Module], config: NMConfig) -> None:
    """With SR-STE, parametrize every layer's weight so ``module.weight`` is ``w * mask`` (idempotent)."""
    if config.sr_ste_decay is None:
        return
    for module in layers.values():
        if not parametrize.is_parametrized(module, "weight"):
            parametrize.register_parametrization(module, "weight", SRSTEMask(module, config.sr_ste_decay))


def convert_(network: nn.Module) -> list[str]:
    """Fold every SR-STE parametrization of ``network`` into its weight (``w * mask``, same Parameter
    object), for inference and export; masks stay as buffers. Returns the folded layers' names.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4))
        >>> layers = prepare_(net, NMConfig(sr_ste_decay=1e-3))
        >>> compute_masks_(layers, NMConfig(sr_ste_decay=1e-3))
        >>> convert_(net), parametrize.is_parametrized(net[0]), int((net[0].weight == 0).sum())
        (['0'], False, 8)
    """
    folded = []
    for name, module in network.named_modules():
        if parametrize.is_parametrized(module, "weight") and any(
            isinstance(p, SRSTEMask) for p in module.parametrizations.weight
        ):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            folded.append(name)
    return folded


def _scores(module: nn.Module, sq_norm: Tensor | None) -> Tensor:
    weight = as_out_in(dense_weight(module).detach(), module)  # (out, in)
    return weight.abs().float() if sq_norm is None else wanda_scores(weight, sq_norm)


def _final_masks(scores: dict[str, Tensor], config: NMConfig) -> dict[str, Tensor]:
    if config.mode == "unstructured":
        sparsity = float(config.sparsity or 0.0)  # always set for mode "unstructured"
        if config.scope == "global":
            return global_unstructured_masks(scores, sparsity)
        return {name: unstructured_mask(s, sparsity) for name, s in scores.items()}
    select = nm_mask_transposable if config.pattern == "2d" else nm_mask
    return {name: select(s, config.n, config.m) for name, s in scores.items()}


@torch.no_grad()
def compute_masks_(
    layers: Mapping[str, nn.Module],
    config: NMConfig,
    fraction: float = 1.0,
    input_sq_norms: Mapping[str, Tensor] | None = None,
) -> None:
    """Score the layers' weights, write their ``weight_mask`` buffers and zero the dropped weights.

    Args:
        layers: layers prepared by :func:`prepare_`, by name.
        config: the settings.
        fraction: ramp progress; 1 is the full pattern (:func:`ramp_mask` below it).
        input_sq_norms: Wanda's per-layer input norms (:func:`record_input_norms`); ``None``:
            magnitude scores.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 1))
        >>> compute_masks_(prepare_(net), NMConfig(), fraction=0.5)
        >>> int(net[0].weight_mask.sum())
        3
    """
    norms = input_sq_norms or {}
    scores = {name: _scores(mod, norms.get(name)) for name, mod in layers.items()}  # (out, in)
    final = _final_masks(scores, config)
    for name, module in layers.items():
        mask = final[name] if fraction >= 1.0 else ramp_mask(scores[name], final[name], fraction)
        as_out_in(getattr(module, MASK), module).copy_(mask)
    apply_masks_(layers)


@torch.no_grad()
def apply_masks_(layers: Mapping[str, nn.Module]) -> None:
    """Zero every masked weight in place (a no-op for SR-STE layers: their forward pass masks).

    ``w * mask``: exact zeros for finite weights, ~6x faster on CPU than :func:`apply_mask_`
    (``masked_fill_``), which matters as this runs after every optimizer step.
    """
    for module in layers.values():
        if not parametrize.is_parametrized(module, "weight"):
            cast(Tensor, module.weight).mul_(getattr(module, MASK))


def sparsity_of(layers: Mapping[str, nn.Module]) -> float:
    """Fraction of the layers' weights their masks drop.

    Example:
        >>> sparsity_of({})
        0.0
    """
    masks = [getattr(module, MASK) for module in layers.values()]
    total = sum(mk.numel() for mk in masks)
    return 1.0 - sum(int(mk.sum()) for mk in masks) / total if total else 0.0


@contextlib.contextmanager
def record_input_norms(layers: Mapping[str, nn.Module]) -> Iterator[dict[str, InputNormAccumulator]]:
    """Inside the block, every forward call of a layer adds its input to an
    :class:`InputNormAccumulator` (Wanda's ``||X_j||^2``); the hooks are removed on exit.

    Example:
        >>> layer = nn.Linear(2, 1)
        >>> with record_input_norms({"fc": layer}) as accs:
        ...     _ = layer(torch.tensor([[1.0, 2.0]]))
        >>> accs["fc"].sq_norm
        tensor([1., 4.])
    """
    accs = {
        name: InputNormAccumulator(as_out_in(dense_weight(mod), mod).shape[1], dense_weight(mod).device)
        for name, mod in layers.items()
    }
    handles = [
        mod.register_forward_pre_hook(lambda _m, args, acc=accs[name]: acc.add(args[0]))
        for name, mod in layers.items()
    ]
    try:
        yield accs
    finally:
        for handle in handles:
            handle.remove()
