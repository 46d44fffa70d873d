"""SparseGPT against references outside its code: the layer's own reconstruction error next to
magnitude and Wanda masks, the exact pattern counts, the closed-form least-squares answer when one
weight per row is pruned, and inputs that never vary."""

from __future__ import annotations

import pytest
import torch

from lightcook.ops.calibrate import dampen_
from lightcook.ops.sparsegpt import inverse_hessian_factor, sparsegpt_
from lightcook.ops.sparsity import is_nm, nm_mask, unstructured_mask, wanda_scores


def _layer(
    out_f: int = 32, in_f: int = 64, rows: int = 1024, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random weight ``(out, in)`` and correlated inputs ``(rows, in)`` with uneven column scales."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_f, in_f, generator=gen)
    scale = torch.rand(in_f, generator=gen) * 3 + 0.1
    x = torch.randn(rows, in_f, generator=gen) @ mix * scale
    return torch.randn(out_f, in_f, generator=gen), x


def _hessian(x: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    return dampen_(2 * x.T @ x / x.shape[0], percdamp)


def _error(w: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w - pruned) @ x.T).norm())


@pytest.mark.parametrize(
    "pattern", [{"n": 2, "m": 4}, {"n": 1, "m": 4}, {"sparsity": 0.5}, {"sparsity": 0.7}]
)
@pytest.mark.parametrize("blocksize", [128, 32, 6])  # 6: rounded up to 8 for N:M
def test_beats_magnitude_and_wanda_with_the_exact_pattern(pattern, blocksize):
    w, x = _layer(in_f=256)  # several blocks of 128 columns, as in a real layer
    pruned = w.clone()
    keep = sparsegpt_(pruned, _hessian(x), blocksize=blocksize, **pattern)
    sq_norm = x.square().sum(0)
    if "n" in pattern:
        n, m = pattern["n"], pattern["m"]
        assert is_nm(keep, n, m)
        magnitude, wanda = nm_mask(w.abs(), n, m), nm_mask(wanda_scores(w, sq_norm), n, m)
    else:
        assert int((~keep).sum()) == round(pattern["sparsity"] * w.numel())
        magnitude = unstructured_mask(w.abs(), pattern["sparsity"])
        wanda = unstructured_mask(wanda_scores(w, sq_norm), pattern["sparsity"])
    assert bool((pruned[~keep] == 0).all()) and bool((pruned[keep] != 0).all())
    ours = _error(w, pruned, x)
    assert ours < 0.95 * _error(w, w * wanda, x) < 0.95 * _error(w, w * magnitude, x)


def test_unstructured_count_is_exact_when_blocks_do_not_divide():
    w, x = _layer(out_f=7, in_f=30)
    keep = sparsegpt_(w, _hessian(x), sparsity=0.33, blocksize=8)
    assert int((~keep).sum()) == round(0.33 * 7 * 30)


def test_one_pruned_weight_per_row_equals_least_squares_of_the_later_weights():
    """With the exact Hessian, pruning column ``j`` of a row leaves columns ``< j`` alone and sets the
    columns ``> j`` to the least-squares optimum (``torch.linalg.lstsq``) of the row's output."""
    w, x = _layer(out_f=3, in_f=8, rows=512, seed=1)
    x = x.double()
    pruned_at = [0, 3, 6]
    for row, col in enumerate(pruned_at):
        w[row, col] = 1e-3  # clearly the least salient weight of its row
    pruned = w.clone()
    keep = sparsegpt_(pruned, (2 * x.T @ x / x.shape[0]).float(), sparsity=1 / 8, blocksize=8)
    assert [int(c) for c in (~keep).nonzero()[:, 1]] == pruned_at
    for row, col in enumerate(pruned_at):
        target = x @ w[row].double() - x[:, :col] @ w[row, :col].double()  # (rows,)
        expected = torch.linalg.lstsq(x[:, col + 1 :], target[:, None]).solution[:, 0]
        assert torch.equal(pruned[row, :col], w[row, :col]) and pruned[row, col] == 0
        torch.testing.assert_close(pruned[row, col + 1 :].double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("percdamp", [0.0, 0.01])
def test_dead_inputs_give_finite_weights_and_the_exact_pattern(percdamp):
    w, x = _layer(out_f=8, in_f=16)
    x[:, [2, 5, 11]] = 0  # inputs that never vary: zero rows and columns in H
    for pattern in ({"n": 2, "m": 4}, {"sparsity": 0.5}):
        pruned = w.clone()
        keep = sparsegpt_(pruned, _hessian(x, percdamp), **pattern)
        assert bool(torch.isfinite(pruned).all())
        assert is_nm(keep, 2, 4) if "n" in pattern else int((~keep).sum()) == 64
    raw = w.clone()  # an undamped H with zero diagonal entries is handled too
    sparsegpt_(raw, 2 * x.T @ x / x.shape[0], n=2, m=4)
    assert bool(torch.isfinite(raw).all())


def test_conv1d_layout_through_a_transposed_view():
    w, x = _layer(out_f=8, in_f=16)
    stored = w.T.clone()  # GPT-2 Conv1D keeps (in, out)
    direct = w.clone()
    keep = sparsegpt_(stored.T, _hessian(x), n=2, m=4)
    assert torch.equal(keep, sparsegpt_(direct, _hessian(x), n=2, m=4))
    assert torch.equal(stored.T, direct)


def test_inverse_hessian_factor_reproduces_the_inverse():
    _, x = _layer(in_f=12)
    h = _hessian(x)
    u = inverse_hessian_factor(h)
    assert torch.allclose(u, u.triu()) and torch.allclose(u.T @ u @ h, torch.eye(12), atol=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, r"give either sparsity or both n and m"),
        ({"sparsity": 0.5, "n": 2, "m": 4}, r"give either sparsity or both n and m"),
        ({"n": 2}, r"give either sparsity or both n and m"),
        ({"sparsity": 1.0}, r"sparsity: must lie in \[0, 1\)"),
        ({"n": 4, "m": 4}, r"n: N:M needs 1 <= n < m"),
        ({"n": 2, "m": 3}, r"m: 8 input features are not divisible by m=3"),
        ({"n": 2, "m": 4, "blocksize": 0}, r"blocksize: must be >= 1"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sparsegpt_(torch.randn(4, 8), torch.eye(8), **kwargs)


def test_bad_hessians():
    with pytest.raises(ValueError, match=r"hessian: expected shape \(8, 8\)"):
        sparsegpt_(torch.randn(4, 8), torch.eye(4), n=2, m=4)
    with pytest.raises(ValueError, match="hessian: holds NaN"):
        sparsegpt_(torch.randn(4, 8), torch.full((8, 8), float("nan")), n=2, m=4)
