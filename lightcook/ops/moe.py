"""MoEfication in pure torch: split a dense FFN's neurons into equal experts, route tokens to the
top-k experts, and compute only those (Zhang et al., "MoEfication: Transformer Feed-forward Layers
are Mixtures of Experts", Findings of ACL 2022).

* Partition (``labels``: expert of each intermediate neuron, every expert exactly ``d_ff / E``):
  :func:`balanced_kmeans` over the neurons' normalised input weight vectors,
  :func:`coactivation_partition` (balanced kernel k-means on the co-activation graph measured on
  data), or :func:`random_partition` (baseline). :func:`partition_permutation` turns labels into a
  neuron order in which every expert is a contiguous slice.
* :class:`MoEFFN` replaces a dense FFN (gated SwiGLU/GeGLU or plain ``act(fc)``), reusing its Linear
  (or GPT-2 ``Conv1D``) modules under their original names. :meth:`MoEFFN.permute_` reorders the
  neurons physically (gate/up rows, down columns, optimizer moments too), which leaves the dense
  function unchanged. Until ``routed`` is set it *is* the dense FFN. Routed, it runs

  - without gradients (inference): real conditional computation — tokens are grouped by expert,
    experts are grouped by load, each group is two batched matmuls (``torch.bmm``: gate+up, down)
    over only its tokens, and each token sums its k expert outputs (``embedding_bag``);
  - with gradients (training): the dense FFN with every token's unselected experts masked out (same
    function), plus an optional router-regression gradient (:class:`AddAuxiliaryLoss`).
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
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightcook.ops.quant import effective_weight, fake_quant, fake_quant_input, input_quantization

PARTITIONS = ("kmeans", "coactivation", "random")
ROUTERS = ("mlp", "centroid", "oracle", "random")

__all__ = [
    "PARTITIONS",
    "ROUTERS",
    "AddAuxiliaryLoss",
    "CentroidRouter",
    "MLPRouter",
    "MoEFFN",
    "OracleRouter",
    "RandomRouter",
    "activation_sparsity",
    "balanced_assign",
    "balanced_kmeans",
    "coactivation_partition",
    "expert_mass",
    "fit_centroid_router",
    "make_router",
    "moe_modules",
    "partition_permutation",
    "random_partition",
    "release_workspaces",
    "reset_load",
    "router_kind",
    "router_loss",
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
    return labels


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

    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.register_buffer("centroids", torch.zeros(num_experts, hidden_size))

    def forward(self, x: Tensor) -> Tensor:  # (N, d) -> (N, E)
        return x @ self.centroids.to(x.dtype).t()


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


def make_router(kind: str, hidden_size: int, num_experts: int, hidden: int = 128) -> nn.Module:
    """A fresh (untrained) router of ``kind`` (one of :data:`ROUTERS`).

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
    raise ValueError(f"router: got {kind!r}, allowed: {', '.join(ROUTERS)}")


def router_kind(router: nn.Module) -> str:
    """The :data:`ROUTERS` name of a router module."""
    kinds = {MLPRouter: "mlp", CentroidRouter: "centroid", OracleRouter: "oracle", RandomRouter: "random"}
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


