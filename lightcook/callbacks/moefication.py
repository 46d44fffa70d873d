"""MoEfication during training: :class:`MoEficationCallback` splits every dense FFN into experts and
routes each token to the top-k of them (Zhang et al., Findings of ACL 2022). The settings:
:class:`~lightcook.ops.moe.MoEConfig`; the transforms: :func:`lightcook.ops.moe.prepare_` and
:func:`lightcook.ops.moe.split_` (usable without Lightning).

Timeline of one run (the structure follows from the configuration alone, so a resumed run rebuilds
it before Lightning restores the weights; ``num_experts``, ``top_k``, ``shared_experts``, ``router``,
``router_hidden`` and ``architecture`` are stored in the checkpoint and a resumed run with other
values fails first):

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
  With ``split: carve`` (CMoE, gated FFNs only, no ReLU-fication needed) the neurons most often among
  a token's top ``active_fraction`` by ``|h|`` become ``shared_experts`` always-on experts, the rest
  are grouped by co-activation into balanced routed experts, and ``router: representative`` builds
  each router from the representative neurons' gate / up rows with no training
  (:func:`lightcook.ops.moe.carve_partition`); a token then computes
  ``(shared_experts + top_k) / num_experts`` of each FFN.
* training continues with routing (dense compute with unselected experts masked, so it matches
  inference); with ``router_finetune`` the MLP routers keep learning to predict the expert
  activation mass: :meth:`~MoEficationCallback.loss_terms` adds the routers' loss (weighted by
  ``router_loss_weight``) to the module's own loss as the term ``router``: the optimized loss
  (logged as ``compress/loss``) includes it, ``compress/moe/router`` shows it alone, and the module's
  ``train/loss`` stays its task loss. Manual optimization is then refused
  in ``setup`` (the base callback says why); with ``router_finetune: false`` nothing is added.
* ``on_train_end``: the per-layer expert load (layers × experts) goes to
  ``<run_dir>/moe_expert_load.png`` (heatmap) and ``moe_report.json``; :meth:`~MoEficationCallback.summary`
  gives the outcome. The one export step at fit end (:func:`lightcook.export.save_compressed`) writes
  the MoE network, which :func:`lightcook.export.load_compressed` reloads with sparse,
  conditional-computation FFNs.

Logged: ``moe/ffn_param_fraction`` (share of FFN weights used per token, shared plus routed experts), ``moe/load_imbalance``
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
    >>> cb = MoEficationCallback(num_experts=8, top_k=2, calibration_batches=1, router_steps=5, plot=False)
    >>> trainer = L.Trainer(max_steps=2, callbacks=[cb], logger=False, enable_checkpointing=False,
    ...                     enable_progress_bar=False, enable_model_summary=False,
    ...                     default_root_dir=tempfile.mkdtemp())
    >>> trainer.fit(module, data)
    >>> cb.state["split_done"], cb.summary()["ffn_param_fraction"]
    (True, 0.25)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightcook.callbacks.base import CompressionCallback, all_reduce_, batch_size_of, calibration_batches
from lightcook.io import write_json_atomic
from lightcook.ops.moe import MoEConfig, MoEFFN, measure_sparsity, prepare_, router_aux_loss, split_
from lightcook.render import expert_load_figure, save_figure

HEATMAP, REPORT = "moe_expert_load.png", "moe_report.json"


class MoEficationCallback(CompressionCallback):
    """Split each dense FFN into ``num_experts`` equal experts and compute only the ``top_k`` that a
    router picks per token (plus, with ``split: carve``, the ``shared_experts`` always-on ones).

    Args:
        config: a :class:`~lightcook.ops.moe.MoEConfig`; or give its fields as keyword ``options``
            instead (not both): ``num_experts``, ``top_k``, ``split``, ``shared_experts``,
            ``active_fraction``, ``router``, ``router_hidden``,
            ``router_steps``, ``router_lr``, ``router_batch_size``, ``router_finetune``,
            ``router_loss_weight``, ``calibration_batches``, ``kmeans_iters``, ``split_step``,
            ``relufy``, ``buckets``, ``architecture``, ``plot``, ``seed`` (each documented on the
            config, with its default and allowed values).
        targets, exclude: unused by this technique (it splits every FFN the layout finds).
        name: distinguishes two instances (errors then say ``compress.<name>.<field>``).
        network: where the network lives in the LightningModule (see
            :class:`~lightcook.callbacks.base.CompressionCallback`).

    Raises:
        ValueError: in ``__init__``, a setting outside its allowed values (the message names
            ``compress.moe.<field>`` and lists them), e.g. ``top_k > num_experts``,
            ``shared_experts >= num_experts`` or ``shared_experts`` without ``split: carve``; in
            ``setup``, a network with no recognisable FFN and no ``architecture`` mapping (the message
            says where the network was looked for and mentions ``network``), ``num_experts`` not
            dividing an intermediate size, ``split: carve`` on an FFN without a gate projection
            (``compress.moe.split: ...``), or an FFN already split with other settings; at the split,
            no calibration batch.
        TypeError: in ``setup``, manual optimization while the routers are fine-tuned.

    Example:
        >>> cb = MoEficationCallback(num_experts=16, top_k=4, split="coactivation", router="centroid")
        >>> cb.config_key, cb.state["split_done"], cb.ffn_param_fraction
        ('compress.moe', False, 0.25)
        >>> MoEficationCallback(num_experts=8, top_k=9)
        Traceback (most recent call last):
        ...
        ValueError: compress.moe.top_k: must be <= num_experts (8), got 9
    """

    technique = "moe"
    order = 10
    config_class = MoEConfig

    def __init__(
        self,
        config: MoEConfig | None = None,
        *,
        targets: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        name: str | None = None,
        network: str | Callable[[nn.Module], nn.Module] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(targets=targets, exclude=exclude, name=name, network=network)
        self.config: MoEConfig = self.configure(config, options)
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

    @property
    def ffn_param_fraction(self) -> float:
        """Share of the FFN expert weights each token uses, shared plus routed experts:
        ``(shared_experts + top_k) / num_experts``."""
        return self.config.ffn_param_fraction

    @property
    def moe_modules(self) -> dict[str, MoEFFN]:
        """The MoE FFNs this callback installed, by name (after ``setup``)."""
        return dict(self._moes)

    @property
    @override
    def adds_loss(self) -> bool:
        """Only fine-tuned trainable routers (MLP, representative) add a loss term (``router``)."""
        return self.config.router_finetune and self.config.router in ("mlp", "representative")

    @override
    def prepare_model(self, trainer: Trainer | None, pl_module: LightningModule | nn.Module) -> None:
        """Replace every FFN of the network by a :class:`MoEFFN` (:func:`lightcook.ops.moe.prepare_`)."""
        network = self.network(pl_module)
        self._moes = self.named(prepare_, network, self.config, where=self.where(pl_module))

    # ------------------------------------------------------------------ the split

    def calibration_batches_of(self, trainer: Trainer) -> list[Any]:
        """The first ``calibration_batches`` batches of the trainer's training data, in dataset order,
        on the module's device (the same batches on every rank)."""
        count, owner = self.config.calibration_batches, f"{self.config_key}.calibration_batches"
        return list(calibration_batches(trainer, count, owner, ordered=True))

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.config.relufy and not self.state["relu_active"]:
            batches = self.calibration_batches_of(trainer)
            sparsity = self.named(measure_sparsity, self.network(pl_module), self._moes, batches)
            self.state["sparsity_before"] = sparsity
            for moe in self._moes.values():
                moe.set_relu(True)
            self.state["relu_active"] = True

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.state["split_done"] and trainer.global_step >= self.config.split_step:
            self.split_experts(pl_module, self.calibration_batches_of(trainer), trainer)
        for moe in self._moes.values():
            moe.load_counts.zero_()  # count this batch's training tokens only
            moe.aux_loss = None  # nothing left over from a forward outside the training step

    def split_experts(
        self, pl_module: LightningModule | nn.Module, batches: list[Any], trainer: Trainer | None = None
    ) -> None:
        """Partition every FFN, permute its neurons, fit the routers and turn routing on
        (:func:`lightcook.ops.moe.split_`).

        Called by the callback at ``split_step``; also usable without a Trainer (after
        :meth:`prepare_model`), e.g. to MoEfy a model for evaluation.

        Args:
            pl_module: the module (or network) prepared by :meth:`prepare_model`.
            batches: calibration batches (dicts of model inputs) on the model's device.
            trainer: supplies the optimizers (their moments are permuted too) and, under DDP, the
                broadcast of rank 0's partition and routers; ``None``: one process, no optimizer.

        Raises:
            ValueError: no calibration batch (``compress.moe.calibration_batches: ...``).
        """
        strategy = trainer.strategy if trainer is not None and trainer.world_size > 1 else None
        sync = (lambda objects: strategy.broadcast(objects, src=0)) if strategy is not None else None
        optimizers = trainer.optimizers if trainer is not None else []
        network = self.network(pl_module)
        outcome = self.named(
            split_, network, self._moes, self.config, batches, optimizers=optimizers, sync=sync
        )
        if self.state["sparsity_before"] is None:
            self.state["sparsity_before"] = outcome["sparsity"]
        self.state.update(
            split_done=True,
            split_at_step=trainer.global_step if trainer is not None else None,
            calibration_tokens=outcome["calibration_tokens"],
            sparsity_at_split=outcome["sparsity"],
            router_fit_loss=outcome["router_fit_loss"],
        )

    @override
    def loss_terms(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, outputs: Any
    ) -> dict[str, Tensor]:
        """``{"router": Σ router_loss_weight · router loss}`` over the MoE FFNs of this training step
        (a zero term before the split under DDP, so every router parameter is used); ``{}`` when none."""
        loss = router_aux_loss(self._moes.values())
        return {} if loss is None else {"router": loss}

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
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=batch_size_of(batch))

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        load = self._load_total
        if load is None:
            routed = self.config.num_experts - self.config.shared_experts
            load = torch.zeros(len(self._moes), routed, dtype=torch.long)
        device = next(pl_module.parameters()).device
        load = all_reduce_(load.to(device).double(), trainer).cpu()  # every rank's training tokens
        self.report = self._build_report(load)
        if trainer.is_global_zero and self._moes:
            run_dir = Path(trainer.default_root_dir)
            write_json_atomic(run_dir / REPORT, self.report)
            if self.config.plot:
                names = list(self._moes)
                save_figure(expert_load_figure(load.tolist(), names, "training tokens"), run_dir / HEATMAP)

    def _build_report(self, load: Tensor) -> dict[str, Any]:
        imbalance = _imbalance(load)
        return {
            "layers": list(self._moes),
            "num_experts": self.config.num_experts,
            "shared_experts": self.config.shared_experts,
            "top_k": self.config.top_k,
            "ffn_param_fraction": self.ffn_param_fraction,
            "router_param_fraction": _router_fraction(self._moes.values()),
            "state": dict(self.state),
            "load_imbalance": None if imbalance is None else [round(float(v), 4) for v in imbalance],
            "expert_load": load.long().tolist(),  # (layers, routed experts) training tokens
        }

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._moes and not self.state["split_done"]:
            rank_zero_warn(
                f"{self.config_key}: training ended at step {trainer.global_step}, before "
                f"split_step={self.config.split_step}: the FFNs were never split and route nothing"
            )

    @override
    def summary(self) -> dict[str, Any]:
        """The outcome: experts (of them shared), the share of FFN weights used per token (shared plus
        routed), whether and when the split happened, the routers' size and the mean load imbalance
        of training over the routed experts (1 = balanced)."""
        imbalance = self.report.get("load_imbalance")
        return {
            "num_experts": self.config.num_experts,
            "shared_experts": self.config.shared_experts,
            "top_k": self.config.top_k,
            "ffn_param_fraction": self.ffn_param_fraction,
            "router_param_fraction": _router_fraction(self._moes.values()),
            "layers": len(self._moes),
            "split_done": self.state["split_done"],
            "split_at_step": self.state["split_at_step"],
            "router_fit_loss": self.state["router_fit_loss"],
            "load_imbalance": round(sum(imbalance) / len(imbalance), 4) if imbalance else None,
        }


# --------------------------------------------------------------------------- helpers


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
        ffn += sum(cast(Tensor, m.weight).numel() for m in moe.projections)
    return round(router / max(1, ffn), 6)
