"""MoEfication ops: balanced partitions, routers, and the MoE FFN against Hugging Face's own dense FFNs."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn
from transformers import GPT2Config, LlamaConfig
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
from transformers.models.llama.modeling_llama import LlamaMLP

from lightcook.ops.moe import (
    CentroidRouter,
    MLPRouter,
    MoEConfig,
    MoEFFN,
    OracleRouter,
    RandomRouter,
    RepresentativeRouter,
    _cut_groups,
    _l1_to_centroids,
    activation_markers,
    activation_sparsity,
    balanced_assign,
    balanced_kmeans,
    carve_partition,
    coactivation_partition,
    expert_mass,
    fit_centroid_router,
    fit_representative_router,
    make_router,
    partition_permutation,
    prepare_,
    random_partition,
    router_aux_loss,
    router_loss,
    split_,
    train_mlp_router,
)
from tests.helpers.structured_moe import model_inputs, tiny_model

D, D_FF = 32, 64


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread avoids OpenMP barrier waits on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def llama_mlp(seed: int = 0, act: str = "silu") -> LlamaMLP:
    torch.manual_seed(seed)
    return LlamaMLP(LlamaConfig(hidden_size=D, intermediate_size=D_FF, hidden_act=act)).eval()


def gpt2_mlp(seed: int = 0) -> GPT2MLP:
    torch.manual_seed(seed)
    mlp = GPT2MLP(D_FF, GPT2Config(n_embd=D)).eval()
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0, 0.2)  # GPT-2 initialises biases to 0; non-zero ones test their permutation
    return mlp


def wrap(ffn: nn.Module, experts: int = 8, top_k: int = 2, router: str = "oracle", **kwargs) -> MoEFFN:
    if isinstance(ffn, LlamaMLP):
        return MoEFFN.from_ffn(
            ffn, ["gate_proj", "up_proj"], "down_proj", "act_fn", True, experts, top_k, router, **kwargs
        )
    return MoEFFN.from_ffn(ffn, ["c_fc"], "c_proj", "act", False, experts, top_k, router, **kwargs)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------- partitions


def test_balanced_assign_fills_every_column_exactly():
    cost = torch.rand(60, 6, generator=torch.Generator().manual_seed(0))
    cost[:, 0] -= 1.0  # every row prefers column 0
    labels = balanced_assign(cost, 10)
    assert torch.bincount(labels, minlength=6).tolist() == [10] * 6
    # column 0 gets the 10 rows that want it most
    assert set(labels.eq(0).nonzero().squeeze(1).tolist()) == set(cost[:, 0].argsort()[:10].tolist())


def test_balanced_assign_rejects_wrong_capacity():
    with pytest.raises(ValueError, match="10 rows != 3 columns x capacity 3"):
        balanced_assign(torch.rand(10, 3), 3)


@pytest.mark.parametrize("experts", [2, 4, 8, 16])
def test_balanced_kmeans_experts_have_exactly_d_ff_over_e_neurons(experts):
    rows = torch.randn(D_FF, D, generator=torch.Generator().manual_seed(1))
    labels = balanced_kmeans(rows, experts)
    assert torch.bincount(labels, minlength=experts).tolist() == [D_FF // experts] * experts
    assert torch.equal(labels, balanced_kmeans(rows, experts))  # deterministic


def test_balanced_kmeans_recovers_planted_groups():
    gen = torch.Generator().manual_seed(2)
    centers = torch.randn(4, D, generator=gen) * 5
    truth = torch.arange(D_FF) % 4
    rows = centers[truth] + 0.3 * torch.randn(D_FF, D, generator=gen)
    labels = balanced_kmeans(rows, 4)
    for group in range(4):  # each planted group lands in one expert
        assert labels[truth == group].unique().numel() == 1


def test_coactivation_partition_groups_neurons_that_fire_together():
    gen = torch.Generator().manual_seed(3)
    groups = torch.randperm(D_FF, generator=gen) % 8  # 8 planted groups of 8 neurons
    topic = torch.randint(0, 8, (500,), generator=gen)  # each token activates one group
    h = (groups[None, :] == topic[:, None]).float() * torch.rand(500, D_FF, generator=gen)
    # k-means++ seeding can end in a local optimum (seed 0 does here on some CPUs' float paths; the
    # split itself is deterministic per seed): most seeds must recover the 8 planted groups exactly
    recovered = 0
    for seed in range(5):
        labels = coactivation_partition(h.T @ h, 8, seed=seed)
        assert torch.bincount(labels).tolist() == [8] * 8
        recovered += all(labels[groups == g].unique().numel() == 1 for g in range(8))
    assert recovered >= 4


def test_coactivation_partition_of_a_singular_float32_gram():
    h = torch.relu(torch.randn(20, D_FF, generator=torch.Generator().manual_seed(4)))  # rank <= 20 < 64
    labels = coactivation_partition((h.T @ h).float(), 8)
    assert torch.bincount(labels).tolist() == [8] * 8


def test_random_partition_is_balanced_and_seeded():
    a, b, c = random_partition(D_FF, 8, 0), random_partition(D_FF, 8, 0), random_partition(D_FF, 8, 1)
    assert torch.bincount(a).tolist() == [8] * 8 and torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    "fn",
    [
        lambda: balanced_kmeans(torch.randn(10, 4), 3),
        lambda: random_partition(10, 4),
        lambda: coactivation_partition(torch.eye(10), 3),
    ],
)
def test_partitions_reject_unequal_experts(fn):
    with pytest.raises(ValueError, match="do not split into .* equal experts"):
        fn()


def test_partition_permutation_makes_experts_contiguous():
    labels = random_partition(D_FF, 8, 5)
    perm = partition_permutation(labels, 8)
    assert sorted(perm.tolist()) == list(range(D_FF))
    assert torch.equal(labels[perm], torch.arange(D_FF) // 8)


# --------------------------------------------------------------------------- the MoE FFN: dense equivalence


@pytest.mark.parametrize("make", [llama_mlp, gpt2_mlp])
def test_permuted_dense_ffn_equals_the_original(make):
    reference = make()
    moe = wrap(copy.deepcopy(reference))
    moe.permute_(partition_permutation(balanced_kmeans(moe.gate_rows(), 8), 8))
    assert not torch.equal(moe.perm, torch.arange(D_FF))
    x = torch.randn(3, 7, D)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), reference(x), atol=1e-5, rtol=1e-5)  # not routed: the dense FFN
    first = moe.projections[0]
    rows = first.weight.t() if type(first).__name__ == "Conv1D" else first.weight
    ref_first = reference.c_fc.weight.t() if hasattr(reference, "c_fc") else reference.gate_proj.weight
    assert torch.equal(rows, ref_first[moe.perm])  # physically permuted


@pytest.mark.parametrize("make", [llama_mlp, gpt2_mlp])
@pytest.mark.parametrize("router", ["centroid", "mlp", "random", "oracle"])
def test_top_k_equal_to_e_is_the_dense_ffn(make, router):
    reference = make()
    moe = wrap(copy.deepcopy(reference), experts=8, top_k=8, router=router)
    moe.permute_(partition_permutation(random_partition(D_FF, 8), 8))
    moe.set_routed(True)
    x = torch.randn(2, 9, D)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), reference(x), atol=1e-5, rtol=1e-5)  # sparse path (oracle: masked)


def test_oracle_router_beats_a_random_router():
    reference = llama_mlp(act="relu")
    moe = wrap(copy.deepcopy(reference), experts=8, top_k=2, router="oracle")
    moe.permute_(partition_permutation(balanced_kmeans(moe.gate_rows(), 8), 8))
    moe.set_routed(True)
    x = torch.randn(4, 64, D)
    with torch.no_grad():
        dense = reference(x)
        oracle = relative_error(moe(x), dense)
        moe.router = RandomRouter(8)
        random = [relative_error(moe(x), dense) for _ in range(5)]
    assert oracle < min(random) and oracle < 0.8 * sum(random) / 5


@pytest.mark.parametrize("buckets", [1, 2, 8, 100])
@pytest.mark.parametrize("make", [llama_mlp, gpt2_mlp])
def test_sparse_path_equals_masked_dense_path(make, buckets):
    moe = wrap(make(), experts=8, top_k=3, router="centroid", buckets=buckets)
    moe.permute_(partition_permutation(balanced_kmeans(moe.gate_rows(), 8), 8))
    fit_centroid_router(moe.router, moe.gate_rows())
    moe.set_routed(True)
    x = torch.randn(2, 33, D)
    with torch.no_grad():
        sparse = moe(x)
    with torch.enable_grad():
        masked = moe(x)  # with gradients: dense computation with unselected experts zeroed
    torch.testing.assert_close(sparse, masked.detach(), atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(moe(x), sparse)  # inference tensors get their own workspace
    with torch.no_grad():
        torch.testing.assert_close(moe(x), sparse)


@pytest.mark.parametrize("act_mode", ["dynamic", "static", "none"])
def test_sparse_path_keeps_the_projections_fake_quantization(act_mode):
    """Experts made of QuantLinear layers: the no-grad sparse path computes what the (fake-quantized)
    dense masked path computes, weights and activations quantized alike."""
    from lightcook.ops.quant import QuantLinear, QuantSpec

    mlp = llama_mlp()
    for name in ("gate_proj", "up_proj", "down_proj"):
        q = QuantLinear.from_linear(getattr(mlp, name), QuantSpec(bits=4), "absmax", act_mode, 8)
        if act_mode == "static":
            q.input_quantizer.amax.fill_(2.5)
        setattr(mlp, name, q)
    moe = wrap(mlp, experts=8, top_k=3, router="centroid")
    moe.permute_(partition_permutation(balanced_kmeans(moe.gate_rows(), 8), 8))
    fit_centroid_router(moe.router, moe.gate_rows())
    moe.set_routed(True)
    x = torch.randn(2, 17, D)
    with torch.no_grad():
        sparse = moe(x)
    with torch.enable_grad():
        masked = moe(x).detach()
    torch.testing.assert_close(sparse, masked, atol=1e-5, rtol=1e-5)
    plain = wrap(llama_mlp(), experts=8, top_k=3, router="centroid")  # same weights, not quantized
    plain.load_state_dict({k: v for k, v in moe.state_dict().items() if "quantizer" not in k}, strict=False)
    with torch.no_grad():
        assert relative_error(plain(x), sparse) > 1e-3  # 4-bit weights do change the output


def test_hooked_projections_make_the_sparse_path_fall_back_to_the_dense_one():
    """Forward hooks on a projection (structured-pruning gates on the down projection) must act:
    the sparse path, which reads weights directly, steps aside while they are there."""
    moe = wrap(llama_mlp(), experts=8, top_k=3, router="centroid")
    moe.permute_(partition_permutation(balanced_kmeans(moe.gate_rows(), 8), 8))
    fit_centroid_router(moe.router, moe.gate_rows())
    moe.set_routed(True)
    x = torch.randn(2, 9, D)
    with torch.no_grad():
        before = moe(x)
    handle = moe.down_proj.register_forward_hook(lambda _m, _i, out: out * 0.5)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), before * 0.5)
    handle.remove()


def test_sparse_path_never_reads_unselected_experts():
    """Real conditional computation: an expert no token picks can hold NaN without effect."""
    moe = wrap(llama_mlp(), experts=8, top_k=2, router="centroid")
    moe.set_routed(True)
    with torch.no_grad():
        moe.router.centroids.normal_()
        moe.router.centroids[5] = -1e4  # expert 5 never wins (inputs have a positive mean below)
        x = torch.randn(2, 16, D) * 0.1 + 1.0
        before = moe(x)
        block = slice(5 * 8, 6 * 8)
        moe.gate_proj.weight[block] = float("nan")
        moe.up_proj.weight[block] = float("nan")
        moe.down_proj.weight[:, block] = float("nan")
        after = moe(x)
        masked = moe._masked(x)
    assert moe.load_counts[5] == 0
    assert torch.isfinite(after).all() and torch.equal(after, before)
    assert torch.isnan(masked).any()  # the dense computation does touch them


def test_permute_also_permutes_adam_moments():
    torch.manual_seed(0)
    moe_a = wrap(llama_mlp(), router="mlp")
    moe_b = copy.deepcopy(moe_a)
    opt_a, opt_b = (torch.optim.Adam(m.parameters(), lr=1e-2) for m in (moe_a, moe_b))
    x = torch.randn(4, 5, D)
    for moe, opt in ((moe_a, opt_a), (moe_b, opt_b)):
        moe(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    moe_b.permute_(partition_permutation(random_partition(D_FF, 8, 3), 8), [opt_b])
    for moe, opt in ((moe_a, opt_a), (moe_b, opt_b)):  # one more step on both
        moe(x).square().mean().backward()
        opt.step()
    with torch.no_grad():
        torch.testing.assert_close(moe_b(x), moe_a(x), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(moe_b.gate_proj.weight, moe_a.gate_proj.weight[moe_b.perm])


def test_permute_keeps_mask_buffers_aligned():
    moe = wrap(llama_mlp())
    mask = (torch.rand(D_FF, D) > 0.5).float()
    moe.gate_proj.register_buffer("weight_mask", mask.clone())
    perm = partition_permutation(random_partition(D_FF, 8, 1), 8)
    moe.permute_(perm)
    assert torch.equal(moe.gate_proj.weight_mask, mask[perm])


def test_relu_switch_changes_the_activation():
    moe = wrap(llama_mlp())
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        silu = moe.intermediate(x)
        moe.set_relu(True)
        relu = moe.intermediate(x)
    assert float((silu == 0).float().mean()) == 0.0 and float((relu == 0).float().mean()) > 0.3


# --------------------------------------------------------------------------- routers


def test_mlp_router_learns_the_oracle_ranking():
    reference = llama_mlp(act="relu")
    moe = wrap(copy.deepcopy(reference), experts=8, top_k=2, router="mlp", router_hidden=64)
    moe.permute_(partition_permutation(balanced_kmeans(moe.gate_rows(), 8), 8))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4000, D, generator=gen)
    with torch.no_grad():
        mass = expert_mass(moe.intermediate(x), 8)
    untrained = router_loss(moe.router(x[:500]), mass[:500]).item()
    final = train_mlp_router(moe.router, x[500:], mass[500:], steps=300, lr=3e-3, batch_size=256)
    with torch.no_grad():
        held_out = router_loss(moe.router(x[:500]), mass[:500]).item()
        picked = moe.router(x[:500]).topk(2, 1).indices
    best = mass[:500].topk(2, 1).indices
    overlap = (picked[:, :, None] == best[:, None, :]).any(2).float().mean().item()
    assert held_out < untrained and final < untrained
    assert overlap > 0.5  # random choice overlaps 2/8 = 0.25 on average


def test_centroid_router_centroids_are_expert_means():
    router = CentroidRouter(D, 4)
    rows = torch.randn(16, D)
    fit_centroid_router(router, rows)
    torch.testing.assert_close(router.centroids[1], rows[4:8].mean(0))
    torch.testing.assert_close(router(rows[:3]), rows[:3] @ router.centroids.t())


def test_make_router_kinds_and_error():
    assert isinstance(make_router("mlp", D, 4, 8), MLPRouter)
    assert isinstance(make_router("oracle", D, 4), OracleRouter)
    with pytest.raises(ValueError, match="router: got 'learned', allowed: mlp, centroid, oracle, random"):
        make_router("learned", D, 4)


def test_router_finetune_gradient_leaves_the_output_unchanged():
    moe = wrap(llama_mlp(), router="mlp", router_loss_weight=1.0).train()
    moe.set_routed(True)
    x = torch.randn(2, 6, D)
    out = moe(x)
    assert moe.last_router_loss is not None and moe.aux_loss is not None
    out.sum().backward()  # the output alone does not train the router ...
    assert moe.router.fc1.weight.grad is None
    router_aux_loss([moe]).backward()  # ... its recorded loss, added to the training loss, does
    assert moe.router.fc1.weight.grad is not None and moe.router.fc1.weight.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(out.detach(), moe.eval()(x))  # same function as the sparse path


def test_router_loss_term_gives_the_router_gradient_of_its_regression_loss():
    """The term ``router_aux_loss`` returns (what MoEfication adds to the loss) gives every parameter
    the gradient of ``task + weight · router_loss(router(x), expert_mass(h))``, computed here by hand:
    the router gets exactly the regression gradient (the gradient-only trick it replaces gave the same)."""
    moe = wrap(llama_mlp(), router="mlp", router_loss_weight=0.5).train()
    moe.set_routed(True)
    x = torch.randn(3, 5, D)
    params = [p for p in moe.parameters() if p.requires_grad]
    got = torch.autograd.grad(moe(x).square().sum() + router_aux_loss([moe]), params, allow_unused=True)
    x2 = x.reshape(-1, D)
    h = moe.intermediate(x2)
    scores = moe.router(x2)
    top = scores.topk(2, dim=1).indices
    mask = torch.zeros_like(scores).scatter_(1, top, 1.0)
    out = moe.down_proj((h.view(-1, 8, D_FF // 8) * mask[:, :, None]).view(h.shape))
    reference = out.square().sum() + 0.5 * router_loss(scores, expert_mass(h, 8))
    want = torch.autograd.grad(reference, params, allow_unused=True)
    for name, a, b in zip([n for n, p in moe.named_parameters() if p.requires_grad], got, want):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    assert any(n.startswith("router.") for n, p in moe.named_parameters() if p.requires_grad)
    assert router_aux_loss([moe]) is None  # taken once


def test_router_aux_loss_keeps_only_the_last_forward():
    moe = wrap(llama_mlp(), router="mlp", router_loss_weight=1.0).train()
    moe.set_routed(True)
    for seed in range(3):  # forwards nobody collected do not pile up graphs
        moe(torch.randn(2, 4, D, generator=torch.Generator().manual_seed(seed)))
    assert float(router_aux_loss([moe]).detach()) == pytest.approx(moe.last_router_loss)
    moe.eval()(torch.randn(2, 4, D))
    assert moe.aux_loss is None  # nothing recorded outside training


# --------------------------------------------------------------------------- config and pure transforms


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_experts": 0}, r"^num_experts: must lie in \[1, inf\], got 0$"),
        ({"top_k": 9, "num_experts": 8}, r"^top_k: must be <= num_experts \(8\), got 9$"),
        (
            {"split": "spectral"},
            r"^split: got 'spectral'; allowed: 'kmeans', 'coactivation', 'random', 'carve'$",
        ),
        (
            {"split": "carve", "shared_experts": 8, "num_experts": 8},
            r"^shared_experts: must be < num_experts \(8\), got 8$",
        ),
        (
            {"shared_experts": 2},
            r"^shared_experts: always-on experts need split=carve \(got split='coactivation'\)",
        ),
        ({"router": "representative"}, r"^router: representative needs split=carve"),
        (
            {"split": "carve", "num_experts": 8, "shared_experts": 4, "top_k": 5},
            r"^top_k: must be <= num_experts - shared_experts \(4 routed experts\), got 5$",
        ),
        ({"split": "carve", "active_fraction": 0}, r"^active_fraction: must be > 0, got 0$"),
        ({"router_lr": 0}, r"^router_lr: must be > 0, got 0$"),
        ({"architecture": 3}, r"^architecture: expected null, a layout name or a mapping"),
    ],
)
def test_moe_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**kwargs)


def test_prepare_and_split_without_lightning():
    model = tiny_model("gpt2")  # GPT-2 d_ff = 128
    inputs = model_inputs("gpt2")
    with torch.no_grad():
        dense = model(**inputs).logits
    config = MoEConfig(num_experts=8, top_k=8, split="kmeans", router="mlp", router_steps=5, router_hidden=8)
    moes = prepare_(model, config)
    assert sorted(moes) == ["transformer.h.0.mlp", "transformer.h.1.mlp"] and prepare_(model, config) == moes
    outcome = split_(model, moes, config, [inputs, model_inputs("gpt2", seed=1)])
    assert outcome["calibration_tokens"] == 2 * 2 * 12 and outcome["router_fit_loss"] is not None
    assert all(bool(m.routed) and not torch.equal(m.perm, torch.arange(128)) for m in moes.values())
    with torch.no_grad():  # top_k = num_experts: permuted and routed, still the dense function
        torch.testing.assert_close(model(**inputs).logits, dense, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"^calibration_batches: no training batch"):
        split_(model, moes, config, [])
    with pytest.raises(ValueError, match=r"^num_experts: .* already split into 8 experts"):
        prepare_(model, MoEConfig(num_experts=16, top_k=2))


# --------------------------------------------------------------------------- errors, statistics, bucketing


def test_moe_ffn_errors():
    with pytest.raises(ValueError, match="64 neurons do not split into 5 equal experts"):
        wrap(llama_mlp(), experts=5)
    with pytest.raises(ValueError, match=r"top_k must be an integer in \[1, 8\], got 9"):
        wrap(llama_mlp(), experts=8, top_k=9)
    mlp = llama_mlp()
    with pytest.raises(ValueError, match="a gated FFN needs two input projections"):
        MoEFFN(
            {"gate_proj": mlp.gate_proj}, ("down_proj", mlp.down_proj), nn.SiLU(), 8, 2, OracleRouter(8), True
        )


def test_activation_sparsity_reference_values():
    h = torch.tensor([[4.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    stats = activation_sparsity(h, mass=0.9)
    assert stats["zero_fraction"] == 3 / 8
    assert stats["mass_fraction"] == pytest.approx((1 / 4 + 4 / 4) / 2)


def _brute_force_groups(loads: list[int], groups: int) -> float:
    best = float("inf")
    n = len(loads)
    for cuts in range(groups):
        for inner in itertools.combinations(range(1, n), cuts):
            bounds = [0, *inner, n]
            best = min(best, sum((b - a) * loads[a] for a, b in zip(bounds, bounds[1:])))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_cut_groups_is_optimal(seed):
    gen = torch.Generator().manual_seed(seed)
    loads = sorted(torch.randint(1, 50, (7,), generator=gen).tolist(), reverse=True)
    cuts = _cut_groups(loads, 3)
    assert cuts[0][0] == 0 and cuts[-1][1] == 7 and len(cuts) <= 3
    assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))
    assert sum((b - a) * loads[a] for a, b in cuts) == _brute_force_groups(loads, 3)


# --------------------------------------------------------------------------- carved MoE (CMoE)


def carved(
    reference: LlamaMLP, x: torch.Tensor, experts: int = 8, shared: int = 2, top_k: int = 2, **kw
) -> MoEFFN:
    """``reference`` carved on the inputs ``x``: markers, carve, permutation, representative router."""
    moe = MoEFFN.from_ffn(
        copy.deepcopy(reference), ["gate_proj", "up_proj"], "down_proj", "act_fn", True, experts, top_k,
        "representative", shared_experts=shared, **kw,
    )  # fmt: skip
    with torch.no_grad():
        markers = activation_markers(moe.intermediate(x.reshape(-1, D)), D_FF // 8)
    labels, reps = carve_partition(markers.T @ markers, experts, shared)
    perm = partition_permutation(labels, experts)
    moe.permute_(perm)
    where = perm.argsort()[reps]
    fit_representative_router(moe.router, moe.gate_rows()[where], moe.up_rows()[where])
    moe.set_routed(True)
    return moe


def test_carved_moe_with_every_routed_expert_is_the_dense_ffn():
    reference = llama_mlp(seed=5)
    x = torch.randn(4, 16, D)
    moe = carved(reference, x, experts=8, shared=2, top_k=6)  # top_k = every routed expert
    assert moe.compute_fraction == 1.0 and moe.shared_size == 16
    y = torch.randn(3, 11, D)
    with torch.no_grad():
        torch.testing.assert_close(moe(y), reference(y), atol=1e-5, rtol=1e-5)  # sparse path
    with torch.enable_grad():
        torch.testing.assert_close(moe(y).detach(), reference(y), atol=1e-5, rtol=1e-5)  # masked path


def test_carved_moe_computes_the_shared_neurons_and_the_top_k_routed_experts():
    """Outside reference: the dense FFN with only the shared and each token's top-k experts' neurons
    kept (the experts ranked by the representative neuron's activation, recomputed here by hand)."""
    reference = llama_mlp(seed=6)
    moe = carved(reference, torch.randn(4, 16, D), experts=8, shared=2, top_k=2)
    assert moe.compute_fraction == 0.5
    y = torch.randn(2, 13, D).reshape(-1, D)
    with torch.no_grad():
        sparse = moe(y)
        masked = torch.enable_grad()(moe)(y).detach()
        h = reference.act_fn(reference.gate_proj(y)) * reference.up_proj(y)  # (N, d_ff), original order
        xn = torch.nn.functional.normalize(y, dim=-1)
        g, u = moe.router.gate, moe.router.up  # unit rows of the representatives
        top = (reference.act_fn(xn @ g.T) * (xn @ u.T)).abs().topk(2, dim=1).indices  # (N, 2) routed
        keep = torch.zeros(y.shape[0], D_FF)
        keep[:, :16] = 1.0
        for e in range(2):
            rows = 16 + top[:, e : e + 1] * 8 + torch.arange(8)  # (N, 8) positions of the chosen experts
            keep.scatter_(1, rows, 1.0)
        expected = reference.down_proj(
            (h[:, moe.perm] * keep)[:, moe.perm.argsort()]
        )  # back to the original order
    torch.testing.assert_close(sparse, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked, expected, atol=1e-5, rtol=1e-5)


def test_shared_neurons_are_the_most_often_active_ones():
    """A constructed input where 16 neurons are among a token's top 8 |h| with known, distinct
    frequencies; the carve's shared experts are exactly the 16 most frequent ones (brute force count)."""
    gen = torch.Generator().manual_seed(7)
    tokens = 400
    h = torch.rand(tokens, D_FF, generator=gen)  # background in [0, 1)
    hubs = torch.randperm(D_FF, generator=gen)[:24]
    rates = torch.linspace(0.95, 0.25, 24)  # distinct target frequencies
    fire = torch.rand(tokens, 24, generator=gen) < rates
    h[:, hubs] += 5.0 * fire  # a firing hub is among the token's largest
    h *= torch.where(torch.rand(tokens, D_FF, generator=gen) < 0.5, -1.0, 1.0)  # signs do not matter
    active = 8
    counts = torch.zeros(D_FF)
    for row in h.abs():  # brute force: each token's `active` largest |h|
        counts[sorted(range(D_FF), key=lambda i: -float(row[i]))[:active]] += 1
    markers = activation_markers(h, active)
    assert torch.equal(markers.sum(0), counts)
    labels, reps = carve_partition(markers.T @ markers, 8, 2)
    expected = set(torch.sort(counts, descending=True, stable=True).indices[:16].tolist())
    assert set(labels.lt(2).nonzero().squeeze(1).tolist()) == expected
    assert torch.bincount(labels).tolist() == [8] * 8
    assert all(int(labels[r]) == 2 + e for e, r in enumerate(reps.tolist()))  # each represents its expert


def test_carve_groups_neurons_that_fire_together():
    gen = torch.Generator().manual_seed(8)
    groups = torch.randperm(D_FF, generator=gen) % 8  # 8 planted groups of 8 neurons
    topic = torch.randint(0, 8, (600,), generator=gen)
    markers = (groups[None, :] == topic[:, None]).float()  # a token activates its topic's group
    labels, _reps = carve_partition(markers.T @ markers, 8, 0)
    assert all(labels[groups == g].unique().numel() == 1 for g in range(8))


def test_l1_distances_from_the_gram_equal_the_brute_force_ones():
    gen = torch.Generator().manual_seed(9)
    markers = (torch.rand(50, 12, generator=gen) < 0.4).double()  # (tokens, neurons)
    members = torch.tensor([[0, 3, 5], [1, 2, 4], [6, 7, 8]])
    gram = markers.T @ markers
    fast = _l1_to_centroids(gram, gram.diagonal(), members)
    centroids = torch.stack([markers[:, m].mean(1) for m in members])  # (R, tokens)
    torch.testing.assert_close(fast, torch.cdist(markers.T, centroids, p=1))


def test_representative_router_scores_the_representative_neurons_activation():
    mlp = llama_mlp(seed=10)
    router = RepresentativeRouter(D, 3, mlp.act_fn)
    reps = torch.tensor([4, 17, 40])
    fit_representative_router(router, mlp.gate_proj.weight[reps], mlp.up_proj.weight[reps])
    x = torch.randn(5, D)
    unit = copy.deepcopy(mlp)
    with torch.no_grad():
        unit.gate_proj.weight.div_(unit.gate_proj.weight.norm(dim=1, keepdim=True))
        unit.up_proj.weight.div_(unit.up_proj.weight.norm(dim=1, keepdim=True))
        xn = x / x.norm(dim=1, keepdim=True)
        expected = (unit.act_fn(unit.gate_proj(xn)) * unit.up_proj(xn))[:, reps].abs()
        torch.testing.assert_close(router(x), expected)


@pytest.mark.parametrize("act_mode", ["dynamic", "static"])
def test_carved_sparse_path_keeps_the_fake_quantization(act_mode):
    from lightcook.ops.quant import QuantLinear, QuantSpec

    mlp = llama_mlp(seed=11)
    for name in ("gate_proj", "up_proj", "down_proj"):
        q = QuantLinear.from_linear(getattr(mlp, name), QuantSpec(bits=4), "absmax", act_mode, 8)
        if act_mode == "static":
            q.input_quantizer.amax.fill_(2.5)
        setattr(mlp, name, q)
    moe = carved(mlp, torch.randn(2, 16, D), experts=8, shared=2, top_k=3)
    x = torch.randn(2, 17, D)
    with torch.no_grad():
        sparse = moe(x)
    with torch.enable_grad():
        masked = moe(x).detach()
    torch.testing.assert_close(sparse, masked, atol=1e-5, rtol=1e-5)


def test_carve_on_an_ungated_ffn_names_the_split():
    model = tiny_model("gpt2")
    with pytest.raises(
        ValueError, match=r"^split: carve needs a gated FFN .*transformer\.h\.0\.mlp has no gate projection"
    ):
        prepare_(model, MoEConfig(num_experts=8, top_k=2, split="carve", shared_experts=2))


def test_prepare_and_split_carve_without_lightning():
    model = tiny_model("llama")
    inputs = model_inputs("llama")
    with torch.no_grad():
        dense = model(**inputs).logits
    config = MoEConfig(num_experts=8, top_k=6, split="carve", shared_experts=2, router="representative")
    moes = prepare_(model, config)
    split_(model, moes, config, [inputs, model_inputs("llama", seed=1)])
    assert all(m.shared_experts == 2 and m.routed_experts == 6 and bool(m.routed) for m in moes.values())
    assert all(m.router.gate.abs().sum() > 0 for m in moes.values())  # the routers were built
    with torch.no_grad():  # every routed expert: the dense function
        torch.testing.assert_close(model(**inputs).logits, dense, atol=1e-4, rtol=1e-4)


def test_shared_experts_out_of_range_in_the_module():
    with pytest.raises(ValueError, match=r"^shared_experts: must be in \[0, 7\], got 8$"):
        wrap(llama_mlp(), experts=8, top_k=1, router="random", shared_experts=8)
    with pytest.raises(ValueError, match=r"top_k must be an integer in \[1, 6\], got 7"):
        wrap(llama_mlp(), experts=8, top_k=7, router="random", shared_experts=2)


@pytest.mark.parametrize("shared", [0, 2])
def test_one_token_decode_path_equals_the_masked_dense_path(shared):
    moe = carved(llama_mlp(seed=12), torch.randn(2, 16, D), experts=8, shared=shared, top_k=3)
    for _ in range(3):
        x = torch.randn(1, 1, D)
        with torch.no_grad():
            sparse = moe(x)
        with torch.enable_grad():
            masked = moe(x).detach()
        torch.testing.assert_close(sparse, masked, atol=1e-5, rtol=1e-5)
