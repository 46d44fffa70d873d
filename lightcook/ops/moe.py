"""MoEfication in pure torch: split a dense FFN's neurons into equal experts, route tokens to the
top-k experts, and compute only those (Zhang et al., "MoEfication: Transformer Feed-forward Layers
are Mixtures of Experts", Findings of ACL 2022).

* Partition (``labels``: expert of each intermediate neuron, every expert exactly ``d_ff / E``):
  :func:`balanced_kmeans` over the neurons' normalised input weight vectors,
  :func:`coactivation_partition` (balanced kernel k-means on the co-activation graph measured on
  data), or :func:`random_partition` (baseline). :func:`partition_permutation` turns labels into a
  neuron order in which every expert is a contiguous slice.
* Carved MoE (CMoE, Pei et al. 2025, gated FFNs without ReLU-fication): :func:`carve_partition` makes
  the most often active neurons (:func:`activation_markers`) ``shared_experts`` always-on experts and
  groups the rest by co-activation into balanced routed experts, each with a representative neuron;
  :class:`RepresentativeRouter` scores an expert by its representative's activation (no training).
  A token then computes ``(shared_experts + top_k) / num_experts`` of the FFN.
* :class:`MoEFFN` replaces a dense FFN (gated SwiGLU/GeGLU or plain ``act(fc)``), reusing its Linear
  (or GPT-2 ``Conv1D``) modules under their original names. :meth:`MoEFFN.permute_` reorders the
  neurons physically (gate/up rows, down columns, optimizer moments too), which leaves the dense
  function unchanged. Until ``routed`` is set it *is* the dense FFN. Routed, it runs

  - without gradients (inference): real conditional computation — tokens are grouped by expert,
    experts are grouped by load, each group is two batched matmuls (``torch.bmm``: gate+up, down)
    over only its tokens, and each token sums its k expert outputs (``embedding_bag``);
  - with gradients (training): the dense FFN with every token's unselected experts masked out (same
    function); with ``router_loss_weight > 0`` each training forward also records the router-regression
    loss in ``aux_loss``, for the training loop to add to the model's loss (:func:`router_aux_loss`).
* :class:`MoEConfig` holds the settings; :func:`prepare_` swaps every FFN of a network for a
  :class:`MoEFFN` (still the dense function) and :func:`split_` partitions, permutes, fits the
  routers and turns routing on, from calibration batches: MoEfication without Lightning.
* Routers: :class:`MLPRouter` (trained by :func:`train_mlp_router` to predict each expert's share of
  the activation mass), :class:`CentroidRouter` (similarity to expert centroids, :func:`fit_centroid_router`),
  :class:`OracleRouter` (ground truth: the experts with the largest activation mass; evaluation
  only, it needs the dense activations) and :class:`RandomRouter` (baseline).

Example:
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> gate, up, down = nn.Linear(16, 32, bias=False), nn.Linear(16, 32, bias=False), nn.Linear(32, 16, bias=False)
    >>> dense = lambda x: down(nn.functional.silu(gate(x)) * up(x))
    >>> moe = MoEFFN({"gate_proj": gate, "up_proj": up}, ("down_proj", down), nn.SiLU(), num_experts=4,
    ...              top_k=4, router=CentroidRouter(16, 4), gated=True)
    >>> moe.permute_(partition_permutation(balanced_kmeans(gate.weight.detach(), 4), 4))
    >>> fit_centroid_router(moe.router, moe.gate_rows())
    >>> moe.set_routed(True)
    >>> x = torch.randn(2, 5, 16)
    >>> with torch.no_grad():
    ...     torch.allclose(moe(x), dense(x), atol=1e-5)  # top_k = E: the dense FFN
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightcook.ops.architectures import FFN, Block, FFNLayout, check_architecture_arg, find_blocks
from lightcook.ops.config import TechniqueConfig, check_choice, check_int, check_number
from lightcook.ops.names import is_conv1d
from lightcook.ops.quant import effective_weight, fake_quant, fake_quant_input, input_quantization

PARTITIONS = ("kmeans", "coactivation", "random", "carve")
ROUTERS = ("mlp", "centroid", "oracle", "random", "representative")

__all__ = [
    "PARTITIONS",
    "ROUTERS",
    "CentroidRouter",
    "MLPRouter",
    "RepresentativeRouter",
    "MoEFFN",
    "OracleRouter",
    "RandomRouter",
    "activation_markers",
    "activation_sparsity",
    "balanced_assign",
    "balanced_kmeans",
    "carve_partition",
    "coactivation_partition",
    "fit_representative_router",
    "expert_mass",
    "fit_centroid_router",
    "make_router",
    "moe_modules",
    "partition_permutation",
    "random_partition",
    "release_workspaces",
    "reset_load",
    "MoEConfig",
    "capture_activations",
    "prepare_",
    "router_aux_loss",
    "router_kind",
    "router_loss",
    "split_",
    "router_targets",
    "set_top_k",
    "train_mlp_router",
]


# --------------------------------------------------------------------------- balanced partitions


def _check_split(num_items: int, num_clusters: int) -> int:
    if num_clusters < 1 or num_items % num_clusters:
        raise ValueError(f"{num_items} neurons do not split into {num_clusters} equal experts")
    return num_items // num_clusters


def balanced_assign(cost: Tensor, capacity: int) -> Tensor:
    """Assign every row to a column, each column receiving exactly ``capacity`` rows, greedily by cost.

    Rounds of proposals: every unassigned row proposes to its cheapest column that still has room;
    a column accepts its cheapest proposers up to its remaining room. Every round fills a column or
    places every proposer, so there are at most ``columns + 1`` rounds.

    Args:
        cost: ``(n, E)`` cost of putting row ``i`` into column ``e`` (e.g. squared distances).
        capacity: rows per column; ``n == E * capacity``.

    Returns:
        ``(n,)`` long column index per row.

    Raises:
        ValueError: ``n != E * capacity``.

    Example:
        >>> balanced_assign(torch.tensor([[0.0, 1.0], [0.1, 2.0], [0.2, 0.5], [3.0, 0.0]]), 2).tolist()
        [0, 0, 1, 1]
    """
    n, num = cost.shape
    if n != num * capacity:
        raise ValueError(f"balanced_assign: {n} rows != {num} columns x capacity {capacity}")
    labels = torch.full((n,), -1, dtype=torch.long)
    room = torch.full((num,), capacity, dtype=torch.long)
    cost = cost.detach().float().cpu()
    while True:
        free = (labels < 0).nonzero().squeeze(1)  # (F,)
        if free.numel() == 0:
            return labels
        c = cost[free].masked_fill(room[None, :] == 0, math.inf)  # (F, E)
        best, choice = c.min(dim=1)  # (F,), (F,)
        order = best.argsort(stable=True)
        order = order[choice[order].argsort(stable=True)]  # by column, cheapest first within one
        col = choice[order]
        counts = torch.bincount(col, minlength=num)
        rank = torch.arange(col.numel()) - (counts.cumsum(0) - counts)[col]
        accept = rank < room[col]
        labels[free[order[accept]]] = col[accept]
        room -= torch.bincount(col[accept], minlength=num)


def balanced_kmeans(points: Tensor, num_clusters: int, iters: int = 20, seed: int = 0) -> Tensor:
    """Balanced k-means: ``num_clusters`` clusters of exactly ``n / num_clusters`` points each.

    Rows are L2-normalised first (the direction of a neuron's input weight vector decides when it
    fires), seeded with k-means++, then Lloyd iterations alternate :func:`balanced_assign` on squared
    distances with centroid updates, until the assignment repeats or ``iters`` is reached.
    Deterministic for a given ``seed``.

    Args:
        points: ``(n, D)`` one row per neuron.
        num_clusters: number of experts ``E``; must divide ``n``.
        iters: maximum Lloyd iterations.
        seed: seed of the initial centroids.

    Returns:
        ``(n,)`` long expert label per point.

    Raises:
        ValueError: ``num_clusters`` does not divide ``n``.

    Example:
        >>> pts = torch.cat([torch.randn(4, 3) + 10, torch.randn(4, 3) - 10])
        >>> torch.bincount(balanced_kmeans(pts, 2)).tolist()
        [4, 4]
    """
    capacity = _check_split(points.shape[0], num_clusters)
    x = F.normalize(points.detach().float().cpu(), dim=1)  # (n, D)
    centroids = _kmeans_pp(x, num_clusters, torch.Generator().manual_seed(seed))  # (E, D)
    labels: Tensor | None = None
    for _ in range(max(1, iters)):
        cost = centroids.square().sum(1)[None, :] - 2.0 * (x @ centroids.t())  # (n, E): |x - c|² - 1
        new = balanced_assign(cost, capacity)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        centroids = x[labels.argsort(stable=True)].view(num_clusters, capacity, -1).mean(1)  # (E, D)
    return cast(Tensor, labels)  # the loop ran at least once


def _kmeans_pp(x: Tensor, num_clusters: int, gen: torch.Generator) -> Tensor:
    """k-means++ seeding: each next centroid drawn with probability proportional to the squared
    distance to the nearest centroid so far."""
    chosen = [int(torch.randint(x.shape[0], (1,), generator=gen))]
    nearest = (x - x[chosen[0]]).square().sum(1)  # (n,)
    for _ in range(num_clusters - 1):
        weights = nearest.clamp_min(0) + 1e-12
        chosen.append(int(torch.multinomial(weights, 1, generator=gen)))
        nearest = torch.minimum(nearest, (x - x[chosen[-1]]).square().sum(1))
    return x[chosen].clone()


def random_partition(num_neurons: int, num_experts: int, seed: int = 0) -> Tensor:
    """Labels of a random balanced partition (the baseline of the paper).

    Raises:
        ValueError: ``num_experts`` does not divide ``num_neurons``.

    Example:
        >>> torch.bincount(random_partition(12, 3)).tolist()
        [4, 4, 4]
    """
    capacity = _check_split(num_neurons, num_experts)
    perm = torch.randperm(num_neurons, generator=torch.Generator().manual_seed(seed))
    labels = torch.empty(num_neurons, dtype=torch.long)
    labels[perm] = torch.arange(num_neurons) // capacity
    return labels


def coactivation_partition(coactivation: Tensor, num_experts: int, iters: int = 20, seed: int = 0) -> Tensor:
    """Balanced partition of the co-activation graph: neurons that fire together share an expert.

    ``coactivation[i, j] = Σ_tokens |h_i| |h_j|`` (accumulate ``|H|ᵀ|H|`` over calibration tokens).
    After cosine normalisation it is the kernel of the neurons' activation vectors; its Cholesky
    factor ``L`` has rows whose pairwise distances are exactly those of the normalised activation
    vectors, so balanced k-means on the rows of ``L`` is balanced kernel k-means on the graph
    (maximising the normalised co-activation inside experts).

    Args:
        coactivation: ``(n, n)`` symmetric positive semi-definite.
        num_experts: ``E``; must divide ``n``.
        iters, seed: as in :func:`balanced_kmeans`.

    Returns:
        ``(n,)`` long expert label per neuron.

    Raises:
        ValueError: not square, or ``num_experts`` does not divide ``n``.

    Example:
        >>> h = torch.zeros(20, 4); h[:10, :2] = 1.0; h[10:, 2:] = 1.0  # neurons 0,1 and 2,3 co-fire
        >>> coactivation_partition(h.T @ h, 2).tolist()[:2] == [coactivation_partition(h.T @ h, 2)[0].item()] * 2
        True
    """
    n = coactivation.shape[0]
    if coactivation.shape != (n, n):
        raise ValueError(f"coactivation_partition: expected a square matrix, got {tuple(coactivation.shape)}")
    _check_split(n, num_experts)
    c = coactivation.detach().double().cpu()
    diag = c.diagonal().clamp_min(1e-12).sqrt()
    kernel = c / diag[:, None] / diag[None, :]  # cosine similarity of activation vectors
    return balanced_kmeans(_psd_factor(kernel).float(), num_experts, iters, seed)


def _psd_factor(kernel: Tensor) -> Tensor:
    """Cholesky factor of ``kernel + εI``, with the smallest ``ε`` (1e-6 upwards) that makes it
    positive definite (a Gram matrix of fewer tokens than neurons is singular, and float32
    accumulation leaves tiny negative eigenvalues). ``εI`` adds the same ``2ε`` to every squared
    distance, so the clustering is unaffected."""
    eye = torch.eye(kernel.shape[0], dtype=kernel.dtype)
    jitter = 1e-6
    while True:
        factor, info = torch.linalg.cholesky_ex(kernel + jitter * eye)  # (n, n)
        if int(info) == 0 or jitter >= 1.0:
            return factor
        jitter *= 10.0


def partition_permutation(labels: Tensor, num_experts: int) -> Tensor:
    """Neuron order in which expert ``e`` holds the contiguous slice ``[e*m, (e+1)*m)``.

    ``perm[j]`` is the old index of the neuron at new position ``j`` (stable inside an expert).

    Raises:
        ValueError: the experts are not all the same size.

    Example:
        >>> partition_permutation(torch.tensor([1, 0, 1, 0]), 2).tolist()
        [1, 3, 0, 2]
    """
    sizes = torch.bincount(labels, minlength=num_experts)
    if sizes.numel() != num_experts or not bool((sizes == sizes[0]).all()):
        raise ValueError(f"partition_permutation: unequal experts {sizes.tolist()}")
    return labels.argsort(stable=True)


def activation_markers(h: Tensor, active: int) -> Tensor:
    """``(N, d_ff)`` float 0/1: which neurons are *active* for each token — its ``active`` neurons of
    largest ``|h|`` (CMoE's activation markers; ties broken by :func:`torch.topk`).

    Example:
        >>> activation_markers(torch.tensor([[0.1, -3.0, 2.0], [5.0, 0.0, 1.0]]), 2).tolist()
        [[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]
    """
    a = h.detach().abs().float()  # (N, d_ff)
    top = a.topk(max(1, min(active, a.shape[1])), dim=1).indices  # (N, K)
    return torch.zeros_like(a).scatter_(1, top, 1.0)


def carve_partition(
    gram: Tensor, num_experts: int, shared_experts: int, iters: int = 20
) -> tuple[Tensor, Tensor]:
    """CMoE's carving (Pei et al. 2025): ``shared_experts`` always-on experts of the most often active
    neurons, the rest grouped into equal routed experts of neurons active on the same tokens.

    ``gram = MᵀM`` of the 0/1 activation markers ``M`` ``(tokens, d_ff)`` (:func:`activation_markers`),
    so ``gram[i, i]`` is how often neuron ``i`` was active. The ``shared_experts * m`` most active
    neurons (``m = d_ff / num_experts``; ties: lower index) become the shared experts. The other neurons
    are clustered by the L1 distance of their marker vectors, computed from ``gram`` alone
    (``|x_i - c|₁ = |x_i| + |c| - 2 x_i·c`` with ``c`` the mean marker vector of a cluster): the
    centroids start at the most active remaining neurons, then balanced assignments
    (:func:`balanced_assign`, exactly ``m`` neurons per expert) alternate with centroid updates until
    the assignment repeats or ``iters`` is reached. Each routed expert's *representative* is its
    neuron closest to its centroid; the router scores experts by their representatives.

    Args:
        gram: ``(d_ff, d_ff)`` marker co-occurrence counts.
        num_experts: ``E``, shared plus routed; must divide ``d_ff``.
        shared_experts: ``S``, ``0 <= S < E``.
        iters: maximum assignment rounds (>= 1).

    Returns:
        ``labels`` ``(d_ff,)``: experts ``0 .. S-1`` are the shared ones (by decreasing activity),
        ``S .. E-1`` the routed ones; ``representatives`` ``(E - S,)``: the original index of each
        routed expert's representative neuron.

    Raises:
        ValueError: not square, ``num_experts`` not dividing ``d_ff``, or ``shared_experts`` out of range.

    Example:
        >>> m = torch.tensor([[1, 1, 0, 0, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 1, 1.0]])  # (tokens, d_ff)
        >>> labels, reps = carve_partition(m.T @ m, 3, 1)
        >>> labels.tolist(), sorted(reps.tolist())[0] in (2, 3)
        ([0, 0, 2, 2, 1, 1], True)
    """
    n = gram.shape[0]
    if gram.shape != (n, n):
        raise ValueError(f"carve_partition: expected a square matrix, got {tuple(gram.shape)}")
    m = _check_split(n, num_experts)
    if not 0 <= shared_experts < num_experts:
        raise ValueError(f"shared_experts: must be in [0, {num_experts - 1}], got {shared_experts}")
    g = gram.detach().double().cpu()
    counts = g.diagonal().clone()  # (d_ff,) tokens each neuron was active on (exact in float64)
    order = torch.sort(counts, descending=True, stable=True).indices
    shared, rest = order[: shared_experts * m], order[shared_experts * m :]
    routed = num_experts - shared_experts
    labels = torch.empty(n, dtype=torch.long)
    labels[shared] = torch.arange(shared.numel()) // m
    sub, norms = g[rest][:, rest].float(), counts[rest].float()  # (n_r, n_r), (n_r,): fast matmuls
    members = torch.arange(routed)[:, None]  # start: the most active remaining neurons (rest is sorted)
    assign: Tensor | None = None
    for _ in range(max(1, iters)):
        dist = _l1_to_centroids(sub, norms, members)  # (n_r, R)
        new = balanced_assign(dist, m)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        members = assign.argsort(stable=True).view(routed, m)  # (R, m) positions in rest
    final = cast(Tensor, assign)
    members = final.argsort(stable=True).view(routed, m)
    dist = _l1_to_centroids(sub, norms, members)  # (n_r, R)
    own = dist.gather(1, final[:, None]).squeeze(1)  # (n_r,) distance to the own centroid
    reps = torch.stack([members[e][own[members[e]].argmin()] for e in range(routed)])
    labels[rest] = shared_experts + final
    return labels, rest[reps]


def _l1_to_centroids(gram: Tensor, norms: Tensor, members: Tensor) -> Tensor:
    """``(n, R)`` L1 distance of every 0/1 marker vector to each cluster's mean marker vector, from the
    co-occurrence counts alone; ``members`` ``(R, size)`` indexes the clusters' rows."""
    routed, size_e = members.shape
    share = torch.zeros(gram.shape[0], routed, dtype=gram.dtype)  # (n, R): 1/size where i is in e
    share[members.reshape(-1), torch.arange(routed).repeat_interleave(size_e)] = 1.0 / size_e
    dot = gram @ share  # (n, R): x_i · c_e
    size = norms @ share  # (R,): |c_e|
    return norms[:, None] + size[None, :] - 2.0 * dot


# --------------------------------------------------------------------------- statistics


def expert_mass(h: Tensor, num_experts: int) -> Tensor:
    """Activation mass of every expert: ``Σ_{i in e} |h_i|`` with experts as contiguous slices.

    Args:
        h: ``(N, d_ff)`` intermediate activations (the input of the down projection).
        num_experts: ``E``.

    Returns:
        ``(N, E)`` float mass.
    """
    n, d_ff = h.shape
    return h.detach().abs().float().view(n, num_experts, d_ff // num_experts).sum(-1)


@torch.no_grad()
def activation_sparsity(h: Tensor, mass: float = 0.9) -> dict[str, float]:
    """How sparse the intermediate activations are.

    Args:
        h: ``(N, d_ff)`` intermediate activations.
        mass: share of the per-token L1 mass for ``mass_fraction``.

    Returns:
        ``zero_fraction``: share of exact zeros (ReLU: large; SiLU/GELU: about 0);
        ``mass_fraction``: mean over tokens of the smallest share of neurons holding ``mass`` of the
        token's L1 activation mass (threshold-free, comparable across activations; lower = sparser).

    Example:
        >>> activation_sparsity(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
        {'zero_fraction': 0.75, 'mass_fraction': 0.25}
    """
    a = h.detach().abs().float()
    ranked = a.sort(dim=1, descending=True).values.cumsum(1)  # (N, d_ff)
    total = ranked[:, -1:].clamp_min(1e-12)
    needed = (ranked < mass * total).sum(1) + 1  # neurons until the mass is reached
    return {
        "zero_fraction": float((a == 0).float().mean()),
        "mass_fraction": float((needed.float() / a.shape[1]).mean()),
    }


# --------------------------------------------------------------------------- routers


class MLPRouter(nn.Module):
    """``Linear(d, hidden) → ReLU → Linear(hidden, E)``: a score per expert (higher = more mass).

    Example:
        >>> MLPRouter(8, 4, hidden=16)(torch.randn(3, 8)).shape
        torch.Size([3, 4])
    """

    needs_activations = False

    def __init__(self, hidden_size: int, num_experts: int, hidden: int = 128) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.fc1 = nn.Linear(hidden_size, hidden)
        self.fc2 = nn.Linear(hidden, num_experts)

    def forward(self, x: Tensor) -> Tensor:  # (N, d) -> (N, E)
        return self.fc2(F.relu(self.fc1(x)))


class CentroidRouter(nn.Module):
    """Similarity to expert centroids: ``score_e = x · c_e`` with ``c_e`` a buffer ``(E, d)``.

    Example:
        >>> r = CentroidRouter(8, 4); r.centroids.shape
        torch.Size([4, 8])
    """

    needs_activations = False
    centroids: Tensor

    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.register_buffer("centroids", torch.zeros(num_experts, hidden_size))

    def forward(self, x: Tensor) -> Tensor:  # (N, d) -> (N, E)
        return x @ self.centroids.to(x.dtype).t()


class RepresentativeRouter(nn.Module):
    """CMoE's analytic router: expert ``e`` scores ``|act(ĝ_e · x̂) (û_e · x̂)|``, the activation of its
    representative neuron with the input and that neuron's gate / up rows L2-normalised.

    ``gate`` and ``up`` ``(E, d)`` are parameters (trainable with ``router_finetune``); they are set
    from the representatives by :func:`fit_representative_router`, with no training.

    Example:
        >>> r = RepresentativeRouter(8, 4); r(torch.randn(3, 8)).shape, r.gate.shape
        (torch.Size([3, 4]), torch.Size([4, 8]))
    """

    needs_activations = False

    def __init__(
        self, hidden_size: int, num_experts: int, activation: Callable[[Tensor], Tensor] = F.silu
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.act = activation
        self.gate = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.up = nn.Parameter(torch.zeros(num_experts, hidden_size))

    def forward(self, x: Tensor) -> Tensor:  # (N, d) -> (N, E)
        xn = F.normalize(x, dim=-1)
        return (self.act(xn @ self.gate.to(x.dtype).t()) * (xn @ self.up.to(x.dtype).t())).abs()


@torch.no_grad()
def fit_representative_router(router: RepresentativeRouter, gate_rows: Tensor, up_rows: Tensor) -> None:
    """Set the router's rows to the L2-normalised gate / up rows ``(E, d)`` of the experts'
    representative neurons (:func:`carve_partition`)."""
    router.gate.copy_(F.normalize(gate_rows.detach().float(), dim=1))
    router.up.copy_(F.normalize(up_rows.detach().float(), dim=1))


class OracleRouter(nn.Module):
    """Ground truth: scores are the experts' activation masses (:func:`expert_mass`); the MoE FFN
    computes the dense activations to get them, so it is for evaluation, never faster."""

    needs_activations = True

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts

    def forward(self, h: Tensor) -> Tensor:  # (N, d_ff) activations -> (N, E)
        return expert_mass(h, self.num_experts)


class RandomRouter(nn.Module):
    """Baseline: uniformly random scores per token (from the global torch RNG)."""

    needs_activations = False

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts

    def forward(self, x: Tensor) -> Tensor:  # (N, d) -> (N, E)
        return torch.rand(x.shape[0], self.num_experts, device=x.device)


def make_router(
    kind: str,
    hidden_size: int,
    num_experts: int,
    hidden: int = 128,
    activation: Callable[[Tensor], Tensor] = F.silu,
) -> nn.Module:
    """A fresh (untrained) router of ``kind`` (one of :data:`ROUTERS`); ``activation``: the FFN's, for
    the representative router.

    Raises:
        ValueError: unknown kind (lists the allowed ones).
    """
    if kind == "mlp":
        return MLPRouter(hidden_size, num_experts, hidden)
    if kind == "centroid":
        return CentroidRouter(hidden_size, num_experts)
    if kind == "oracle":
        return OracleRouter(num_experts)
    if kind == "random":
        return RandomRouter(num_experts)
    if kind == "representative":
        return RepresentativeRouter(hidden_size, num_experts, activation)
    raise ValueError(f"router: got {kind!r}, allowed: {', '.join(ROUTERS)}")


def router_kind(router: nn.Module) -> str:
    """The :data:`ROUTERS` name of a router module."""
    kinds = {
        MLPRouter: "mlp",
        CentroidRouter: "centroid",
        OracleRouter: "oracle",
        RandomRouter: "random",
        RepresentativeRouter: "representative",
    }
    return kinds[type(router)]


@torch.no_grad()
def fit_centroid_router(router: CentroidRouter, rows: Tensor) -> None:
    """Set each centroid to the mean input weight vector of its expert's neurons.

    Args:
        router: the router to fill.
        rows: ``(d_ff, d)`` activated-projection rows in expert order (contiguous experts).
    """
    d_ff, d = rows.shape
    router.centroids.copy_(
        rows.detach().float().view(router.num_experts, d_ff // router.num_experts, d).mean(1)
    )


def router_targets(mass: Tensor) -> Tensor:
    """Each expert's share of the token's activation mass: ``(N, E)`` rows summing to 1."""
    return mass / mass.sum(1, keepdim=True).clamp_min(1e-12)


def router_loss(scores: Tensor, mass: Tensor) -> Tensor:
    """Cross-entropy between ``softmax(scores)`` and the mass shares (what the MLP router learns)."""
    return -(router_targets(mass.float()) * F.log_softmax(scores.float(), dim=1)).sum(1).mean()


def train_mlp_router(
    router: MLPRouter,
    inputs: Tensor,
    mass: Tensor,
    steps: int = 200,
    lr: float = 1e-3,
    batch_size: int = 512,
    seed: int = 0,
) -> float:
    """Fit ``router`` to predict each expert's share of the activation mass from the FFN input.

    Adam on random mini-batches of the captured tokens; deterministic for a given ``seed``.

    Args:
        router: the router (trained in place, on the device of its parameters).
        inputs: ``(N, d)`` FFN inputs.
        mass: ``(N, E)`` expert activation masses (:func:`expert_mass`) for the same tokens.
        steps, lr, batch_size: optimisation settings.
        seed: seed of the mini-batch sampling.

    Returns:
        Mean loss over the last 10% of steps.

    Raises:
        ValueError: no tokens, or ``inputs`` and ``mass`` of different lengths.
    """
    if inputs.shape[0] == 0 or inputs.shape[0] != mass.shape[0]:
        raise ValueError(f"train_mlp_router: {inputs.shape[0]} inputs vs {mass.shape[0]} targets")
    params = list(router.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)  # also when the routers are not fine-tuned with the model
        device = params[0].device
        return _fit_router(
            router, inputs.to(device).float(), mass.to(device).float(), steps, lr, batch_size, seed
        )
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def _fit_router(
    router: MLPRouter, inputs: Tensor, mass: Tensor, steps: int, lr: float, batch_size: int, seed: int
) -> float:
    optimizer = torch.optim.Adam(router.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    tail: list[float] = []
    with torch.enable_grad():
        for step in range(steps):
            idx = torch.randint(inputs.shape[0], (min(batch_size, inputs.shape[0]),), generator=gen).to(
                inputs.device
            )
            loss = router_loss(router(inputs[idx].to(router.fc1.weight.dtype)), mass[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step >= steps - max(1, steps // 10):
                tail.append(loss.item())
    return sum(tail) / max(1, len(tail))


# --------------------------------------------------------------------------- the MoE FFN


def _rows(module: nn.Module) -> Tensor:
    """Weight as ``(out, in)`` (a view; GPT-2 ``Conv1D`` stores ``(in, out)``)."""
    weight = cast(Tensor, module.weight)
    return weight.t() if is_conv1d(module) else weight


def _neuron_dim(module: nn.Module, produces: bool) -> int:
    """Weight dimension indexed by the intermediate neurons."""
    if produces:  # gate/up/fc: neurons are outputs
        return 1 if is_conv1d(module) else 0
    return 0 if is_conv1d(module) else 1


class MoEFFN(nn.Module):
    """A dense FFN turned into ``num_experts`` equal experts with top-k routing.

    Holds the original projection modules under their original names (``gate_proj``, ``up_proj``,
    ``down_proj``; ``c_fc``, ``c_proj``; ...), so state-dict keys of the weights do not change, plus

    * ``perm``  (buffer, ``(d_ff,)`` long): original index of the neuron at each position (identity
      until :meth:`permute_`);
    * ``routed`` (buffer, bool): route (``True``) or behave exactly as the dense FFN (``False``);
    * ``relu`` (buffer, bool): use ReLU instead of the original activation (ReLU-fication);
    * ``router``: the router submodule (its parameters/buffers are part of the state dict), scoring
      the ``E - shared_experts`` routed experts.

    With ``shared_experts = S > 0`` (carved MoE, :func:`carve_partition`) the first ``S`` experts (neuron
    positions ``[0, S*m)``) are *shared*: every token computes them; the router picks ``top_k`` of the
    other ``E - S`` experts, so a token computes ``(S + top_k) / E`` of the FFN (:attr:`compute_fraction`).

    Args:
        inputs: name → module producing the neurons, the activated (gate) projection first.
        output: ``(name, module)`` of the projection reading the neurons.
        activation: the original activation callable.
        num_experts: ``E``; must divide the intermediate size.
        top_k: routed experts used per token, ``1 <= top_k <= E - shared_experts`` (changeable later:
            :func:`set_top_k`).
        router: from :func:`make_router`, over the ``E - shared_experts`` routed experts.
        gated: ``act(inputs[0](x)) * inputs[1](x)`` (SwiGLU) instead of ``act(inputs[0](x))``.
        dropout: applied to the output in training (the original FFN's dropout, if any).
        buckets: at most this many expert groups per sparse forward (experts sorted by load, each
            group padded to its largest load; two ``bmm`` per group).
        router_loss_weight: weight of the router-regression gradient while training routed
            (0: routers are not fine-tuned).
        shared_experts: ``S``, always-on experts, ``0 <= S < E``.

    Raises:
        ValueError: ``num_experts`` does not divide the intermediate size; ``top_k`` or
            ``shared_experts`` out of range; a router not over ``E - S`` experts; a gated FFN without
            two input projections.
    """

    perm: Tensor
    routed: Tensor
    relu: Tensor
    activation_name: str  # set by from_ffn

    def __init__(
        self,
        inputs: Mapping[str, nn.Module],
        output: tuple[str, nn.Module],
        activation: Callable[[Tensor], Tensor],
        num_experts: int,
        top_k: int,
        router: nn.Module,
        gated: bool,
        dropout: nn.Module | None = None,
        buckets: int = 16,
        router_loss_weight: float = 0.0,
        shared_experts: int = 0,
    ) -> None:
        super().__init__()
        names = list(inputs)
        if gated and len(names) != 2:
            raise ValueError(f"a gated FFN needs two input projections (gate, up), got {names}")
        for name, module in inputs.items():
            self.add_module(name, module)
        self.add_module(output[0], output[1])
        self.input_names, self.output_name = tuple(names[: 2 if gated else 1]), output[0]
        self.act_fn = activation
        self.gated, self.dropout, self.router = gated, dropout, router
        self.d_ff = int(_rows(inputs[names[0]]).shape[0])
        _check_split(self.d_ff, num_experts)
        self.num_experts, self.expert_size = num_experts, self.d_ff // num_experts
        if isinstance(shared_experts, bool) or not isinstance(shared_experts, int):
            raise ValueError(f"shared_experts: must be an integer, got {shared_experts!r}")
        if not 0 <= shared_experts < num_experts:
            raise ValueError(f"shared_experts: must be in [0, {num_experts - 1}], got {shared_experts}")
        self.shared_experts = shared_experts
        self.routed_experts = num_experts - shared_experts
        if getattr(router, "num_experts", self.routed_experts) != self.routed_experts:
            raise ValueError(
                f"router: scores {router.num_experts} experts, expected the {self.routed_experts} routed ones"
            )
        self.set_top_k(top_k)
        self.buckets, self.router_loss_weight = buckets, router_loss_weight
        self.register_buffer("perm", torch.arange(self.d_ff))
        self.register_buffer("routed", torch.tensor(False))
        self.register_buffer("relu", torch.tensor(False))
        self.load_counts = torch.zeros(self.routed_experts, dtype=torch.long)  # tokens per routed expert
        self.last_router_loss: float | None = None
        #: The router loss of the last training forward (with its graph), until :func:`router_aux_loss`
        #: takes it; overwritten by the next forward, so it never holds more than one graph.
        self.aux_loss: Tensor | None = None
        self._cache: tuple[tuple, dict[str, Tensor | None]] | None = None

    @classmethod
    def from_ffn(
        cls,
        ffn: nn.Module,
        inputs: Sequence[str],
        output: str,
        activation: str,
        gated: bool,
        num_experts: int,
        top_k: int,
        router: str = "mlp",
        router_hidden: int = 128,
        buckets: int = 16,
        router_loss_weight: float = 0.0,
        shared_experts: int = 0,
    ) -> MoEFFN:
        """Build the MoE FFN around the projections of a dense FFN module (which it replaces).

        Args:
            ffn: the dense FFN (``LlamaMLP``, ``GPT2MLP``, ...).
            inputs: attribute names of the neuron-producing projections, gate first.
            output: attribute name of the output projection.
            activation: attribute name of the activation callable.
            gated: SwiGLU-style ``act(gate) * up``.
            num_experts, top_k, buckets, router_loss_weight, shared_experts: as in :class:`MoEFFN`.
            router: one of :data:`ROUTERS`; ``router_hidden``: hidden width of the MLP router.

        Raises:
            ValueError: as :class:`MoEFFN`, or an unknown router.
        """
        ins = {name: ffn.get_submodule(name) for name in inputs}
        first = ins[inputs[0]]
        d_model = int(_rows(first).shape[1])
        weight = cast(Tensor, first.weight)
        act = getattr(ffn, activation)
        routed = num_experts - shared_experts
        made = make_router(router, d_model, routed, router_hidden, act).to(weight.device, weight.dtype)
        dropout = getattr(ffn, "dropout", None)
        moe = cls(
            ins,
            (output, ffn.get_submodule(output)),
            getattr(ffn, activation),
            num_experts,
            top_k,
            made,
            gated,
            dropout if isinstance(dropout, nn.Dropout) else None,
            buckets,
            router_loss_weight,
            shared_experts,
        )
        moe.activation_name = activation
        return moe.train(ffn.training)

    def spec(self) -> dict[str, Any]:
        """Primitive description to rebuild this module with :meth:`from_ffn` (used by the export)."""
        return {
            "inputs": list(self.input_names),
            "output": self.output_name,
            "activation": getattr(self, "activation_name", "act_fn"),
            "gated": self.gated,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "router": router_kind(self.router),
            "router_hidden": self.router.fc1.out_features if isinstance(self.router, MLPRouter) else None,
            "buckets": self.buckets,
            "d_ff": self.d_ff,
            "relu": bool(self.relu),
            "shared_experts": self.shared_experts,
        }

    # ------------------------------------------------------------------ configuration

    def set_top_k(self, top_k: int) -> None:
        """Use ``top_k`` routed experts per token.

        Raises:
            ValueError: not in ``[1, num_experts - shared_experts]``.
        """
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= self.routed_experts:
            raise ValueError(f"top_k must be an integer in [1, {self.routed_experts}], got {top_k!r}")
        self.top_k = top_k

    @property
    def compute_fraction(self) -> float:
        """Share of the FFN each token computes once routed: ``(shared_experts + top_k) / num_experts``."""
        return (self.shared_experts + self.top_k) / self.num_experts

    @property
    def shared_size(self) -> int:
        """Neurons of the shared experts (the first ``shared_experts * expert_size`` positions)."""
        return self.shared_experts * self.expert_size

    def set_routed(self, routed: bool) -> None:
        """Route (``True``) or compute the dense FFN (``False``)."""
        self.routed.fill_(bool(routed))

    def set_relu(self, relu: bool) -> None:
        """Use ReLU (``True``) or the original activation (``False``)."""
        self.relu.fill_(bool(relu))

    def gate_rows(self) -> Tensor:
        """The activated projection's weight as ``(d_ff, d)`` rows, in the current neuron order."""
        return _rows(getattr(self, self.input_names[0])).detach()

    def up_rows(self) -> Tensor:
        """The (gated FFN's) up projection's weight as ``(d_ff, d)`` rows, in the current neuron order.

        Raises:
            ValueError: the FFN is not gated.
        """
        if not self.gated:
            raise ValueError(
                "split: carve needs a gated FFN (act(gate(x)) * up(x)); this one has no up projection"
            )
        return _rows(getattr(self, self.input_names[1])).detach()

    @property
    def projections(self) -> list[nn.Module]:
        """The input projections (gate first) followed by the output projection."""
        return [getattr(self, n) for n in self.input_names] + [getattr(self, self.output_name)]

    def extra_repr(self) -> str:
        shared = f", shared={self.shared_experts}" if self.shared_experts else ""
        return (
            f"experts={self.num_experts}{shared}, top_k={self.top_k}, expert_size={self.expert_size}, "
            f"gated={self.gated}"
        )

    # ------------------------------------------------------------------ neuron permutation

    @torch.no_grad()
    def permute_(self, perm: Tensor, optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
        """Reorder the neurons in place: new neuron ``j`` is old neuron ``perm[j]``.

        Permutes the input projections' rows (weights, biases and any same-shaped buffer such as a
        mask) and the output projection's columns, plus same-shaped optimizer state (Adam moments),
        so the dense function and an ongoing optimisation are unchanged.
        """
        perm = perm.to(self.perm.device)
        for i, module in enumerate(self.projections):
            produces = i < len(self.input_names)
            dim = _neuron_dim(module, produces)
            for tensor, d in self._neuron_tensors(module, dim, produces):
                tensor.data.copy_(tensor.data.index_select(d, perm.to(tensor.device)))
                self._permute_state(tensor, d, perm, optimizers)
        self.perm.copy_(self.perm[perm])
        self._cache = None

    def _neuron_tensors(self, module: nn.Module, dim: int, produces: bool) -> list[tuple[Tensor, int]]:
        shape = module.weight.shape
        found = []
        for _name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if t is None:
                continue
            if t.shape == shape:
                found.append((t, dim))
            elif produces and t.ndim == 1 and t.shape[0] == self.d_ff:
                found.append((t, 0))  # per-neuron bias
        return found

    @staticmethod
    def _permute_state(
        tensor: Tensor, dim: int, perm: Tensor, optimizers: Iterable[torch.optim.Optimizer]
    ) -> None:
        for optimizer in optimizers:
            for value in optimizer.state.get(tensor, {}).values():
                if isinstance(value, Tensor) and value.shape == tensor.shape:
                    value.copy_(value.index_select(dim, perm.to(value.device)))

    # ------------------------------------------------------------------ forward

    def activation(self, x: Tensor) -> Tensor:
        """ReLU when ReLU-fied, else the original activation."""
        return F.relu(x) if bool(self.relu) else self.act_fn(x)

    def intermediate(self, x: Tensor) -> Tensor:
        """Dense intermediate activations ``h`` (the down projection's input), shape ``(..., d_ff)``."""
        first = getattr(self, self.input_names[0])(x)
        h = self.activation(first)
        return h * getattr(self, self.input_names[1])(x) if self.gated else h

    def forward(self, x: Tensor) -> Tensor:  # (B, T, d) -> (B, T, d)
        if not bool(self.routed):
            out = getattr(self, self.output_name)(self.intermediate(x))
            out = self._touch_router(x, out)
        elif (
            torch.is_grad_enabled()
            or getattr(self.router, "needs_activations", False)
            or not self._shared_input_quantization()
            or self._hooked()
        ):
            out = self._masked(x)
        else:
            out = self._sparse(x)
        return self.dropout(out) if self.dropout is not None and self.training else out

    def _hooked(self) -> bool:
        """Whether a projection carries forward hooks (e.g. structured-pruning gates on the down
        projection): the sparse path reads weights directly and would bypass them."""
        return any(m._forward_pre_hooks or m._forward_hooks for m in self.projections)

    def _shared_input_quantization(self) -> bool:
        """Whether the input projections quantize their (common) input alike, so one fused sparse
        matmul serves them all (true unless static scales were calibrated differently)."""
        specs = [input_quantization(getattr(self, n)) for n in self.input_names]
        return all(_same_quantization(specs[0], other) for other in specs[1:])

    def _trainable_router(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.router.parameters())

    def _touch_router(self, x: Tensor, out: Tensor) -> Tensor:
        """Before routing, give trainable router parameters a zero loss under DDP (all used)."""
        if self.training and self._trainable_router() and torch.distributed.is_initialized():
            self.aux_loss = self.router(x.reshape(-1, x.shape[-1])).sum() * 0.0
        return out

    def _select(self, scores: Tensor) -> Tensor:
        top = scores.topk(self.top_k, dim=1).indices  # (N, k)
        self.load_counts += torch.bincount(top.reshape(-1).cpu(), minlength=self.routed_experts)
        return top

    def _masked(self, x: Tensor) -> Tensor:
        """Routed, dense computation with unselected experts zeroed (training, oracle)."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, d)
        h = self.intermediate(x2)  # (N, d_ff)
        routed_h = h[:, self.shared_size :]  # (N, d_ff - S*m): the routed experts' neurons
        needs_h = getattr(self.router, "needs_activations", False)
        scores = self.router(routed_h.detach() if needs_h else x2)  # (N, E - S)
        top = self._select(scores)
        mask = torch.zeros_like(scores, dtype=h.dtype).scatter_(1, top, 1.0)  # (N, E - S)
        if self.shared_experts:  # shared experts: always on
            mask = torch.cat([mask.new_ones(mask.shape[0], self.shared_experts), mask], dim=1)  # (N, E)
        masked = (h.view(-1, self.num_experts, self.expert_size) * mask[:, :, None]).view(h.shape)
        out = getattr(self, self.output_name)(masked)
        if self.training and self.router_loss_weight > 0 and self._trainable_router() and not needs_h:
            loss = self.router_loss_weight * router_loss(scores, expert_mass(routed_h, self.routed_experts))
            self.last_router_loss = float(loss.detach())
            self.aux_loss = loss
        return out.view(*shape[:-1], out.shape[-1])

    # ------------------------------------------------------------------ sparse inference

    def _weight_key(self) -> tuple:
        tensors = [t for m in self.projections for t in [*m.parameters(), *m.buffers()]]
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)

    @torch.no_grad()
    def expert_weights(self, dtype: torch.dtype | None = None) -> dict[str, Tensor | None]:
        """Expert-major copies of the weights, cached until a weight changes (in place or replaced).
        Quantized projections contribute the weights they compute with
        (:func:`~lightcook.ops.quant.effective_weight`), so the sparse path keeps their quantization;
        ``dtype``: the compute dtype (integer layers dequantize to float32 otherwise).

        Returns:
            ``in`` ``(E', j*m, d)``: each routed expert's activated-projection rows followed (gated,
            ``j = 2``) by its up-projection rows (``E' = E - shared_experts``); ``in_bias`` ``(E', j*m)``
            or ``None``; ``down`` ``(E', m, d_out)``; ``down_bias`` ``(d_out,)`` or ``None``; and for the
            shared experts (``s = shared_experts * m`` neurons; ``None`` without them) ``shared_in``
            ``(j*s, d)`` (all their activated rows, then all their up rows), ``shared_in_bias``
            ``(j*s,)`` or ``None``, ``shared_down`` ``(s, d_out)``.
        """
        key = (*self._weight_key(), dtype)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        num, m, s = self.routed_experts, self.expert_size, self.shared_size
        ins = [getattr(self, n) for n in self.input_names]
        out = getattr(self, self.output_name)
        in_w = [effective_weight(p) for p in ins]  # each (d_ff, d)
        down_w = effective_weight(out).t()  # (d_ff, d_out)
        biases = [getattr(p, "bias", None) for p in ins]
        in_b = None if biases[0] is None else [b.detach() for b in cast("list[Tensor]", biases)]
        weights: dict[str, Tensor | None] = {
            "in": torch.cat([w[s:].reshape(num, m, -1) for w in in_w], dim=1).contiguous(),
            "in_bias": None
            if in_b is None
            else torch.cat([b[s:].reshape(num, m) for b in in_b], 1).contiguous(),
            "down": down_w[s:].reshape(num, m, -1).contiguous(),
            "down_bias": None if getattr(out, "bias", None) is None else out.bias.detach(),
            "shared_in": torch.cat([w[:s] for w in in_w]).contiguous() if s else None,
            "shared_in_bias": torch.cat([b[:s] for b in in_b]).contiguous()
            if s and in_b is not None
            else None,
            "shared_down": down_w[:s].contiguous() if s else None,
        }
        if dtype is not None:
            weights = {k: None if v is None else v.to(dtype) for k, v in weights.items()}
        self._cache = (key, weights)
        return weights

    def _sparse(self, x: Tensor) -> Tensor:
        """Real conditional computation: each token meets only its top-k experts' weights.

        Tokens are grouped by expert into a padded workspace (experts sorted by load and cut into
        at most ``buckets`` groups, each padded to its own largest load); per group, one batched
        matmul computes gate and up of all its experts and one computes their down projection; every
        token then sums its k expert outputs (``embedding_bag``). Few, large kernels: the work per
        call stays large, which matters on busy CPUs.
        """
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, d)
        n, k = x2.shape[0], self.top_k
        top = self._select(self.router(x2))  # (N, k) routed experts
        if n == 1 and input_quantization(getattr(self, self.output_name)) is None:
            return self._one_token(x2, top[0]).view(*shape[:-1], -1)  # decode: no routing plan
        rows, sources, order, blocks = _route_plan(top, self.routed_experts, self.buckets)
        w = self.expert_weights(x2.dtype)
        whole = bool(torch.equal(order, torch.arange(self.routed_experts)))
        w_in, w_down = cast(Tensor, w["in"]), cast(Tensor, w["down"])  # never None
        w_in, w_down = (w_in, w_down) if whole else (_take(w_in, order), _take(w_down, order))
        xq = fake_quant_input(x2, input_quantization(getattr(self, self.input_names[0])))
        xs = _workspace("xs", (sources.numel(), x2.shape[1]), x2)
        torch.index_select(xq, 0, sources, out=xs)  # (R, d): tokens grouped by expert, padded
        h = _workspace("h", (sources.numel(), w_in.shape[1]), x2)  # (R, j*m)
        for first, count, cap, start in blocks:
            end = start + count * cap
            hb = h[start:end].view(count, cap, -1)
            torch.bmm(xs[start:end].view(count, cap, -1), w_in[first : first + count].transpose(1, 2), out=hb)
            if (in_bias := w["in_bias"]) is not None:
                hb += in_bias[order[first : first + count].to(x.device)][:, None, :]
        act = self._gated_activation(h)  # (R, m)
        shared = self._shared_activation(xq, w)  # (N, s) or None
        act, shared = self._quantize_down_input(
            act, rows.view(n, k), input_quantization(getattr(self, self.output_name)), shared
        )
        ys = _workspace("ys", (sources.numel(), w_down.shape[2]), x2)  # (R, d_out)
        for first, count, cap, start in blocks:
            end = start + count * cap
            torch.bmm(
                act[start:end].view(count, cap, -1),
                w_down[first : first + count],
                out=ys[start:end].view(count, cap, -1),
            )
        out = F.embedding_bag(rows.view(n, k), ys, mode="sum")  # (N, d_out): Σ_k of each token's rows
        if shared is not None:  # the shared experts, computed by every token
            out.addmm_(shared, cast(Tensor, w["shared_down"]))
        if w["down_bias"] is not None:
            out += w["down_bias"]
        return out.view(*shape[:-1], out.shape[-1])

    def _one_token(self, x: Tensor, experts: Tensor) -> Tensor:
        """One token (batch-1 decode): its shared experts, then each chosen expert's two matmuls on
        views of the expert-major weights (no copies, no routing plan). ``x`` ``(1, d)`` -> ``(1, d_out)``."""
        w = self.expert_weights(x.dtype)
        xq = fake_quant_input(x, input_quantization(getattr(self, self.input_names[0])))
        w_in, w_down, in_bias = cast(Tensor, w["in"]), cast(Tensor, w["down"]), w["in_bias"]
        shared = self._shared_activation(xq, w)
        out = xq.new_zeros(1, w_down.shape[2]) if shared is None else shared @ cast(Tensor, w["shared_down"])
        for e in experts.tolist():
            h = xq @ w_in[e].t()  # (1, j*m)
            if in_bias is not None:
                h += in_bias[e]
            out.addmm_(self._gated_activation(h), w_down[e])
        if w["down_bias"] is not None:
            out += w["down_bias"]
        return out

    def _shared_activation(self, xq: Tensor, w: Mapping[str, Tensor | None]) -> Tensor | None:
        """``act(gate) * up`` (or ``act(fc)``) of the shared experts' neurons for every token, ``(N, s)``."""
        shared_in = w["shared_in"]
        if shared_in is None:
            return None
        h = xq @ shared_in.t()  # (N, j*s)
        if (bias := w["shared_in_bias"]) is not None:
            h += bias
        if not self.gated:
            return self._activate_(h)
        s = self.shared_size
        act = self._activate_(h[:, :s])
        return act.mul_(h[:, s:]) if act.data_ptr() == h.data_ptr() else act * h[:, s:]

    @staticmethod
    def _quantize_down_input(
        act: Tensor, token_rows: Tensor, quantization: tuple | None, shared: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Fake-quantize the down projection's input rows as the dense layer would: per token over
        its whole (mostly zero) intermediate vector, i.e. over that token's ``k`` expert rows and its
        shared-expert activations ``shared`` ``(N, s)``; returns both."""
        if quantization is None or quantization[0] != "dynamic":
            return fake_quant_input(act, quantization), (
                None if shared is None else fake_quant_input(shared, quantization)
            )
        bits = quantization[1]
        qmax = 2 ** (bits - 1) - 1
        compute = act if act.dtype in (torch.float32, torch.float64) else act.float()
        token_max = compute.abs().amax(1)[token_rows].amax(1)  # (N,): max over the token's k rows
        if shared is not None:
            token_max = torch.maximum(token_max, shared.abs().amax(1).to(token_max.dtype))
        row_max = torch.zeros(compute.shape[0], dtype=compute.dtype, device=compute.device)
        row_max[token_rows.reshape(-1)] = token_max.repeat_interleave(token_rows.shape[1])
        tiny = torch.finfo(compute.dtype).tiny
        scale = (row_max / qmax).clamp_min(tiny)[:, None]
        quantized = fake_quant(compute, scale, 0.0, -qmax, qmax).to(act.dtype)
        if shared is None:
            return quantized, None
        shared_c = shared.to(compute.dtype)
        token_scale = (token_max / qmax).clamp_min(tiny)[:, None]
        return quantized, fake_quant(shared_c, token_scale, 0.0, -qmax, qmax).to(shared.dtype)

    def _gated_activation(self, h: Tensor) -> Tensor:
        """``act(gate) * up`` (gated) or ``act(h)`` on the workspace rows ``h`` ``(R, j*m)``, in place
        where possible; returns ``(R, m)`` (a strided view of ``h`` when gated)."""
        if not self.gated:
            return self._activate_(h)
        m = self.expert_size
        gate, up = h.view(h.shape[0], 2, m).unbind(1)  # each (R, m), row stride 2m
        act = self._activate_(gate)
        return act.mul_(up) if act.data_ptr() == gate.data_ptr() else act * up

    def _activate_(self, h: Tensor) -> Tensor:
        if bool(self.relu):
            return h.relu_()
        if type(self.act_fn).__name__ in _SILU:
            return F.silu(h, inplace=True)
        return self.act_fn(h)


def _same_quantization(a: tuple | None, b: tuple | None) -> bool:
    if a is None or b is None:
        return a is b
    return (
        a[:2] == b[:2]
        and (a[2] is None) == (b[2] is None)
        and (a[2] is None or bool(torch.equal(a[2], b[2])))
    )


def _take(weights: Tensor, experts: Tensor) -> Tensor:
    """``weights[experts]`` (advanced indexing: one parallel region, unlike ``index_select``)."""
    return weights[experts.to(weights.device)]


_SILU = ("SiLU", "SiLUActivation")  # torch's and Hugging Face's SiLU modules (in-place capable)
_WORKSPACES: dict[tuple, Tensor] = {}


def _workspace(name: str, shape: Sequence[int], like: Tensor) -> Tensor:
    """A reusable scratch tensor (grown on demand, shared by all MoE layers, which run one after
    another): fresh large allocations cost page faults that rival the matmuls on CPU."""
    key = (name, like.device, like.dtype, torch.is_inference_mode_enabled())
    numel = math.prod(shape)
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, device=like.device, dtype=like.dtype)
        _WORKSPACES[key] = buf
    return buf[:numel].view(*shape)


def release_workspaces() -> None:
    """Free the scratch memory of the sparse MoE forward."""
    _WORKSPACES.clear()


def _route_plan(
    top: Tensor, num_experts: int, buckets: int
) -> tuple[Tensor, Tensor, Tensor, list[tuple[int, int, int, int]]]:
    """Where every (token, choice) goes in the padded, expert-grouped workspace.

    Experts with tokens are sorted by load (descending) and cut into at most ``buckets`` consecutive
    groups (:func:`_cut_groups`); inside a group they are in index order. Group ``g`` is a block
    ``(first, count, capacity, start)``: experts ``order[first : first + count]``, each given
    ``capacity`` rows (the largest load in the group) from workspace row ``start`` on.

    Returns:
        ``rows`` ``(N*k,)`` workspace row of each (token, choice) in token order; ``sources``
        ``(R,)`` token of each workspace row (padding rows read token 0; their results are never
        used); ``order`` ``(E',)`` the experts with tokens, group after group; the blocks.
    """
    n, k = top.shape
    flat = top.reshape(-1).cpu()  # (N*k,)
    counts = torch.bincount(flat, minlength=num_experts)  # (E,)
    by_load = counts.argsort(descending=True, stable=True)
    by_load = by_load[counts[by_load] > 0]
    base = torch.zeros(num_experts, dtype=torch.long)
    pieces, blocks, start = [], [], 0
    for lo, hi in _cut_groups(counts[by_load].tolist(), buckets):
        experts, cap = by_load[lo:hi].sort().values, int(counts[by_load[lo]])
        pieces.append(experts)
        blocks.append((lo, hi - lo, cap, start))
        base[experts] = start + torch.arange(hi - lo) * cap
        start += (hi - lo) * cap
    sort = flat.argsort(stable=True)
    position = torch.empty_like(flat)
    position[sort] = torch.arange(flat.numel()) - (counts.cumsum(0) - counts)[flat[sort]]
    rows = base[flat] + position  # (N*k,)
    sources = torch.zeros(start, dtype=torch.long)
    sources[rows] = torch.arange(n * k) // k
    order = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    return rows.to(top.device), sources.to(top.device), order, blocks


def _cut_groups(loads: list[int], groups: int) -> list[tuple[int, int]]:
    """Cut descending ``loads`` into at most ``groups`` consecutive ranges minimising the padded size
    ``Σ len(range) * max(range)`` (dynamic programming, O(groups · E²) in numpy).

    Example:
        >>> _cut_groups([9, 8, 2, 1], 2)
        [(0, 2), (2, 4)]
    """
    num = len(loads)
    if num == 0:
        return []
    c = np.asarray(loads, dtype=np.float64)
    i, j = np.arange(num + 1)[:, None], np.arange(num + 1)[None, :]
    cost = np.where(j > i, (j - i) * np.append(c, 0.0)[i], np.inf)  # (E+1, E+1): range [i, j)
    best = np.full(num + 1, np.inf)
    best[0] = 0.0
    back = []
    for _ in range(max(1, groups)):
        total = best[:, None] + cost  # (E+1, E+1)
        arg = total.argmin(0)
        new = total[arg, np.arange(num + 1)]
        keep = best <= new
        back.append(np.where(keep, -1, arg))
        best = np.where(keep, best, new)
    cuts, end = [], num
    for step in reversed(back):
        if end == 0:
            break
        if step[end] >= 0:
            cuts.append((int(step[end]), end))
            end = int(step[end])
    return cuts[::-1]


# --------------------------------------------------------------------------- model-level helpers


def moe_modules(model: nn.Module) -> dict[str, MoEFFN]:
    """Every :class:`MoEFFN` of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoEFFN)}


def set_top_k(model: nn.Module, top_k: int | float) -> None:
    """Set every MoE FFN of ``model`` to ``top_k`` routed experts (an int, or a fraction in (0, 1] of
    its ``E - shared_experts`` routed experts).

    Raises:
        ValueError: the resulting ``top_k`` is out of range for a layer.
    """
    for module in moe_modules(model).values():
        k = top_k if isinstance(top_k, int) else max(1, round(top_k * module.routed_experts))
        module.set_top_k(k)


def reset_load(modules: Sequence[MoEFFN] | Iterable[MoEFFN]) -> None:
    """Zero the per-expert token counters."""
    for module in modules:
        module.load_counts.zero_()


def router_aux_loss(modules: Iterable[MoEFFN]) -> Tensor | None:
    """The sum of the router losses the MoE FFNs recorded in their last training forward (``None``
    when none did), each taken once: add it to the training loss so the MLP routers keep learning.

    Example:
        >>> moe = MoEFFN({"fc": nn.Linear(4, 8)}, ("proj", nn.Linear(8, 4)), nn.ReLU(), num_experts=2,
        ...              top_k=1, router=MLPRouter(4, 2, 8), gated=False, router_loss_weight=1.0)
        >>> moe.set_routed(True)
        >>> _ = moe.train()(torch.randn(3, 4))
        >>> loss = router_aux_loss([moe])
        >>> loss.requires_grad, router_aux_loss([moe]) is None
        (True, True)
    """
    losses = []
    for module in modules:
        if module.aux_loss is not None:
            losses.append(module.aux_loss)
            module.aux_loss = None
    return torch.stack([loss.float() for loss in losses]).sum() if losses else None


# --------------------------------------------------------------------------- configuration and transforms


@dataclass(frozen=True)
class MoEConfig(TechniqueConfig):
    """MoEfication settings: split each dense FFN into ``num_experts`` equal experts and compute only
    the ``top_k`` a router picks per token. Each field: default, meaning, allowed values.

    The share of each FFN a token computes is ``(shared_experts + top_k) / num_experts``
    (:attr:`ffn_param_fraction`): e.g. 32 experts, 4 shared, top 4 routed → 8/32 = 25%.

    Raises:
        ValueError: a field outside its allowed values, ``<field>: ...`` (the callback prefixes
            ``compress.moe.``), e.g. ``top_k > num_experts``, ``shared_experts >= num_experts``,
            ``shared_experts`` without ``split: carve``, ``router: representative`` without it.

    Example:
        >>> MoEConfig(num_experts=16, top_k=4).ffn_param_fraction
        0.25
        >>> MoEConfig(num_experts=32, top_k=4, split="carve", shared_experts=4, router="representative").ffn_param_fraction
        0.25
        >>> MoEConfig(num_experts=8, top_k=9)
        Traceback (most recent call last):
        ...
        ValueError: top_k: must be <= num_experts (8), got 9
    """

    SHAPE_FIELDS = ("num_experts", "top_k", "router", "router_hidden", "architecture", "shared_experts")

    #: 32 — experts per FFN, shared plus routed (integer >= 1); must divide every FFN's intermediate size.
    num_experts: int = 32
    #: 8 — routed experts per token, ``1 <= top_k <= num_experts - shared_experts``; a token computes
    #: ``(shared_experts + top_k) / num_experts`` of the FFN.
    top_k: int = 8
    #: ``"coactivation"`` — the partition: ``kmeans`` (balanced k-means over the neurons' normalised
    #: activated-projection rows), ``coactivation`` (balanced partition of the co-activation graph of the
    #: captured activations), ``random`` (baseline) or ``carve`` (CMoE, gated FFNs only: the most often
    #: active neurons become ``shared_experts`` always-on experts, the rest are grouped by co-activation
    #: into balanced routed experts; see :func:`carve_partition`).
    split: str = "coactivation"
    #: 0 — always-on experts, computed by every token (integer, ``0 <= shared_experts < num_experts``);
    #: only with ``split: carve`` (the other splits have no notion of an always-on neuron).
    shared_experts: int = 0
    #: 0.25 — with ``split: carve``: a neuron is *active* for a token when it is among the token's
    #: ``active_fraction * d_ff`` neurons of largest ``|h|`` (in (0, 1]); activation rates and
    #: co-activation are counted on these markers.
    active_fraction: float = 0.25
    #: ``"mlp"`` — the router: ``mlp`` (trained to predict each expert's activation-mass share),
    #: ``centroid`` (similarity to each expert's mean activated-projection row), ``representative``
    #: (CMoE, ``split: carve`` only: ``|act(gate·x) up·x|`` of each expert's representative neuron,
    #: built from the weights with no training), ``oracle`` (the experts with the largest activation
    #: mass: evaluation only, computes the dense FFN) or ``random``.
    router: str = "mlp"
    #: 128 — hidden width of the MLP router (integer >= 1).
    router_hidden: int = 128
    #: 200 — Adam steps fitting each MLP router on the captured tokens (integer >= 0).
    router_steps: int = 200
    #: 1e-3 — learning rate of that fit (> 0).
    router_lr: float = 1e-3
    #: 512 — tokens per router fitting step (integer >= 1).
    router_batch_size: int = 512
    #: True — keep training the MLP routers with the model: their parameters join the module's
    #: optimizer and the router loss is added to the training loss (the logged loss includes it).
    router_finetune: bool = True
    #: 1.0 — weight of that router loss (>= 0).
    router_loss_weight: float = 1.0
    #: 8 — training batches captured (forward hooks) for the split and the routers (integer >= 1).
    calibration_batches: int = 8
    #: 20 — maximum balanced k-means iterations (integer >= 1).
    kmeans_iters: int = 20
    #: 0 — optimizer step of the split (with ``relufy``: after this many steps of dense ReLU
    #: fine-tuning); integer >= 0.
    split_step: int = 0
    #: False — replace the FFN activation (SiLU/GELU) by ReLU at the start of training, so the
    #: activations become sparse enough to route (ReLU-fication).
    relufy: bool = False
    #: 16 — at most this many expert groups per sparse forward (each a padded ``bmm``); integer >= 1.
    buckets: int = 16
    #: None — the layout: ``None`` (by ``config.model_type``), a registered name, or a mapping (see
    #: :func:`~lightcook.ops.architectures.architecture_from_dict`) saying where the FFNs are.
    architecture: str | Mapping[str, Any] | None = None
    #: True — write the expert-load heatmap PNG into the run directory.
    plot: bool = True
    #: 0 — seed of the k-means initialisation, random split and router mini-batches (integer >= 0).
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("split", self.split, PARTITIONS)
        check_choice("router", self.router, ROUTERS)
        for field in ("router_finetune", "relufy", "plot"):
            check_choice(field, getattr(self, field), (True, False))
        positive = ("num_experts", "top_k", "router_hidden", "router_batch_size", "calibration_batches")
        for field in (*positive, "kmeans_iters", "buckets"):
            check_int(field, getattr(self, field), 1)
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k: must be <= num_experts ({self.num_experts}), got {self.top_k}")
        check_int("shared_experts", self.shared_experts, 0)
        if self.shared_experts >= self.num_experts:
            raise ValueError(
                f"shared_experts: must be < num_experts ({self.num_experts}), got {self.shared_experts}"
            )
        if self.shared_experts and self.split != "carve":
            raise ValueError(
                f"shared_experts: always-on experts need split=carve (got split={self.split!r}); set "
                "shared_experts: 0 or split: carve"
            )
        if self.top_k > self.num_experts - self.shared_experts:
            raise ValueError(
                f"top_k: must be <= num_experts - shared_experts ({self.num_experts - self.shared_experts} "
                f"routed experts), got {self.top_k}"
            )
        if self.router == "representative" and self.split != "carve":
            raise ValueError(
                f"router: representative needs split=carve (its representative neurons), got split={self.split!r}"
            )
        check_number("active_fraction", self.active_fraction, 0, 1, open_low=True)
        for field in ("router_steps", "split_step", "seed"):
            check_int(field, getattr(self, field), 0)
        check_number("router_lr", self.router_lr, 0, open_low=True)
        check_number("router_loss_weight", self.router_loss_weight, 0)
        check_architecture_arg(self.architecture, "architecture")

    @property
    def ffn_param_fraction(self) -> float:
        """Share of the FFN expert weights each token uses, shared plus routed:
        ``(shared_experts + top_k) / num_experts``."""
        return (self.shared_experts + self.top_k) / self.num_experts


def prepare_(network: nn.Module, config: MoEConfig, *, where: str = "") -> dict[str, MoEFFN]:
    """Replace every FFN of ``network`` by a :class:`MoEFFN` (all checked first, then swapped), in place.

    Each MoE FFN reuses the FFN's projection modules under their names; its partition, router and
    flags start as identity / untrained / off, so until :func:`split_` the network computes exactly
    the dense function. An FFN already split with the same settings is kept (a network prepared
    twice).

    Args:
        network: a Hugging Face model (or one following a layout of :mod:`lightcook.ops.architectures`).
        config: the settings.
        where: context appended to layout errors (where the network was found, how to point elsewhere).

    Returns:
        The MoE FFNs by qualified name.

    Raises:
        ValueError: no recognisable FFN, ``num_experts`` not dividing an intermediate size, ``split:
            carve`` on an FFN without a gate projection, or an FFN already split with other settings
            (messages start with the field).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> net = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
        >>> moes = prepare_(net, MoEConfig(num_experts=8, top_k=2))
        >>> sorted(moes), moes["model.layers.0.mlp"].expert_size
        (['model.layers.0.mlp', 'model.layers.1.mlp'], 8)
    """
    _arch, blocks = find_blocks(network, config.architecture, kind=FFN, where=where)
    for block in blocks:
        _check_block(block, config)
    return {block.name: _install(network, block, config) for block in blocks}


def _check_block(block: Block, config: MoEConfig) -> None:
    module = block.module
    if isinstance(module, MoEFFN):
        mine = (config.num_experts, config.top_k, config.shared_experts)
        if (module.num_experts, module.top_k, module.shared_experts) != mine:
            raise ValueError(
                f"num_experts: {block.name} is already split into {module.num_experts} experts "
                f"({module.shared_experts} shared, top {module.top_k}) by another MoEfication"
            )
        return
    if config.split == "carve" and not cast(FFNLayout, block.layout).gated:
        raise ValueError(
            f"split: carve needs a gated FFN (down(act(gate(x)) * up(x)), e.g. Llama's SwiGLU); "
            f"{block.name} has no gate projection ({type(module).__name__}); use split=coactivation or kmeans"
        )
    if block.units % config.num_experts:
        divisors = [d for d in range(1, block.units + 1) if block.units % d == 0 and d <= 256]
        raise ValueError(
            f"num_experts: {config.num_experts} does not divide the intermediate size {block.units} of "
            f"{block.name}; allowed: a divisor such as {divisors[-8:]}"
        )


def _install(network: nn.Module, block: Block, config: MoEConfig) -> MoEFFN:
    if isinstance(block.module, MoEFFN):
        return block.module  # the same network prepared again (e.g. a second Trainer)
    layout = cast(FFNLayout, block.layout)  # FFN blocks only
    moe = MoEFFN.from_ffn(
        block.module,
        layout.inputs,
        layout.output,
        layout.activation,
        layout.gated,
        config.num_experts,
        config.top_k,
        config.router,
        config.router_hidden,
        config.buckets,
        config.router_loss_weight if config.router_finetune else 0.0,
        config.shared_experts,
    )
    for param in moe.router.parameters():
        param.requires_grad_(config.router_finetune)
        param._no_weight_decay = True  # type: ignore[attr-defined]
    parent, _, child = block.name.rpartition(".")
    setattr(network.get_submodule(parent) if parent else network, child, moe)
    return moe


#: ``collect(layer_index, x (N, d), h (N, d_ff))``: what :func:`capture_activations` calls per MoE FFN.
Collect = Callable[[int, Tensor, Tensor], None]


@torch.no_grad()
def capture_activations(
    network: nn.Module,
    moes: Mapping[str, MoEFFN] | Sequence[MoEFFN],
    batches: Iterable[Any],
    collect: Collect,
) -> int:
    """Run ``batches`` through ``network`` (eval mode, no gradients) and call ``collect(i, x, h)`` for
    the ``i``-th MoE FFN with its input ``x`` and intermediate activations ``h`` (padding tokens
    dropped). Returns the number of tokens seen.

    Raises:
        ValueError: no batch (``calibration_batches: ...``).
    """
    modules = list(moes.values()) if isinstance(moes, Mapping) else list(moes)
    seen, mask_box = 0, cast("list[Tensor | None]", [None])
    handles = _capture_hooks(modules, collect, mask_box)
    flags = [(m, m.training) for m in network.modules()]
    network.eval()
    try:
        for batch in batches:
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            mask_box[0] = None if mask is None else mask.reshape(-1).bool()
            network(**batch) if isinstance(batch, Mapping) else network(batch)
            seen += int(cast(Tensor, mask_box[0]).sum()) if mask is not None else int(_ids(batch).numel())
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags:
            module.training = flag
    if seen == 0:
        raise ValueError("calibration_batches: no training batch to calibrate on")
    return seen


def _ids(batch: Any) -> Tensor:
    return batch["input_ids"] if isinstance(batch, Mapping) else batch


def _capture_hooks(modules: list[MoEFFN], collect: Collect, mask_box: list) -> list[Any]:
    """Forward pre-hooks: each MoE FFN's input ``x``, then its output projection's input ``h``."""
    inputs: dict[int, Tensor] = {}
    handles = []
    for i, moe in enumerate(modules):
        keep_x = lambda _m, args, i=i: inputs.__setitem__(i, args[0])  # noqa: E731
        use_h = lambda _m, args, i=i: _collect(collect, i, inputs.pop(i), args[0], mask_box[0])  # noqa: E731
        handles.append(moe.register_forward_pre_hook(keep_x))
        handles.append(moe.get_submodule(moe.output_name).register_forward_pre_hook(use_h))
    return handles


def _collect(collect: Collect, index: int, x: Tensor, h: Tensor, mask: Tensor | None) -> None:
    x, h = x.reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1])  # (N, d), (N, d_ff)
    if mask is not None and mask.numel() == x.shape[0]:
        x, h = x[mask], h[mask]
    collect(index, x, h)


def measure_sparsity(
    network: nn.Module, moes: Mapping[str, MoEFFN], batches: Iterable[Any]
) -> dict[str, float]:
    """Token-weighted mean of :func:`activation_sparsity` over every MoE FFN and the batches.

    Raises:
        ValueError: no batch.
    """
    sums = {"zero_fraction": 0.0, "mass_fraction": 0.0}

    def collect(_i: int, x: Tensor, h: Tensor) -> None:
        for key, value in activation_sparsity(h).items():
            sums[key] += value * x.shape[0]

    tokens = capture_activations(network, moes, batches, collect)
    return {k: round(v / (tokens * len(moes)), 6) for k, v in sums.items()}


#: Broadcast from rank 0 under DDP: takes a list of (CPU) objects, returns rank 0's.
Sync = Callable[[list[Any]], list[Any]]


def split_(
    network: nn.Module,
    moes: Mapping[str, MoEFFN],
    config: MoEConfig,
    batches: Sequence[Any],
    *,
    optimizers: Iterable[torch.optim.Optimizer] = (),
    sync: Sync | None = None,
) -> dict[str, Any]:
    """Partition every MoE FFN, permute its neurons, fit the routers and turn routing on, in place.

    Args:
        network: the network :func:`prepare_` MoEfied.
        moes: what :func:`prepare_` returned.
        config: the settings (split, router fit, seed).
        batches: calibration batches (dicts of model inputs) on the network's device; read more than once.
        optimizers: their moments of the permuted weights are permuted too; their router moments dropped.
        sync: under DDP, a broadcast from rank 0 (partitions and routers then agree on every rank).

    Returns:
        ``calibration_tokens``, ``sparsity`` (activation sparsity at the split) and ``router_fit_loss``
        (mean final MLP router loss, ``None`` for other routers).

    Raises:
        ValueError: no calibration batch.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> net = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)).eval()
        >>> config = MoEConfig(num_experts=8, top_k=8, router="centroid", split="kmeans")
        >>> ids = torch.randint(0, 64, (2, 8))
        >>> with torch.no_grad():
        ...     dense = net(ids).logits
        >>> moes = prepare_(net, config)
        >>> split_(net, moes, config, [{"input_ids": ids}])["calibration_tokens"]
        16
        >>> with torch.no_grad():  # top_k = num_experts: the dense function, now routed
        ...     torch.allclose(net(ids).logits, dense, atol=1e-5), bool(moes["model.layers.0.mlp"].routed)
        (True, True)
    """
    optimizers = list(optimizers)
    labels, reps, measured = _partitions(network, moes, config, batches)
    perms = [partition_permutation(lab, config.num_experts) for lab in labels]
    if sync is not None:
        perms = [p.to(torch.long) for p in sync([p.cpu() for p in perms])]
    for moe, perm in zip(moes.values(), perms):
        moe.permute_(perm, optimizers)
    if reps is not None:  # representative routers: each expert's representative neuron, after the permutation
        for moe, perm, rep in zip(moes.values(), perms, reps):
            if isinstance(moe.router, RepresentativeRouter):
                where = perm.argsort()[rep]  # new positions of the representatives
                fit_representative_router(moe.router, moe.gate_rows()[where], moe.up_rows()[where])
    sparsity, losses, tokens = _fit_routers(network, moes, config, batches, measured)
    if sync is not None:
        _sync_routers(moes, sync)
    for moe in moes.values():
        for optimizer in optimizers:  # the routers were refitted: forget their moments
            for param in moe.router.parameters():
                optimizer.state.pop(param, None)
        moe.set_routed(True)
    loss = round(sum(losses) / len(losses), 6) if losses else None
    return {"calibration_tokens": tokens, "sparsity": sparsity, "router_fit_loss": loss}


def _partitions(
    network: nn.Module, moes: Mapping[str, MoEFFN], config: MoEConfig, batches: Sequence[Any]
) -> tuple[list[Tensor], list[Tensor] | None, tuple[dict[str, float], int] | None]:
    """Labels per MoE FFN; with ``split: carve`` also each routed expert's representative neuron;
    and, when the split captured activations, their sparsity and token count."""
    modules, experts, iters, seed = list(moes.values()), config.num_experts, config.kmeans_iters, config.seed
    if config.split == "random":
        return [random_partition(m.d_ff, experts, seed + i) for i, m in enumerate(modules)], None, None
    if config.split == "kmeans":
        return [balanced_kmeans(m.gate_rows(), experts, iters, seed) for m in modules], None, None
    grams = [torch.zeros(m.d_ff, m.d_ff, dtype=torch.float64) for m in modules]
    carve = config.split == "carve"
    sums = {"zero_fraction": 0.0, "mass_fraction": 0.0}

    def collect(i: int, _x: Tensor, h: Tensor) -> None:
        for key, value in activation_sparsity(h).items():  # permutation-invariant: valid after the split
            sums[key] += value * h.shape[0]
        if carve:  # 0/1 activation markers: counts are exact in float32 per batch
            a = activation_markers(h, max(1, round(config.active_fraction * h.shape[1])))
        else:
            a = h.detach().abs().float()
        grams[i] += (a.t() @ a).double().cpu()  # (d_ff, d_ff) co-activation, float64 running sum

    tokens = capture_activations(network, modules, batches, collect)
    measured = ({k: round(v / (tokens * len(modules)), 6) for k, v in sums.items()}, tokens)
    if carve:
        carved = [carve_partition(g, experts, config.shared_experts, iters) for g in grams]
        return [c[0] for c in carved], [c[1] for c in carved], measured
    return [coactivation_partition(g, experts, iters, seed) for g in grams], None, measured


def _fit_routers(
    network: nn.Module,
    moes: Mapping[str, MoEFFN],
    config: MoEConfig,
    batches: Sequence[Any],
    measured: tuple[dict[str, float], int] | None = None,
) -> tuple[dict[str, float], list[float], int]:
    """Fit the routers (MLP: on a capture of the permuted FFNs; centroid: from the weights); the
    sparsity of the captured activations (from ``measured`` when the split already captured them
    and no MLP router needs a capture)."""
    modules = list(moes.values())
    if measured is not None and config.router != "mlp":
        for moe in modules:
            if isinstance(moe.router, CentroidRouter):
                fit_centroid_router(moe.router, moe.gate_rows()[moe.shared_size :])
        return measured[0], [], measured[1]
    data: dict[int, list[tuple[Tensor, Tensor]]] = {i: [] for i in range(len(modules))}
    sums = {"zero_fraction": 0.0, "mass_fraction": 0.0}

    def collect(i: int, x: Tensor, h: Tensor) -> None:
        for key, value in activation_sparsity(h).items():
            sums[key] += value * x.shape[0]
        if config.router == "mlp":
            routed = h[:, modules[i].shared_size :]  # the routed experts' neurons
            data[i].append((x.detach().float().cpu(), expert_mass(routed, modules[i].routed_experts).cpu()))

    tokens = capture_activations(network, modules, batches, collect)
    losses = []
    for i, moe in enumerate(modules):
        if isinstance(moe.router, MLPRouter):
            x, mass = torch.cat([d[0] for d in data[i]]), torch.cat([d[1] for d in data[i]])
            data[i].clear()
            fit = (config.router_steps, config.router_lr, config.router_batch_size, config.seed + i)
            losses.append(train_mlp_router(moe.router, x, mass, *fit))
        elif isinstance(moe.router, CentroidRouter):
            fit_centroid_router(moe.router, moe.gate_rows()[moe.shared_size :])
    sparsity = {k: round(v / (tokens * len(modules)), 6) for k, v in sums.items()}
    return sparsity, losses, tokens


def _sync_routers(moes: Mapping[str, MoEFFN], sync: Sync) -> None:
    states = [{k: v.detach().cpu() for k, v in m.router.state_dict().items()} for m in moes.values()]
    for moe, state in zip(moes.values(), sync(states)):
        moe.router.load_state_dict(state)