class AddAuxiliaryLoss(torch.autograd.Function):
    """Return ``x`` unchanged; in backward, also send gradient 1 into ``loss`` (so a router learns
    from an auxiliary loss without changing the model's loss or its value)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, loss: Tensor) -> Tensor:
        ctx.needs_loss_grad = loss.requires_grad
        ctx.loss_meta = (loss.dtype, loss.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor | None]:
        dtype, device = ctx.loss_meta
        return grad, torch.ones((), dtype=dtype, device=device) if ctx.needs_loss_grad else None


# --------------------------------------------------------------------------- the MoE FFN


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def _rows(module: nn.Module) -> Tensor:
    """Weight as ``(out, in)`` (a view; GPT-2 ``Conv1D`` stores ``(in, out)``)."""
    return module.weight.t() if _is_conv1d(module) else module.weight


def _neuron_dim(module: nn.Module, produces: bool) -> int:
    """Weight dimension indexed by the intermediate neurons."""
    if produces:  # gate/up/fc: neurons are outputs
        return 1 if _is_conv1d(module) else 0
    return 0 if _is_conv1d(module) else 1


class MoEFFN(nn.Module):
    """A dense FFN turned into ``num_experts`` equal experts with top-k routing.

    Holds the original projection modules under their original names (``gate_proj``, ``up_proj``,
    ``down_proj``; ``c_fc``, ``c_proj``; ...), so state-dict keys of the weights do not change, plus

    * ``perm``  (buffer, ``(d_ff,)`` long): original index of the neuron at each position (identity
      until :meth:`permute_`);
    * ``routed`` (buffer, bool): route (``True``) or behave exactly as the dense FFN (``False``);
    * ``relu`` (buffer, bool): use ReLU instead of the original activation (ReLU-fication);
    * ``router``: the router submodule (its parameters/buffers are part of the state dict).

    Args:
        inputs: name → module producing the neurons, the activated (gate) projection first.
        output: ``(name, module)`` of the projection reading the neurons.
        activation: the original activation callable.
        num_experts: ``E``; must divide the intermediate size.
        top_k: experts used per token, ``1 <= top_k <= E`` (changeable later: :func:`set_top_k`).
        router: from :func:`make_router`.
        gated: ``act(inputs[0](x)) * inputs[1](x)`` (SwiGLU) instead of ``act(inputs[0](x))``.
        dropout: applied to the output in training (the original FFN's dropout, if any).
        buckets: at most this many expert groups per sparse forward (experts sorted by load, each
            group padded to its largest load; two ``bmm`` per group).
        router_loss_weight: weight of the router-regression gradient while training routed
            (0: routers are not fine-tuned).

    Raises:
        ValueError: ``num_experts`` does not divide the intermediate size; ``top_k`` out of range;
            a gated FFN without two input projections.
    """

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
        self.set_top_k(top_k)
        self.buckets, self.router_loss_weight = buckets, router_loss_weight
        self.register_buffer("perm", torch.arange(self.d_ff))
        self.register_buffer("routed", torch.tensor(False))
        self.register_buffer("relu", torch.tensor(False))
        self.load_counts = torch.zeros(num_experts, dtype=torch.long)  # tokens per expert since reset
        self.last_router_loss: float | None = None
        self._cache: tuple[tuple, tuple[Tensor, ...]] | None = None

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
    ) -> MoEFFN:
        """Build the MoE FFN around the projections of a dense FFN module (which it replaces).

        Args:
            ffn: the dense FFN (``LlamaMLP``, ``GPT2MLP``, ...).
            inputs: attribute names of the neuron-producing projections, gate first.
            output: attribute name of the output projection.
            activation: attribute name of the activation callable.
            gated: SwiGLU-style ``act(gate) * up``.
            num_experts, top_k, buckets, router_loss_weight: as in :class:`MoEFFN`.
            router: one of :data:`ROUTERS`; ``router_hidden``: hidden width of the MLP router.

        Raises:
            ValueError: as :class:`MoEFFN`, or an unknown router.
        """
        ins = {name: ffn.get_submodule(name) for name in inputs}
        first = ins[inputs[0]]
        d_model = int(_rows(first).shape[1])
        made = make_router(router, d_model, num_experts, router_hidden).to(
            first.weight.device, first.weight.dtype
        )
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
        }

    # ------------------------------------------------------------------ configuration

    def set_top_k(self, top_k: int) -> None:
        """Use ``top_k`` experts per token.

        Raises:
            ValueError: not in ``[1, num_experts]``.
        """
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= self.num_experts:
            raise ValueError(f"top_k must be an integer in [1, {self.num_experts}], got {top_k!r}")
        self.top_k = top_k

    def set_routed(self, routed: bool) -> None:
        """Route (``True``) or compute the dense FFN (``False``)."""
        self.routed.fill_(bool(routed))

    def set_relu(self, relu: bool) -> None:
        """Use ReLU (``True``) or the original activation (``False``)."""
        self.relu.fill_(bool(relu))

    def gate_rows(self) -> Tensor:
        """The activated projection's weight as ``(d_ff, d)`` rows, in the current neuron order."""
        return _rows(getattr(self, self.input_names[0])).detach()

    @property
    def projections(self) -> list[nn.Module]:
        """The input projections (gate first) followed by the output projection."""
        return [getattr(self, n) for n in self.input_names] + [getattr(self, self.output_name)]

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}, expert_size={self.expert_size}, gated={self.gated}"

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
        """Before routing, give trainable router parameters a zero gradient under DDP (all used)."""
        if self.training and self._trainable_router() and torch.distributed.is_initialized():
            zero = self.router(x.reshape(-1, x.shape[-1])).sum() * 0.0
            out = AddAuxiliaryLoss.apply(out, zero)
        return out

    def _select(self, scores: Tensor) -> Tensor:
        top = scores.topk(self.top_k, dim=1).indices  # (N, k)
        self.load_counts += torch.bincount(top.reshape(-1).cpu(), minlength=self.num_experts)
        return top

    def _masked(self, x: Tensor) -> Tensor:
        """Routed, dense computation with unselected experts zeroed (training, oracle)."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, d)
        h = self.intermediate(x2)  # (N, d_ff)
        needs_h = getattr(self.router, "needs_activations", False)
        scores = self.router(h.detach() if needs_h else x2)  # (N, E)
        top = self._select(scores)
        mask = torch.zeros_like(scores, dtype=h.dtype).scatter_(1, top, 1.0)  # (N, E)
        masked = (h.view(-1, self.num_experts, self.expert_size) * mask[:, :, None]).view(h.shape)
        out = getattr(self, self.output_name)(masked)
        if self.training and self.router_loss_weight > 0 and self._trainable_router() and not needs_h:
            loss = self.router_loss_weight * router_loss(scores, expert_mass(h, self.num_experts))
            self.last_router_loss = float(loss.detach())
            out = AddAuxiliaryLoss.apply(out, loss)
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
            ``in`` ``(E, j*m, d)``: each expert's activated-projection rows followed (gated, ``j = 2``)
            by its up-projection rows; ``in_bias`` ``(E, j*m)`` or ``None``; ``down`` ``(E, m, d_out)``;
            ``down_bias`` ``(d_out,)`` or ``None``.
        """
        key = (*self._weight_key(), dtype)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        num, m = self.num_experts, self.expert_size
        ins = [getattr(self, n) for n in self.input_names]
        out = getattr(self, self.output_name)
        biases = [getattr(p, "bias", None) for p in ins]
        weights: dict[str, Tensor | None] = {
            "in": torch.cat([effective_weight(p).reshape(num, m, -1) for p in ins], dim=1).contiguous(),
            "in_bias": None
            if biases[0] is None
            else torch.cat([b.detach().reshape(num, m) for b in biases], dim=1).contiguous(),
            "down": effective_weight(out).t().reshape(num, m, -1).contiguous(),
            "down_bias": None if getattr(out, "bias", None) is None else out.bias.detach(),
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
        top = self._select(self.router(x2))  # (N, k)
        rows, sources, order, blocks = _route_plan(top, self.num_experts, self.buckets)
        w = self.expert_weights(x2.dtype)
        whole = bool(torch.equal(order, torch.arange(self.num_experts)))
        w_in, w_down = (w["in"], w["down"]) if whole else (_take(w["in"], order), _take(w["down"], order))
        xq = fake_quant_input(x2, input_quantization(getattr(self, self.input_names[0])))
        xs = _workspace("xs", (sources.numel(), x2.shape[1]), x2)
        torch.index_select(xq, 0, sources, out=xs)  # (R, d): tokens grouped by expert, padded
        h = _workspace("h", (sources.numel(), w_in.shape[1]), x2)  # (R, j*m)
        for first, count, cap, start in blocks:
            end = start + count * cap
            hb = h[start:end].view(count, cap, -1)
            torch.bmm(xs[start:end].view(count, cap, -1), w_in[first : first + count].transpose(1, 2), out=hb)
            if w["in_bias"] is not None:
                hb += w["in_bias"][order[first : first + count].to(x.device)][:, None, :]
        act = self._gated_activation(h)  # (R, m)
        act = self._quantize_down_input(
            act, rows.view(n, k), input_quantization(getattr(self, self.output_name))
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
        if w["down_bias"] is not None:
            out += w["down_bias"]
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def _quantize_down_input(act: Tensor, token_rows: Tensor, quantization: tuple | None) -> Tensor:
        """Fake-quantize the down projection's input rows as the dense layer would: per token over
        its whole (mostly zero) intermediate vector, i.e. over that token's ``k`` expert rows."""
        if quantization is None or quantization[0] != "dynamic":
            return fake_quant_input(act, quantization)
        bits = quantization[1]
        qmax = 2 ** (bits - 1) - 1
        compute = act if act.dtype in (torch.float32, torch.float64) else act.float()
        token_max = compute.abs().amax(1)[token_rows].amax(1)  # (N,): max over the token's k rows
        row_max = torch.zeros(compute.shape[0], dtype=compute.dtype, device=compute.device)
        row_max[token_rows.reshape(-1)] = token_max.repeat_interleave(token_rows.shape[1])
        scale = (row_max / qmax).clamp_min(torch.finfo(compute.dtype).tiny)[:, None]
        return fake_quant(compute, scale, 0.0, -qmax, qmax).to(act.dtype)

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
    """Set every MoE FFN of ``model`` to ``top_k`` experts (an int, or a fraction of ``E`` in (0, 1]).

    Raises:
        ValueError: the resulting ``top_k`` is out of range for a layer.
    """
    for module in moe_modules(model).values():
        k = top_k if isinstance(top_k, int) else max(1, round(top_k * module.num_experts))
        module.set_top_k(k)


def reset_load(modules: Sequence[MoEFFN] | Iterable[MoEFFN]) -> None:
    """Zero the per-expert token counters."""
    for module in modules:
        module.load_counts.zero_()
