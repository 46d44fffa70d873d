"""Tests for lightcook.ops.sparsity against brute-force references written here."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lightcook.ops.sparsity import (
    InputNormAccumulator,
    apply_mask_,
    global_unstructured_masks,
    is_nm,
    nm_index_bits,
    nm_mask,
    nm_mask_transposable,
    nm_storage_bytes,
    pack_nm,
    ramp_mask,
    sr_ste,
    unpack_nm,
    unstructured_mask,
    wanda_scores,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_nm_mask(out_f: int, in_f: int, n: int, m: int, seed: int = 0) -> torch.Tensor:
    """N:M mask drawn at random, independent of the code under test."""
    order = torch.rand(out_f, in_f // m, m, generator=_gen(seed)).argsort(-1)  # random permutation per group
    return (order < n).reshape(out_f, in_f)


# --------------------------------------------------------------------------- nm_mask


def _brute_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    mask = torch.zeros_like(scores, dtype=torch.bool)
    for r in range(scores.shape[0]):
        for g in range(scores.shape[1] // m):
            group = scores[r, g * m : (g + 1) * m].tolist()
            best = max(itertools.combinations(range(m), n), key=lambda c: sum(group[i] for i in c))
            for i in best:
                mask[r, g * m + i] = True
    return mask


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (2, 8), (4, 8)])
def test_nm_mask_matches_brute_force(n, m):
    scores = torch.randn(5, 4 * m, generator=_gen(n * 10 + m)).abs()
    mask = nm_mask(scores, n, m)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert (mask.reshape(5, -1, m).sum(-1) == n).all()
    assert torch.equal(mask, _brute_nm(scores, n, m))


def test_nm_mask_errors():
    with pytest.raises(ValueError, match=r"in-features \(6\).*m \(4\)"):
        nm_mask(torch.rand(2, 6), 2, 4)
    for n, m in [(0, 4), (4, 4), (5, 4)]:
        with pytest.raises(ValueError):
            nm_mask(torch.rand(2, 8), n, m)


def test_is_nm():
    mask = torch.tensor([[True, False, True, False, False, True, True, False]])
    assert is_nm(mask, 2, 4)
    assert not is_nm(mask, 1, 4)
    mask[0, 0] = False
    assert not is_nm(mask, 2, 4)
    assert not is_nm(torch.ones(1, 6, dtype=torch.bool), 2, 4)


# --------------------------------------------------------------------------- transposable


def _valid_blocks(n: int, m: int) -> torch.Tensor:
    """All m x m 0/1 matrices (from all 2^(m*m)) with n ones per row and column."""
    codes = torch.arange(2 ** (m * m)).unsqueeze(-1)
    bits = ((codes >> torch.arange(m * m)) & 1).reshape(-1, m, m)
    ok = (bits.sum(-1) == n).all(-1) & (bits.sum(-2) == n).all(-1)
    return bits[ok].double()


@pytest.fixture(scope="module")
def valid_blocks_4() -> dict[int, torch.Tensor]:
    return {n: _valid_blocks(n, 4) for n in (1, 2)}


def _check_transposable(scores, mask, n, m, valid):
    out_f, in_f = scores.shape
    for bo, bi in itertools.product(range(out_f // m), range(in_f // m)):
        s = scores[bo * m : (bo + 1) * m, bi * m : (bi + 1) * m].double()
        k = mask[bo * m : (bo + 1) * m, bi * m : (bi + 1) * m]
        assert (k.sum(0) == n).all() and (k.sum(1) == n).all()
        optimum = (valid * s).sum((-1, -2)).max()
        assert (s * k).sum().item() == pytest.approx(optimum.item(), rel=1e-6)


def test_transposable_brute_force_counts(valid_blocks_4):
    assert len(valid_blocks_4[2]) == 90
    assert len(valid_blocks_4[1]) == 24


def test_transposable_single_blocks_optimal(valid_blocks_4):
    for seed in range(8):
        scores = torch.rand(4, 4, generator=_gen(seed))
        mask = nm_mask_transposable(scores, 2, 4)
        _check_transposable(scores, mask, 2, 4, valid_blocks_4[2])


@pytest.mark.parametrize("n", [1, 2])
def test_transposable_multi_block(n, valid_blocks_4):
    scores = torch.randn(12, 16, generator=_gen(100 + n)).abs()
    mask = nm_mask_transposable(scores, n, 4)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert is_nm(mask, n, 4) and is_nm(mask.T.contiguous(), n, 4)
    _check_transposable(scores, mask, n, 4, valid_blocks_4[n])


def test_transposable_where_row_topk_is_not():
    # A block where row-wise top-2 is not transposable: every row prefers columns 0, 1.
    scores = torch.tensor([[9.0, 8.0, 1.0, 0.5]] * 4) + torch.rand(4, 4, generator=_gen(3)) * 0.01
    mask = nm_mask_transposable(scores, 2, 4)
    assert (mask.sum(0) == 2).all() and (mask.sum(1) == 2).all()
    assert not is_nm(nm_mask(scores, 2, 4).T.contiguous(), 2, 4)


def test_transposable_errors():
    with pytest.raises(ValueError, match="m <= 4"):
        nm_mask_transposable(torch.rand(8, 8), 2, 8)
    with pytest.raises(ValueError, match="divisible"):
        nm_mask_transposable(torch.rand(6, 8), 2, 4)
    with pytest.raises(ValueError, match="divisible"):
        nm_mask_transposable(torch.rand(8, 6), 2, 4)
    with pytest.raises(ValueError):
        nm_mask_transposable(torch.rand(8, 8), 0, 4)


def test_transposable_on_a_smollm2_sized_weight():
    # Speed is measured in experiments/bench/sparsity.py; here only correctness at full size.
    scores = torch.rand(1536, 576, generator=_gen(7))
    mask = nm_mask_transposable(scores, 2, 4)
    assert is_nm(mask, 2, 4) and is_nm(mask.T.contiguous(), 2, 4)


# --------------------------------------------------------------------------- unstructured


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.37, 0.5, 0.9, 0.999])
def test_unstructured_exact_count_keeps_largest(sparsity):
    scores = torch.randn(7, 13, generator=_gen(1))
    mask = unstructured_mask(scores, sparsity)
    assert mask.shape == scores.shape and mask.dtype == torch.bool
    assert int((~mask).sum()) == round(sparsity * scores.numel())
    if 0 < int((~mask).sum()) < scores.numel():
        assert scores[mask].min() > scores[~mask].max()


def test_unstructured_exact_count_with_ties():
    scores = torch.tensor([1.0, 2.0, 2.0, 2.0, 2.0, 3.0])
    mask = unstructured_mask(scores, 0.5)
    assert int((~mask).sum()) == 3
    assert not mask[0] and mask[5]
    assert torch.equal(unstructured_mask(torch.ones(10), 0.3), unstructured_mask(torch.ones(10), 0.3))


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_sparsity_range(sparsity):
    with pytest.raises(ValueError):
        unstructured_mask(torch.rand(4), sparsity)
    with pytest.raises(ValueError):
        global_unstructured_masks({"a": torch.rand(4)}, sparsity)


def test_global_one_threshold():
    g = _gen(2)
    scores = {
        "big": torch.rand(8, 16, generator=g) + 1.0,
        "tiny": torch.rand(8, 8, generator=g) * 1e-3,
        "mid": torch.rand(32, generator=g),
    }
    masks = global_unstructured_masks(scores, 0.4)
    assert masks.keys() == scores.keys()
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    k = round(0.4 * flat.numel())
    threshold = flat.sort().values[k - 1]  # largest dropped score (no ties with random floats)
    for name, s in scores.items():
        assert masks[name].shape == s.shape
        assert torch.equal(masks[name], s > threshold)
    assert sum(int((~mk).sum()) for mk in masks.values()) == k
    assert not masks["tiny"].any()  # all of tiny is below every score of big
    assert masks["big"].all() and 0 < int((~masks["mid"]).sum()) < 32  # cut falls inside mid


# --------------------------------------------------------------------------- ramp


def test_ramp_counts_and_subsets():
    scores = torch.rand(6, 16, generator=_gen(4))
    final = nm_mask(scores, 2, 4)
    num_dropped = int((~final).sum())
    assert torch.equal(ramp_mask(scores, final, 0.0), torch.ones_like(final))
    assert torch.equal(ramp_mask(scores, final, 1.0), final)
    prev = torch.ones_like(final)
    for fraction in (0.25, 0.5, 0.8):
        mask = ramp_mask(scores, final, fraction)
        assert int((~mask).sum()) == round(fraction * num_dropped)
        assert not (final & ~mask).any()  # ramp mask is a superset of the final mask
        assert not (mask & ~prev).any()  # later masks drop a superset of earlier drops
        prev = mask
        # Reference: the lowest-scoring among the finally dropped are the ones dropped now.
        candidate_scores = scores[~final]
        k = round(fraction * num_dropped)
        cut = candidate_scores.sort().values[k - 1]
        assert torch.equal(~mask, ~final & (scores <= cut))


def test_ramp_errors():
    with pytest.raises(ValueError):
        ramp_mask(torch.rand(4), torch.ones(4, dtype=torch.bool), 1.5)
    with pytest.raises(ValueError):
        ramp_mask(torch.rand(4), torch.ones(5, dtype=torch.bool), 0.5)


# --------------------------------------------------------------------------- wanda


def test_wanda_scores_reference():
    g = _gen(5)
    weight = torch.randn(3, 5, generator=g)
    x = torch.randn(20, 5, generator=g)
    sq = (x**2).sum(0)
    scores = wanda_scores(weight, sq)
    for i, j in itertools.product(range(3), range(5)):
        col_norm = math.sqrt(sum(float(x[t, j]) ** 2 for t in range(20)))
        assert scores[i, j].item() == pytest.approx(abs(weight[i, j].item()) * col_norm, rel=1e-5)
    with pytest.raises(ValueError):
        wanda_scores(weight, sq[:4])


def test_input_norm_accumulator_batches_equal_one_batch():
    x = torch.randn(6, 7, 5, generator=_gen(6))  # (batch, seq, in)
    acc = InputNormAccumulator(5)
    for chunk in x.split(2):
        acc.add(chunk)
    one = InputNormAccumulator(5)
    one.add(x.reshape(-1, 5))
    assert torch.allclose(acc.sq_norm, one.sq_norm)
    assert torch.allclose(acc.sq_norm, torch.linalg.vector_norm(x.reshape(-1, 5), dim=0) ** 2)
    assert int(acc.num_tokens) == 42
    acc.reset()
    assert not acc.sq_norm.any() and int(acc.num_tokens) == 0
    with pytest.raises(ValueError):
        acc.add(torch.rand(2, 4))


# --------------------------------------------------------------------------- pack / unpack


@pytest.mark.parametrize(
    ("n", "m", "dtype"),
    [
        (2, 4, torch.float16),
        (1, 4, torch.float32),
        (2, 8, torch.bfloat16),
        (4, 8, torch.float16),
        (3, 16, torch.float32),
    ],
)
def test_pack_roundtrip(n, m, dtype):
    out_f, in_f = 5, 6 * m
    weight = torch.randn(out_f, in_f, generator=_gen(m)).to(dtype)
    mask = _random_nm_mask(out_f, in_f, n, m, seed=n)
    values, indices = pack_nm(weight, mask, n, m)
    bits = nm_index_bits(m)
    assert bits == (2 if m <= 4 else 4)
    assert values.dtype == dtype and values.shape == (out_f, in_f // m * n)
    assert indices.dtype == torch.uint8 and indices.shape == (out_f, math.ceil(in_f // m * n * bits / 8))
    dense = unpack_nm(values, indices, n, m, in_f)
    assert dense.dtype == dtype
    assert torch.equal(dense, weight * mask)
    packed_bytes = values.numel() * values.element_size() + indices.numel()
    assert packed_bytes == nm_storage_bytes(out_f, in_f, n, m, values.element_size())


def test_pack_format_reference():
    # Row 0 keeps positions (0, 1) and (1, 3): codes 0, 1, 1, 3 -> little-endian 2-bit byte.
    weight = torch.arange(1.0, 9.0).reshape(1, 8)
    mask = torch.tensor([[True, True, False, False, False, True, False, True]])
    values, indices = pack_nm(weight, mask, 2, 4)
    assert values.tolist() == [[1.0, 2.0, 6.0, 8.0]]
    assert indices.tolist() == [[0 | 1 << 2 | 1 << 4 | 3 << 6]]
    # 4-bit codes for m=8: positions 2 and 7 -> low nibble 2, high nibble 7.
    mask8 = torch.tensor([[False, False, True, False, False, False, False, True]])
    _, idx8 = pack_nm(weight, mask8, 2, 8)
    assert idx8.tolist() == [[2 | 7 << 4]]


def test_storage_ratio_2_4_fp16():
    out_f, in_f = 8, 576
    weight = torch.randn(out_f, in_f, generator=_gen(8)).half()
    values, indices = pack_nm(weight, _random_nm_mask(out_f, in_f, 2, 4), 2, 4)
    packed = values.numel() * 2 + indices.numel()
    assert packed / (weight.numel() * 2) == 0.5625
    assert nm_storage_bytes(out_f, in_f, 2, 4, 2) == packed
    # Odd number of kept codes per row pads to a whole byte.
    assert nm_storage_bytes(1, 12, 1, 4, 2) == 3 * 2 + 1


def test_pack_rejects_non_nm_mask():
    weight = torch.randn(2, 8)
    mask = _random_nm_mask(2, 8, 2, 4)
    mask[1, 0] = ~mask[1, 0]
    with pytest.raises(ValueError, match="2:4"):
        pack_nm(weight, mask, 2, 4)
    with pytest.raises(ValueError):
        pack_nm(torch.randn(2, 34), torch.ones(2, 34, dtype=torch.bool), 1, 17)


# --------------------------------------------------------------------------- SR-STE / apply


@pytest.mark.parametrize("decay", [0.0, 2e-4, 0.5])
def test_sr_ste_gradient(decay):
    g = _gen(9)
    weight = torch.randn(4, 8, generator=g, requires_grad=True)
    mask = _random_nm_mask(4, 8, 2, 4)
    upstream = torch.randn(4, 8, generator=g)
    out = sr_ste(weight, mask, decay)
    assert torch.equal(out, weight.detach() * mask)
    (out * upstream).sum().backward()
    expected = upstream + decay * torch.where(mask, 0.0, weight.detach())
    assert torch.allclose(weight.grad, expected)
    assert (weight.grad[~mask] != 0).all()  # pruned weights still get a gradient


def test_apply_mask_in_place_on_parameter():
    param = torch.nn.Parameter(torch.randn(4, 8, generator=_gen(10)))
    before = param.detach().clone()
    mask = _random_nm_mask(4, 8, 2, 4)
    apply_mask_(param, mask)
    assert torch.equal(param.detach(), before * mask)
    assert param.requires_grad and param.grad is None


# --------------------------------------------------------------------------- config and transforms


def test_nm_config_checks_every_field_without_a_prefix():
    from lightcook.ops.sparsity import NMConfig

    cases = {
        "mode": {"mode": "blocks"},
        "n": {"n": 0},
        "m": {"pattern": "2d", "n": 4, "m": 8},
        "pattern": {"pattern": "3d"},
        "sparsity": {"sparsity": 0.5},
        "scope": {"scope": "global"},
        "criterion": {"criterion": "taylor"},
        "calibration_batches": {"calibration_batches": 0},
        "start_step": {"start_step": -1},
        "end_step": {"start_step": 3, "end_step": 1},
        "ramp_every": {"ramp_every": 0},
        "recompute_every": {"recompute_every": -2},
        "sr_ste_decay": {"sr_ste_decay": -1.0},
    }
    for field, kwargs in cases.items():
        with pytest.raises(ValueError, match=f"^{field}: "):
            NMConfig(**kwargs)
    assert NMConfig(mode="unstructured").sparsity == 0.5 and NMConfig().sparsity is None
    assert set(NMConfig().shape()) == {"mode", "n", "m", "pattern", "sr_ste_decay"}  # what N:M uses
    assert set(NMConfig(mode="unstructured").shape()) == {"mode", "sparsity", "scope", "sr_ste_decay"}


def test_prepare_adds_all_true_masks_and_checks_shapes_first():
    from lightcook.ops.sparsity import NMConfig, prepare_

    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 6))
    layers = prepare_(net, NMConfig(n=2, m=4))
    assert sorted(layers) == ["0", "1"] and all(bool(layer.weight_mask.all()) for layer in layers.values())
    assert "0.weight_mask" in net.state_dict()
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 6))
    with pytest.raises(ValueError, match=r"^m: 1 has 6 output features, not divisible by m=4 \(pattern 2d\)"):
        prepare_(fresh, NMConfig(n=2, m=4, pattern="2d"))
    assert not any(hasattr(m, "weight_mask") for m in fresh)  # nothing half-prepared


def test_compute_masks_on_conv1d_runs_along_inputs():
    from transformers.pytorch_utils import Conv1D

    from lightcook.ops.sparsity import NMConfig, compute_masks_, prepare_

    torch.manual_seed(0)
    net = torch.nn.Sequential(Conv1D(8, 16))  # weight (in=16, out=8)
    weight = net[0].weight.detach().clone()
    compute_masks_(prepare_(net, NMConfig()), NMConfig())
    assert torch.equal(net[0].weight_mask.T, nm_mask(weight.T.abs(), 2, 4))  # brute-force check above
    assert torch.equal(net[0].weight.detach(), weight * net[0].weight_mask)


def test_compute_masks_global_unstructured_and_ramp():
    from lightcook.ops.sparsity import NMConfig, compute_masks_, prepare_, sparsity_of

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    with torch.no_grad():
        net[1].weight.mul_(10)  # the larger layer keeps more under one global threshold
    cfg = NMConfig(mode="unstructured", sparsity=0.5, scope="global")
    layers = prepare_(net, cfg)
    compute_masks_(layers, cfg, fraction=0.5)
    assert sparsity_of(layers) == pytest.approx(0.25, abs=1 / 96)
    compute_masks_(layers, cfg)
    assert sparsity_of(layers) == pytest.approx(0.5) and float((~net[0].weight_mask).float().mean()) > 0.5


def test_wanda_scores_from_recorded_input_norms_match_a_hand_computation():
    from lightcook.ops.sparsity import NMConfig, compute_masks_, prepare_, record_input_norms

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 4))
    x = torch.randn(5, 8, generator=_gen(4))
    layers = prepare_(net, NMConfig())
    weight = net[0].weight.detach().clone()
    with record_input_norms(layers) as accs:
        net(x)
    net(x)  # after the block: hooks removed
    assert torch.allclose(accs["0"].sq_norm, (x**2).sum(0))
    compute_masks_(layers, NMConfig(), input_sq_norms={"0": accs["0"].sq_norm})
    assert torch.equal(net[0].weight_mask, nm_mask(weight.abs() * x.norm(dim=0), 2, 4))


def test_sr_ste_prepare_and_convert_fold_to_masked_weight():
    from torch.nn.utils import parametrize

    from lightcook.ops.sparsity import NMConfig, compute_masks_, convert_, prepare_

    cfg = NMConfig(sr_ste_decay=1e-3)
    net = torch.nn.Sequential(torch.nn.Linear(8, 4))
    layers = prepare_(net, cfg)
    compute_masks_(layers, cfg)
    dense = net[0].parametrizations.weight.original.detach().clone()
    assert bool((dense[~net[0].weight_mask] != 0).all())  # dense weights kept under SR-STE
    param = net[0].parametrizations.weight.original
    assert convert_(net) == ["0"] and not parametrize.is_parametrized(net[0])
    assert net[0].weight is param and torch.equal(net[0].weight.detach(), dense * net[0].weight_mask)
    assert convert_(net) == []  # nothing left to fold
