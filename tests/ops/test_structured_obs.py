"""Structured OBS against references outside its code: the least-squares refit of a pruned projection
by ``torch.linalg.lstsq`` on the raw inputs, the reconstruction error computed directly from ``X``,
a brute-force search over every unit, magnitude ranking on a layer with correlated inputs, and a
brute-force allocation over every split of the removals."""

from __future__ import annotations

import itertools

import pytest
import torch

from lightcook.ops.structured_obs import (
    allocate,
    greedy_obs_,
    greedy_step,
    inverse_hessian,
    obs_error,
    obs_update,
)


def _layer(
    out_f: int = 24, in_f: int = 48, rows: int = 2048, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random weight ``(out, in)`` and correlated inputs ``(rows, in)`` with uneven column scales,
    in float64 (the references are exact solvers)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_f, in_f, generator=gen, dtype=torch.float64)
    scale = torch.rand(in_f, generator=gen, dtype=torch.float64) * 3 + 0.1
    x = torch.randn(rows, in_f, generator=gen, dtype=torch.float64) @ mix * scale
    return torch.randn(out_f, in_f, generator=gen, dtype=torch.float64), x


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.T @ x / x.shape[0]  # undampened: the least-squares problem on X itself


def _lstsq_refit(w: torch.Tensor, x: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """The outside reference: the kept columns fit ``X Wᵀ`` from ``X[:, kept]`` by least squares."""
    kept = torch.tensor([c for c in range(w.shape[1]) if c not in set(removed.tolist())], dtype=torch.long)
    full = torch.zeros_like(w)
    if len(kept):
        full[:, kept] = torch.linalg.lstsq(x[:, kept], x @ w.T).solution.T  # (out, kept)
    return full


def _recon_error(w: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    """``‖W Xᵀ − Ŵ Xᵀ‖²``, from the raw inputs."""
    return float(((w - pruned) @ x.T).square().sum())


@pytest.mark.parametrize("removed", [[3], [0, 7, 8, 30], list(range(0, 48, 2))])
def test_closed_form_update_is_the_least_squares_refit(removed):
    w, x = _layer()
    cols = torch.tensor(removed)
    ours = obs_update(w, _hessian(x), cols)
    torch.testing.assert_close(ours, _lstsq_refit(w, x, cols), rtol=1e-8, atol=1e-8)
    assert bool((ours[:, cols] == 0).all())
    # err(R) = tr(W_R (H⁻¹_RR)⁻¹ W_Rᵀ) is the reconstruction error, 2‖ΔW Xᵀ‖² / rows
    direct = 2 * _recon_error(w, ours, x) / x.shape[0]
    assert obs_error(w, _hessian(x), cols) == pytest.approx(direct, rel=1e-8)


@pytest.mark.parametrize(("width", "count", "step"), [(1, 20, 1), (1, 20, 6), (4, 5, 1), (4, 12, 2)])
def test_greedy_weight_is_the_refit_of_what_it_removed(width, count, step):
    w, x = _layer()
    groups = torch.arange(48).reshape(-1, width)
    pruned = w.clone()
    order, errors = greedy_obs_(pruned, _hessian(x), groups, count, step=step)
    assert len(set(order.tolist())) == count and errors.shape == (count,) and bool((errors >= 0).all())
    cols = groups[order].flatten()
    torch.testing.assert_close(pruned, _lstsq_refit(w, x, cols), rtol=1e-7, atol=1e-7)
    # the increments add up to the error of the removed set
    assert float(errors.sum()) == pytest.approx(2 * _recon_error(w, pruned, x) / x.shape[0], rel=1e-7)


def test_float32_work_matches_float64():
    w, x = _layer()
    groups = torch.arange(48)[:, None]
    exact, fast = w.clone(), w.clone().float()
    order64, _ = greedy_obs_(exact, _hessian(x), groups, 30, step=3)
    order32, _ = greedy_obs_(fast, _hessian(x).float(), groups, 30, step=3, dtype=torch.float32)
    assert order32.tolist() == order64.tolist()
    torch.testing.assert_close(fast.double(), exact, rtol=1e-3, atol=1e-3 * float(exact.abs().max()))


def test_first_greedy_pick_is_the_brute_force_best_unit():
    """Removing one unit: the greedy choice has the smallest refit error of all units (brute force
    with lstsq on the raw inputs), for single columns and for groups of columns."""
    w, x = _layer(in_f=24)
    for width in (1, 3):
        groups = torch.arange(24).reshape(-1, width)
        errors = [_recon_error(w, _lstsq_refit(w, x, g), x) for g in groups]
        order, _ = greedy_obs_(w.clone(), _hessian(x), groups, 1)
        assert int(order[0]) == min(range(len(groups)), key=errors.__getitem__)


@pytest.mark.parametrize("width", [1, 4])
def test_obs_ranking_beats_magnitude_ranking(width):
    """Half the units removed: OBS (greedy, with the refit) against the units of smallest weight norm
    removed, with the same least-squares refit and without it."""
    w, x = _layer(out_f=32, in_f=64)
    groups = torch.arange(64).reshape(-1, width)
    count = len(groups) // 2
    ours = w.clone()
    greedy_obs_(ours, _hessian(x), groups, count)
    by_norm = torch.argsort(w[:, groups].square().sum((0, 2)))[:count]
    cols = groups[by_norm].flatten()
    magnitude_refit = _lstsq_refit(w, x, cols)
    magnitude_cut = w.clone()
    magnitude_cut[:, cols] = 0
    assert (
        _recon_error(w, ours, x)
        < 0.8 * _recon_error(w, magnitude_refit, x)
        < 0.8 * _recon_error(w, magnitude_cut, x)
    )


def test_greedy_removes_everything_and_nothing():
    w, x = _layer(in_f=12)
    groups = torch.arange(12).reshape(4, 3)
    pruned = w.clone()
    order, errors = greedy_obs_(pruned, _hessian(x), groups, 4)
    assert sorted(order.tolist()) == [0, 1, 2, 3] and bool((pruned == 0).all())
    assert float(errors.sum()) == pytest.approx(2 * _recon_error(w, pruned, x) / x.shape[0], rel=1e-8)
    same = w.clone()
    order, errors = greedy_obs_(same, _hessian(x), groups, 0)
    assert order.numel() == 0 and errors.numel() == 0 and torch.equal(same, w)


def test_conv1d_style_transposed_view_is_updated_in_place():
    w, x = _layer()
    stored = w.T.clone()  # GPT-2 Conv1D keeps (in, out)
    greedy_obs_(stored.T, _hessian(x), torch.arange(48)[:, None], 10)
    reference = w.clone()
    greedy_obs_(reference, _hessian(x), torch.arange(48)[:, None], 10)
    torch.testing.assert_close(stored.T, reference)


def test_inverse_hessian_handles_dead_inputs_and_rejects_bad_ones():
    h = torch.diag(torch.tensor([2.0, 0.0, 4.0]))
    assert inverse_hessian(h).diagonal().tolist() == pytest.approx([0.5, 1.0, 0.25])
    with pytest.raises(ValueError, match="must be square"):
        inverse_hessian(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="NaN or infinite"):
        inverse_hessian(torch.tensor([[float("nan")]]))


def test_greedy_argument_errors():
    w, x = _layer(in_f=8)
    groups = torch.arange(8)[:, None]
    with pytest.raises(ValueError, match=r"^count: must lie in \[0, 8\], got 9"):
        greedy_obs_(w, _hessian(x), groups, 9)
    with pytest.raises(ValueError, match=r"^step: must be >= 1"):
        greedy_obs_(w, _hessian(x), groups, 2, step=0)
    with pytest.raises(ValueError, match=r"^hessian: expected \(8, 8\)"):
        greedy_obs_(w, torch.eye(4), groups, 2)


def test_greedy_step():
    assert [greedy_step(n) for n in (1, 3, 32, 33, 1536)] == [1, 1, 1, 2, 48]


# --------------------------------------------------------------------------- allocation


def _brute_force(curves, unit_params, const_params, need):
    """The cheapest split (sum of increments) of removals over blocks, taken in order within each
    block, that removes at least ``need`` parameters: every combination of counts."""
    best = None
    for counts in itertools.product(*(range(len(c) + 1) for c in curves)):
        removed = sum(
            k * p + (q if k == len(c) else 0)
            for k, p, q, c in zip(counts, unit_params, const_params, curves, strict=True)
        )
        if removed < need:
            continue
        cost = sum(float(c[:k].sum()) for k, c in zip(counts, curves, strict=True))
        if best is None or cost < best[0] - 1e-12:
            best = (cost, list(counts))
    return best


def test_global_allocation_matches_brute_force_on_increasing_curves():
    """With increasing increments per parameter and equal unit sizes, taking the cheapest removal
    first is optimal: the brute-force cheapest split of the same number of removals."""
    gen = torch.Generator().manual_seed(0)
    curves = [torch.cumsum(torch.rand(n, generator=gen, dtype=torch.float64), 0) for n in (4, 5, 3)]
    for target in (0.25, 0.5, 0.75):
        counts = allocate(curves, [2, 2, 2], [0, 0, 0], target)
        need = target * 2 * 12
        assert sum(counts) * 2 >= need and (sum(counts) - 1) * 2 < need  # the fewest removals
        cost = sum(float(c[:k].sum()) for k, c in zip(counts, curves, strict=True))
        assert cost == pytest.approx(_brute_force(curves, [2, 2, 2], [0, 0, 0], need)[0])


def test_allocation_prices_per_parameter_and_counts_whole_blocks():
    # block 0: a big unit (10 parameters) at 5 per removal; block 1: small units (1 parameter) at 1 each.
    # Per parameter the big unit is cheaper (0.5 < 1): it goes first.
    curves = [torch.tensor([5.0]), torch.tensor([1.0, 1.0, 1.0, 1.0])]
    assert allocate(curves, [10, 1], [0, 0], target=10 / 14) == [1, 0]
    # the block's own parameters (3) go with its last unit: 1 unit + 3 = 13 of 17 parameters
    assert allocate(curves, [10, 1], [3, 0], target=13 / 17) == [1, 0]
    # a non-monotone curve is priced by its running maximum: removals stay in order within a block
    assert allocate([torch.tensor([9.0, 0.0]), torch.tensor([1.0, 1.0])], [1, 1], [0, 0], 0.5) == [0, 2]


def test_uniform_allocation_removes_the_fraction_of_each_layer():
    curves = [
        torch.tensor([1.0, 2.0]),
        torch.tensor([1.0, 2.0, 3.0, 4.0]),
        torch.tensor([9.0, 9.0, 9.0, 9.0]),
    ]
    # layer 0 = blocks 0 and 1 (6 parameters), layer 1 = block 2 (4): half of each (ties: block order)
    assert allocate(curves, [1, 1, 1], [0, 0, 0], 0.5, layers=[0, 0, 1]) == [2, 1, 2]
    assert allocate(curves, [1, 1, 1], [0, 0, 0], 0.5) == [2, 3, 0]  # global: the cheap layer pays
    # parameters outside every block (total > blocks): each layer's share grows to meet the target
    assert allocate(curves, [1, 1, 1], [0, 0, 0], 0.5, total=12, layers=[0, 0, 1]) == [2, 2, 3]


def test_allocation_does_not_overshoot_by_a_big_unit():
    """A head (10 parameters) that would carry the removal past the target is skipped for neurons
    (1 each), so the removal ends within one neuron above the target (a per-layer 50% with heads of
    8% of a layer used to land at 51.4%)."""
    curves = [torch.tensor([1.0]), torch.full((8,), 5.0)]
    assert allocate(curves, [10, 1], [0, 0], target=6 / 18) == [0, 6]  # the head alone: 10 > 6
    assert allocate(curves, [10, 1], [0, 0], target=5.5 / 18) == [0, 6]  # the gap closed by a neuron
    assert allocate(curves, [10, 1], [0, 0], target=11 / 18) == [1, 1]  # the head fits: taken first
    curves[1] = torch.full((30,), 5.0)  # enough neurons to close any gap (a layer has 1,536)
    for target in torch.linspace(0.05, 0.95, 19).tolist():
        counts = allocate(curves, [10, 1], [0, 0], target, layers=[0, 0])
        removed = counts[0] * 10 + counts[1]
        assert target * 40 <= removed < target * 40 + 1 + 1e-9


def test_allocation_rejects_a_bad_target():
    with pytest.raises(ValueError, match=r"^target: must lie in \[0, 1\]"):
        allocate([torch.ones(2)], [1], [0], 1.5)
