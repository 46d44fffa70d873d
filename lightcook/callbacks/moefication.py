"""MoEfication during training: :class:`MoEficationCallback` splits every dense FFN into experts and
routes each token to the top-k of them (Zhang et al., Findings of ACL 2022).

Timeline of one run (the structure follows from the configuration alone, so a resumed run rebuilds
it before Lightning restores the weights):

* ``setup``: every FFN found by the architecture registry (:mod:`lightcook.ops.architectures`)
  becomes a :class:`~lightcook.ops.moe.MoEFFN` that reuses the FFN's projection modules under their
  names. Its partition (``perm`` buffer), router (parameters/buffers) and flags (``routed``,
  ``relu`` buffers) have fixed shapes and start as identity / untrained / off: until the split the
  model computes exactly the dense function.
* ``on_train_start``: with ``relufy``, the activation sparsity of the original activation is
  measured on the calibration batches, then every FFN switches to ReLU (ReLU-fication); training up
  to ``split_step`` recovers the quality (add ``kd`` to distil from the starting model).
* first training batch with ``global_step >= split_step`` (after weights, optimizer state and this
  callback's state were restored): unless ``state["split_done"]``, forward hooks capture FFN inputs
  and intermediate activations on ``calibration_batches`` batches of the training data (read in
  order, the same batches on every rank), each FFN's neurons are split into equal experts
  (``split``), the neurons are permuted physically (gate/up rows, down columns, Adam moments) so
  experts are contiguous slices, routers are fitted, rank 0's partition and routers are broadcast
  (DDP), and routing turns on. A resumed run gets all of it back from the checkpoint.
* training continues with routing (dense compute with unselected experts masked, so it matches
  inference); with ``router_finetune`` the MLP routers keep learning to predict the expert
  activation mass through a gradient-only auxiliary loss.
* ``on_train_end`` / ``on_fit_end``: the per-layer expert load (layers × experts) goes to
  ``<run_dir>/moe_expert_load.png`` (heatmap) and ``moe_report.json``; rank 0 exports the MoE model
  to ``<run_dir>/<export_dir>`` (:func:`lightcook.export.moe.load_moe` reloads it with sparse,
  conditional-computation FFNs).

Logged: ``moe/ffn_param_fraction`` (share of FFN weights used per token), ``moe/load_imbalance``
(mean over layers of max/mean expert load) and ``moe/load_imbalance/layer_<i>`` per layer,
``moe/router_loss``, and at the split ``moe/zero_fraction`` / ``moe/mass_fraction`` (activation
sparsity, see :func:`lightcook.ops.moe.activation_sparsity`).

Example:
    >>> import tempfile, torch, lightning as L
    >>> from lightcook.modules import CausalLMModule
    >>> tiny = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
    ...         "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}
    >>> module = CausalLMModule(config=tiny, tokenizer=None)
    >>> ids = torch.randint(0, 64, (4, 8))
    >>> data = torch.utils.data.DataLoader([{"input_ids": r, "labels": r} for r in ids], batch_size=2)
    >>> cb = MoEficationCallback(num_experts=8, top_k=2, calibration_batches=1, router_steps=5)
    >>> trainer = L.Trainer(max_steps=2, callbacks=[cb], logger=False, enable_checkpointing=False,
    ...                     enable_progress_bar=False, enable_model_summary=False,
    ...                     default_root_dir=tempfile.mkdtemp())
    >>> trainer.fit(module, data)
    >>> cb.state["split_done"], sorted(cb.exports)
    (True, ['moe'])
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

from lightcook.callbacks.base import (
    CompressionCallback,
    all_reduce_,
    eval_mode,
    first_loader,
    replace_module,
    target_model,
)
from lightcook.export.moe import export_moe
from lightcook.io import write_json_atomic
from lightcook.ops.architectures import (
    FFN,
    Block,
    check_architecture_arg,
    get_architecture,
    resolve_blocks,
)
from lightcook.ops.moe import (
    PARTITIONS,
    ROUTERS,
    CentroidRouter,
    MLPRouter,
    MoEFFN,
    activation_sparsity,
    balanced_kmeans,
    coactivation_partition,
    expert_mass,
    fit_centroid_router,
    partition_permutation,
    random_partition,
    train_mlp_router,
)
from lightcook.plots import expert_load_figure, save_figure

HEATMAP, REPORT = "moe_expert_load.png", "moe_report.json"


def _network(module: LightningModule | nn.Module) -> nn.Module:
    """The network to MoEfy: ``pl_module.model`` for a LightningModule, else the module itself (a
    Hugging Face ``*ForCausalLM`` also has a ``.model`` attribute, which must not be taken)."""
    return target_model(module) if isinstance(module, LightningModule) else module


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _in_order(loader: Iterable) -> Iterable:
    """The loader's batches in dataset order (map-style datasets are re-read without shuffling, so no
    sampler RNG is consumed and the live training iterator is untouched)."""
    if (
        isinstance(loader, DataLoader)
        and not isinstance(loader.dataset, IterableDataset)
        and loader.batch_size
    ):
        return DataLoader(
            loader.dataset, batch_size=loader.batch_size, shuffle=False, collate_fn=loader.collate_fn
        )
    return loader


class MoEficationCallback(CompressionCallback):
    """Split each dense FFN into ``num_experts`` equal experts and compute only the ``top_k`` that a
    router picks per token.

    Args:
        num_experts: experts per FFN; must divide every FFN's intermediate size.
        top_k: experts per token, ``1 <= top_k <= num_experts``; ``top_k / num_experts`` is the share
            of FFN weights used per token.
        split: ``"kmeans"`` (balanced k-means over the neurons' normalised activated-projection rows),
            ``"coactivation"`` (balanced partition of the co-activation graph of the captured
            activations) or ``"random"`` (baseline).
        router: ``"mlp"`` (trained to predict each expert's activation-mass share), ``"centroid"``
            (similarity to the mean activated-projection row of each expert), ``"oracle"`` (the
            experts with the largest activation mass: evaluation only, computes the dense FFN) or
            ``"random"`` (baseline).
        router_hidden: hidden width of the MLP router.
        router_steps, router_lr, router_batch_size: Adam fit of each MLP router on the captured tokens.
        router_finetune: keep training the MLP routers during fine-tuning (their parameters join the
            module's optimizer; gradient from an auxiliary loss that leaves the loss value unchanged).
        router_loss_weight: weight of that auxiliary loss.
        calibration_batches: training batches captured (forward hooks) for the split and the routers.
        kmeans_iters: maximum balanced k-means iterations.
        split_step: optimizer step at which the split happens (with ``relufy``: after this many
            steps of dense ReLU fine-tuning).
        relufy: replace the FFN activation (SiLU/GELU) by ReLU at the start of training, so the
            activations become sparse enough to route; activation sparsity is reported before and
            at the split.
        buckets: expert groups per sparse forward (each one padded ``bmm``).
        architecture: ``None`` (by ``config.model_type``), a registered layout name, or a mapping
            (see :func:`~lightcook.ops.architectures.architecture_from_dict`) saying where the FFNs are.
        export_dir: MoE export folder under ``trainer.default_root_dir`` (``None``: no export).
        plot: write the expert-load heatmap PNG into the run directory.
        seed: seed of the k-means initialisation, random split and router mini-batches.
        name: distinguishes two instances (errors then say ``compress.<name>.<arg>``).

    Raises:
        ValueError: in ``__init__``, an argument outside its allowed values (the message names
            ``compress.moe.<arg>`` and lists them), e.g. ``top_k > num_experts``; in ``setup``, a model
            with no recognisable FFN and no ``architecture`` mapping, ``num_experts`` not dividing an
            intermediate size, or an FFN already split with other settings.
        RuntimeError: at the split, no calibration batch in the training data.

    Example:
        >>> cb = MoEficationCallback(num_experts=16, top_k=4, split="coactivation", router="centroid")
        >>> cb.config_key, cb.state["split_done"], cb.ffn_param_fraction
        ('compress.moe', False, 0.25)
    """

    order = 10

    def __init__(
        self,
        num_experts: int = 32,
        top_k: int = 8,
        split: str = "coactivation",
        router: str = "mlp",
        router_hidden: int = 128,
        router_steps: int = 200,
        router_lr: float = 1e-3,
        router_batch_size: int = 512,
        router_finetune: bool = True,
        router_loss_weight: float = 1.0,
        calibration_batches: int = 8,
        kmeans_iters: int = 20,
        split_step: int = 0,
        relufy: bool = False,
        buckets: int = 16,
        architecture: str | Mapping[str, Any] | None = None,
        export_dir: str | None = "moe",
        plot: bool = True,
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        self.config_key = f"compress.{name or 'moe'}"
        self.num_experts, self.top_k, self.split, self.router = num_experts, top_k, split, router
        self.router_hidden, self.router_steps, self.router_lr = router_hidden, router_steps, router_lr
        self.router_batch_size, self.router_finetune = router_batch_size, router_finetune
        self.router_loss_weight, self.calibration_batches = router_loss_weight, calibration_batches
        self.kmeans_iters, self.split_step = kmeans_iters, split_step
        self.relufy, self.buckets = relufy, buckets
        self.export_dir, self.plot, self.seed = export_dir, plot, seed
        self._check_choices()
        self._check_counts()
        self._check_numbers()
        self.architecture = check_architecture_arg(architecture, f"{self.config_key}.architecture")
        self.state = {
            "split_done": False,  # partition + routers computed (they live in the model's state dict)
            "split_at_step": None,  # trainer.global_step of the split
            "relu_active": False,  # ReLU-fication switched on
            "calibration_tokens": 0,  # tokens captured for the split
            "router_fit_loss": None,  # mean final router loss over layers (MLP router)
            "sparsity_before": None,  # {"zero_fraction", "mass_fraction"} of the original activation
            "sparsity_at_split": None,  # same, at the split (ReLU-fied and fine-tuned with relufy)
        }
        self._moes: dict[str, MoEFFN] = {}
        self._load_total: Tensor | None = None  # (layers, experts) training tokens per expert
        self.report: dict[str, Any] = {}

    # ------------------------------------------------------------------ argument checks

    def _fail(self, arg: str, message: str) -> ValueError:
        return ValueError(f"{self.config_key}.{arg}: {message}")

    def _check_choices(self) -> None:
        for arg, allowed in (("split", PARTITIONS), ("router", ROUTERS)):
            if getattr(self, arg) not in allowed:
                raise self._fail(arg, f"got {getattr(self, arg)!r}, allowed: {', '.join(allowed)}")
        for arg in ("router_finetune", "relufy", "plot"):
            if not isinstance(getattr(self, arg), bool):
                raise self._fail(arg, f"got {getattr(self, arg)!r}, allowed: true, false")
        if self.export_dir is not None and (
            not isinstance(self.export_dir, str) or not self.export_dir.strip()
        ):
            raise self._fail("export_dir", f"must be null or a folder name, got {self.export_dir!r}")

    def _check_counts(self) -> None:
        for arg in (
            "num_experts",
            "top_k",
            "router_hidden",
            "router_batch_size",
            "calibration_batches",
            "kmeans_iters",
            "buckets",
        ):
            if not _is_int(getattr(self, arg)) or getattr(self, arg) < 1:
                raise self._fail(arg, f"must be an integer >= 1, got {getattr(self, arg)!r}")
        if self.top_k > self.num_experts:
            raise self._fail("top_k", f"must be <= num_experts ({self.num_experts}), got {self.top_k}")
        for arg in ("router_steps", "split_step", "seed"):
            if not _is_int(getattr(self, arg)) or getattr(self, arg) < 0:
                raise self._fail(arg, f"must be an integer >= 0, got {getattr(self, arg)!r}")

    def _check_numbers(self) -> None:
        if (
            isinstance(self.router_lr, bool)
            or not isinstance(self.router_lr, int | float)
            or self.router_lr <= 0
        ):
            raise self._fail("router_lr", f"must be a number > 0, got {self.router_lr!r}")
        weight = self.router_loss_weight
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
            raise self._fail("router_loss_weight", f"must be a number >= 0, got {weight!r}")

    # ------------------------------------------------------------------ structure (setup)

    @property
    def ffn_param_fraction(self) -> float:
        """Share of the FFN expert weights each token uses (``top_k / num_experts``)."""
        return self.top_k / self.num_experts

    @property
    def moe_modules(self) -> dict[str, MoEFFN]:
        """The MoE FFNs this callback installed, by name (after ``setup``)."""
        return dict(self._moes)

    @override
    def check_with(self, others: Sequence[CompressionCallback], model: nn.Module) -> None:
        from lightcook.callbacks.structured_pruning import StructuredPruningCallback

        for other in others:
            if isinstance(other, StructuredPruningCallback) and "neurons" in other.units:
                raise self.conflict(
                    other,
                    "pruning single FFN neurons would leave experts of unequal size; drop 'neurons' from "
                    f"{other.config_key}.units (heads and whole attention/FFN blocks combine with experts)",
                )

    @override
    def prepare_model(self, trainer: Trainer | None, pl_module: LightningModule) -> None:
        """Replace every FFN by a :class:`MoEFFN` (all checked first, then swapped)."""
        model = _network(pl_module)
        blocks = self._ffn_blocks(model)
        for block in blocks:
            self._check_block(block)
        self._moes = {block.name: self._install(model, block) for block in blocks}

    def _ffn_blocks(self, model: nn.Module) -> list[Block]:
        key = f"{self.config_key}.architecture"
        arch = get_architecture(model, self.architecture, key=key)
        blocks = [b for b in resolve_blocks(model, arch) if b.kind == FFN]
        if not blocks:
            raise ValueError(
                f"{key}: layout {arch.name!r} finds no FFN in {type(model).__name__}; give a mapping with 'ffn'"
            )
        return blocks

    def _check_block(self, block: Block) -> None:
        module = block.module
        if isinstance(module, MoEFFN):
            if (module.num_experts, module.top_k) != (self.num_experts, self.top_k):
                raise self._fail(
                    "num_experts",
                    f"{block.name} is already split into {module.num_experts} experts (top {module.top_k}) "
                    "by another MoEfication callback",
                )
            return
        if block.units % self.num_experts:
            divisors = [d for d in range(1, block.units + 1) if block.units % d == 0 and d <= 256]
            raise self._fail(
                "num_experts",
                f"{self.num_experts} does not divide the intermediate size {block.units} of {block.name}; "
                f"allowed: a divisor such as {divisors[-8:]}",
            )

    def _install(self, model: nn.Module, block: Block) -> MoEFFN:
        if isinstance(block.module, MoEFFN):
            return block.module  # the same model set up again (e.g. a second Trainer)
        layout = block.layout
        moe = MoEFFN.from_ffn(
            block.module,
            layout.inputs,
            layout.output,
            layout.activation,
            layout.gated,
            self.num_experts,
            self.top_k,
            self.router,
            self.router_hidden,
            self.buckets,
            self.router_loss_weight if self.router_finetune else 0.0,
        )
        for param in moe.router.parameters():
            param.requires_grad_(self.router_finetune)
            param._no_weight_decay = True
        replace_module(model, block.name, moe)
        return moe

    # ------------------------------------------------------------------ calibration capture

    def calibration_batches_of(self, trainer: Trainer) -> list[Any]:
        """The first ``calibration_batches`` batches of the trainer's training data, in dataset order,
        on the module's device (the same batches on every rank)."""
        loader = first_loader(trainer.train_dataloader)
        batches = []
        for batch in _in_order(loader) if loader is not None else ():
            if len(batches) >= self.calibration_batches:
                break
            batches.append(trainer.strategy.batch_to_device(batch))
        return batches

    @torch.no_grad()
    def capture(self, pl_module: LightningModule | nn.Module, batches: Iterable[Any], collect: Any) -> int:
        """Run ``batches`` through the model (eval mode, no gradients) and call
        ``collect(layer_index, x (N, d), h (N, d_ff))`` for every MoE FFN with its input and
        intermediate activations (padding tokens dropped). Returns the number of tokens seen.

        Raises:
            RuntimeError: no batch.
        """
        model = _network(pl_module)
        seen, mask_box = 0, [None]
        handles = self._capture_hooks(collect, mask_box)
        try:
            with eval_mode(model):
                for batch in batches:
                    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                    mask_box[0] = None if mask is None else mask.reshape(-1).bool()
                    model(**batch) if isinstance(batch, Mapping) else model(batch)
                    seen += int(mask_box[0].sum()) if mask is not None else int(batch["input_ids"].numel())
        finally:
            for handle in handles:
                handle.remove()
        if seen == 0:
            raise RuntimeError(f"{self.config_key}.calibration_batches: no training batch to calibrate on")
        return seen

    def _capture_hooks(self, collect: Any, mask_box: list) -> list[Any]:
        """Forward pre-hooks: each MoE FFN's input ``x``, then its output projection's input ``h``."""
        inputs: dict[int, Tensor] = {}
        handles = []
        for i, moe in enumerate(self._moes.values()):
            keep_x = lambda _m, args, i=i: inputs.__setitem__(i, args[0])  # noqa: E731
            use_h = lambda _m, args, i=i: self._collect(collect, i, inputs.pop(i), args[0], mask_box[0])  # noqa: E731
            handles.append(moe.register_forward_pre_hook(keep_x))
            handles.append(moe.get_submodule(moe.output_name).register_forward_pre_hook(use_h))
        return handles

    @staticmethod
    def _collect(collect: Any, index: int, x: Tensor, h: Tensor, mask: Tensor | None) -> None:
        x, h = x.reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1])  # (N, d), (N, d_ff)
        if mask is not None and mask.numel() == x.shape[0]:
            x, h = x[mask], h[mask]
        collect(index, x, h)

    def _sparsity(self, pl_module: LightningModule, batches: list[Any]) -> dict[str, float]:
        sums = {"zero_fraction": 0.0, "mass_fraction": 0.0}

        def collect(_i: int, x: Tensor, h: Tensor) -> None:
            for key, value in activation_sparsity(h).items():
                sums[key] += value * x.shape[0]

        tokens = self.capture(pl_module, batches, collect)
        return {k: round(v / (tokens * len(self._moes)), 6) for k, v in sums.items()}

    # ------------------------------------------------------------------ the split

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.relufy and not self.state["relu_active"]:
            self.state["sparsity_before"] = self._sparsity(pl_module, self.calibration_batches_of(trainer))
            for moe in self._moes.values():
                moe.set_relu(True)
            self.state["relu_active"] = True

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.state["split_done"] and trainer.global_step >= self.split_step:
            self.split_experts(pl_module, self.calibration_batches_of(trainer), trainer)
        for moe in self._moes.values():
            moe.load_counts.zero_()  # count this batch's training tokens only

    def split_experts(
        self, pl_module: LightningModule | nn.Module, batches: list[Any], trainer: Trainer | None = None
    ) -> None:
        """Partition every FFN, permute its neurons, fit the routers and turn routing on.

        Called by the callback at ``split_step``; also usable without a Trainer (after
        :meth:`prepare_model`), e.g. to MoEfy a model for evaluation.

        Args:
            pl_module: the module (or network) prepared by :meth:`prepare_model`.
            batches: calibration batches (dicts of model inputs) on the model's device.
            trainer: supplies the optimizers (their moments are permuted too) and, under DDP, the
                broadcast of rank 0's partition and routers; ``None``: one process, no optimizer.

        Raises:
            RuntimeError: no calibration batch.
        """
        perms = [partition_permutation(lab, self.num_experts) for lab in self._partitions(pl_module, batches)]
        optimizers = trainer.optimizers if trainer is not None else []
        for moe, perm in zip(self._moes.values(), self._broadcast(trainer, perms)):
            moe.permute_(perm, optimizers)
        sparsity, losses = self._fit_routers(pl_module, batches)
        self._sync_routers(trainer)
        for moe in self._moes.values():
            self._forget_router_state(optimizers, moe)
            moe.set_routed(True)
        if self.state["sparsity_before"] is None:
            self.state["sparsity_before"] = sparsity
        self.state.update(
            split_done=True,
            split_at_step=trainer.global_step if trainer is not None else None,
            sparsity_at_split=sparsity,
            router_fit_loss=round(sum(losses) / len(losses), 6) if losses else None,
        )

    def _partitions(self, pl_module: LightningModule | nn.Module, batches: list[Any]) -> list[Tensor]:
        moes = list(self._moes.values())
        if self.split == "random":
            return [random_partition(m.d_ff, self.num_experts, self.seed + i) for i, m in enumerate(moes)]
        if self.split == "kmeans":
            rows = [m.gate_rows() for m in moes]
            return [balanced_kmeans(r, self.num_experts, self.kmeans_iters, self.seed) for r in rows]
        grams = [torch.zeros(m.d_ff, m.d_ff, dtype=torch.float64) for m in moes]

        def collect(i: int, _x: Tensor, h: Tensor) -> None:
            a = h.detach().abs().float()
            grams[i] += (a.t() @ a).double().cpu()  # (d_ff, d_ff) co-activation, float64 running sum

        self.capture(pl_module, batches, collect)
        return [coactivation_partition(g, self.num_experts, self.kmeans_iters, self.seed) for g in grams]

    def _fit_routers(
        self, pl_module: LightningModule | nn.Module, batches: list[Any]
    ) -> tuple[dict[str, float], list[float]]:
        moes = list(self._moes.values())
        data: dict[int, list[tuple[Tensor, Tensor]]] = {i: [] for i in range(len(moes))}
        sums = {"zero_fraction": 0.0, "mass_fraction": 0.0}

        def collect(i: int, x: Tensor, h: Tensor) -> None:
            for key, value in activation_sparsity(h).items():
                sums[key] += value * x.shape[0]
            if self.router == "mlp":
                data[i].append((x.detach().float().cpu(), expert_mass(h, self.num_experts).cpu()))

        tokens = self.capture(pl_module, batches, collect)
        self.state["calibration_tokens"] = tokens
        losses = []
        for i, moe in enumerate(moes):
            if isinstance(moe.router, MLPRouter):
                x, mass = torch.cat([d[0] for d in data[i]]), torch.cat([d[1] for d in data[i]])
                data[i].clear()
                losses.append(
                    train_mlp_router(
                        moe.router,
                        x,
                        mass,
                        self.router_steps,
                        self.router_lr,
                        self.router_batch_size,
                        self.seed + i,
                    )
                )
            elif isinstance(moe.router, CentroidRouter):
                fit_centroid_router(moe.router, moe.gate_rows())
        sparsity = {k: round(v / (tokens * len(moes)), 6) for k, v in sums.items()}
        return sparsity, losses

    @staticmethod
    def _forget_router_state(optimizers: Iterable[torch.optim.Optimizer], moe: MoEFFN) -> None:
        """Drop optimizer moments of router parameters (they were refitted)."""
        for optimizer in optimizers:
            for param in moe.router.parameters():
                optimizer.state.pop(param, None)

    def _broadcast(self, trainer: Trainer | None, tensors: list[Tensor]) -> list[Tensor]:
        if trainer is None or trainer.world_size == 1:
            return tensors
        return [t.to(torch.long) for t in trainer.strategy.broadcast([t.cpu() for t in tensors], src=0)]

    def _sync_routers(self, trainer: Trainer | None) -> None:
        if trainer is None or trainer.world_size == 1:
            return
        states = [
            {k: v.detach().cpu() for k, v in m.router.state_dict().items()} for m in self._moes.values()
        ]
        states = trainer.strategy.broadcast(states, src=0)
        for moe, state in zip(self._moes.values(), states):
            moe.router.load_state_dict(state)

    # ------------------------------------------------------------------ logging and load

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.state["split_done"] or not self._moes:
            return
        counts = torch.stack([m.load_counts.clone() for m in self._moes.values()])  # (layers, E)
        self._load_total = counts if self._load_total is None else self._load_total + counts
        metrics = {"moe/ffn_param_fraction": self.ffn_param_fraction}
        imbalance = _imbalance(counts.double())
        if imbalance is not None:
            metrics["moe/load_imbalance"] = float(imbalance.mean())
            metrics.update({f"moe/load_imbalance/layer_{i}": float(v) for i, v in enumerate(imbalance)})
        losses = [m.last_router_loss for m in self._moes.values() if m.last_router_loss is not None]
        if losses:
            metrics["moe/router_loss"] = sum(losses) / len(losses)
        if self.state["split_at_step"] == trainer.global_step - 1:
            metrics.update({f"moe/{k}": v for k, v in (self.state["sparsity_at_split"] or {}).items()})
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=_batch_size(batch))

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        load = self._load_total
        if load is None:
            load = torch.zeros(len(self._moes), self.num_experts, dtype=torch.long)
        device = next(pl_module.parameters()).device
        load = all_reduce_(load.to(device).double(), trainer).cpu()  # every rank's training tokens
        self.report = self._build_report(load)
        if trainer.is_global_zero and self._moes:
            run_dir = Path(trainer.default_root_dir)
            write_json_atomic(run_dir / REPORT, self.report)
            if self.plot:
                names = list(self._moes)
                save_figure(expert_load_figure(load.tolist(), names, "training tokens"), run_dir / HEATMAP)

    def _build_report(self, load: Tensor) -> dict[str, Any]:
        imbalance = _imbalance(load)
        return {
            "layers": list(self._moes),
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "ffn_param_fraction": self.ffn_param_fraction,
            "router_param_fraction": _router_fraction(self._moes.values()),
            "state": dict(self.state),
            "load_imbalance": None if imbalance is None else [round(float(v), 4) for v in imbalance],
            "expert_load": load.long().tolist(),  # (layers, experts) training tokens
        }

    # ------------------------------------------------------------------ export

    def export(self, pl_module: LightningModule | nn.Module, path: str | Path) -> Path:
        """Export the MoE network of ``pl_module`` (see :func:`lightcook.export.moe.export_moe`)."""
        return export_moe(_network(pl_module), path)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.export_dir is None:
            return
        if not self.state["split_done"]:
            rank_zero_warn(
                f"{self.config_key}: training ended before split_step={self.split_step}; no MoE export"
            )
            return
        path = Path(trainer.default_root_dir) / self.export_dir
        if trainer.is_global_zero:
            self.export(pl_module, path)
        trainer.strategy.barrier("moe-export")
        self.exports[self.name or "moe"] = str(path)


# --------------------------------------------------------------------------- helpers


def _batch_size(batch: Any) -> int | None:
    if isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), Tensor):
        return int(batch["input_ids"].shape[0])
    return None


def _imbalance(load: Tensor) -> Tensor | None:
    """Max over mean expert load per layer (1 = perfectly balanced); ``None`` without tokens."""
    if load.numel() == 0 or float(load.sum()) == 0:
        return None
    return load.max(1).values / load.mean(1).clamp_min(1e-12)


def _router_fraction(moes: Iterable[MoEFFN]) -> float:
    """Router parameters as a share of the FFN weights."""
    router = ffn = 0
    for moe in moes:
        router += sum(p.numel() for p in moe.router.parameters()) + sum(
            b.numel() for b in moe.router.buffers()
        )
        ffn += sum(m.weight.numel() for m in moe.projections)
    return round(router / max(1, ffn), 6)


def read_report(run_dir: str | Path) -> dict[str, Any]:
    """The ``moe_report.json`` of a run directory."""
    return json.loads((Path(run_dir) / REPORT).read_text())
