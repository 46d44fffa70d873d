"""Knowledge distillation from a frozen teacher into the model being trained: :class:`DistillationCallback`.

The module's own ``training_step`` always runs (its logging and extra loss terms intact): the base's
one loss wrapper (:func:`lightcook.callbacks.base.install_loss_hook`) captures what the student
network returned in it, then this callback runs the teacher on the same batch under ``no_grad`` and
adds the distillation terms, so the loss becomes ``task_scale * <the module's loss> + Σ scale_i *
kd_i``, each term logged (already weighted) as ``compress/kd/<term>`` (``logits``, ``hidden``,
``attention``, ``contrastive``). No ``compute_loss`` is needed; manual optimization is rejected in
``setup`` (the terms are added to the loss ``training_step`` returns). The configuration and the loss
math live in :mod:`lightcook.ops.distill` (:class:`~lightcook.ops.distill.KDConfig`,
:func:`~lightcook.ops.distill.prepare_`, :func:`~lightcook.ops.distill.distillation_terms`), usable
in a training loop of one's own.

The student is the network the base finds (``pl_module.model``, else the single Hugging Face model
inside the module, or ``network=``). The teacher is never a registered submodule of the student: it
is a plain attribute of this callback, so it is not in the checkpoint, not in ``parameters()`` (nor
the optimizer), and not inside the DDP wrapper. It is frozen, in eval mode, optionally cast to
bf16/fp16, and moved to the student's device in ``on_fit_start``.

Where the teacher comes from (``teacher``):

* ``"student"`` (default): the *uncompressed starting model*.
  - A module built from ``name_or_path`` (``CausalLMModule(name_or_path=...)``): the teacher is
    reloaded from that same source with the module's Auto class. Independent of the order of the
    other compression callbacks and of resuming: a resumed run distils from the original pretrained
    weights, never from the checkpoint.
  - A network with a Hugging Face config (random init, or a model object): the architecture is
    rebuilt from ``model.config`` and the student's tensors are copied in when this callback prepares
    the model (``setup``, before Lightning restores a checkpoint, so a resumed run gets the same
    seeded start). Compression callbacks prepare the model in the canonical order of
    :mod:`lightcook.callbacks.base` (distillation is 50, after MoEfication, structured pruning, N:M
    masks and fake-quant), and none of them changes weight values there: extra buffers they add
    (masks, scales) are ignored and ``torch.nn.utils.parametrize`` renames are undone. If one has
    moved weights so that they are missing from the rebuilt model, ``setup`` raises and names it:
    give ``teacher`` the original model's path.
  - A non-Hugging-Face network: a deep copy, taken only if no other compression callback has
    prepared the model yet (else the same error).
* a path or hub name: loaded with the student's Auto class (``AutoModelForCausalLM`` /
  ``AutoModelForSeq2SeqLM``). Its vocabulary must match the student's.

Hidden-state distillation uses BMCook-style maps ``"[post]student.module:[post]teacher.module"``
(``[post]``, the default, is the module's output; ``[pre]`` its first input), names relative to the
student network, captured with forward hooks around each step. When widths differ a learned
``nn.Linear`` (student → teacher width) per pair is added in ``setup`` as ``pl_module.kd_projections``
so the optimizer trains it and checkpoints save and restore it.

Attention-map distillation needs attention probabilities, which Hugging Face models return only with
*eager* attention: while fitting with ``attention_scale > 0`` both models are switched to
``attn_implementation="eager"`` (the student's setting is restored in ``teardown``). This is slower
than SDPA and uses O(T²) memory per layer.

Loss masks: for causal LMs real positions are ``attention_mask == 1`` and ``labels != -100`` (after
``pl_module.mask_padding`` when the module has it); for encoder-decoders decoder positions with
``labels != -100`` (encoder hidden states and attention use the encoder ``attention_mask``).

Example:
    >>> import tempfile, torch, lightning as L
    >>> from lightcook.modules import CausalLMModule
    >>> tiny = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
    ...         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    >>> module = CausalLMModule(config=tiny, tokenizer=None)
    >>> ids = torch.randint(0, 64, (4, 8))
    >>> data = torch.utils.data.DataLoader([{"input_ids": r, "labels": r} for r in ids], batch_size=2)
    >>> kd = DistillationCallback(temperature=2.0, hidden_scale=1.0, hidden_map=["model.layers.0:model.layers.1"])
    >>> trainer = L.Trainer(max_steps=2, callbacks=[kd], logger=False, enable_checkpointing=False,
    ...                     enable_progress_bar=False, enable_model_summary=False,
    ...                     default_root_dir=tempfile.mkdtemp())
    >>> trainer.fit(module, data)
    >>> sorted(k for k in trainer.callback_metrics if k.startswith("compress/kd"))
    ['compress/kd/hidden', 'compress/kd/logits']
    >>> any(p is q for p in module.parameters() for q in kd.teacher_model.parameters())
    False
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn
from typing_extensions import override

from lightcook.callbacks.base import CompressionCallback, compression_callbacks
from lightcook.ops.distill import (
    FINETUNE,
    HiddenPair,
    KDConfig,
    KDPlan,
    MemoryBank,
    capture_features,
    distillation_terms,
    is_encoder_decoder,
    parse_hidden_map,
    prepare_,
    real_positions,
    set_attention_implementation,
    starting_copy,
    teacher_inputs,
)

__all__ = ["DistillationCallback", "HiddenPair", "KDConfig", "parse_hidden_map"]


class DistillationCallback(CompressionCallback):
    """Add distillation losses from a frozen teacher to the module's own training loss (logits,
    hidden states, attention maps, token contrastive).

    The training loss becomes ``task_scale * <the module's loss> + logits_scale * kd_logits +
    hidden_scale * kd_hidden + attention_scale * kd_attention + contrastive_scale * kd_contrastive``;
    terms with scale 0 are not computed. Several hidden or attention pairs are averaged within their
    term.

    Args:
        config: a :class:`~lightcook.ops.distill.KDConfig`; or give its fields as keyword ``options``
            instead (not both). The fields, each documented in ``KDConfig``: ``teacher``
            (``"student"`` = the uncompressed starting model, see the module docstring, or a model
            path / hub name), ``teacher_dtype``, ``task_scale`` (weight of the module's own loss; 0:
            distillation only), ``logits_scale``, ``temperature``, ``hidden_scale``, ``hidden_map``
            (names relative to the student network), ``projection``, ``attention_scale``,
            ``attention_kind``, ``attention_layers``, ``contrastive_scale``,
            ``contrastive_temperature``, ``contrastive_negatives``, ``memory_bank_size`` (the bank is
            saved in the callback's checkpoint state, so a resumed run continues with it; under DDP
            each rank keeps its own bank, rank 0's is saved and every rank resumes with it).
        targets, exclude: not used by distillation (it selects no modules); giving them is an error.
        name: distinguishes two instances (checkpoint ``state_key``, config key ``compress.<name>``,
            projection attribute ``kd_projections_<name>``).
        network: where the student network lives in the LightningModule (an attribute path or a
            callable; see :class:`~lightcook.callbacks.base.CompressionCallback`).
        **options: ``KDConfig`` fields.

    Raises:
        ValueError: in ``__init__``, a field outside its allowed values, every distillation scale
            zero, ``hidden_scale > 0`` without ``hidden_map``, a malformed map entry, an unknown
            option, both ``config`` and options, or ``targets``/``exclude`` (messages name
            ``compress.kd.<field>``); in ``setup``, a mapped module missing from the student or the
            teacher, widths that differ with ``projection=False``, attention layers out of range, a
            teacher whose vocabulary or architecture family differs, or a ``teacher="student"`` that
            cannot be rebuilt because another compression callback already restructured the model.
        TypeError: ``config`` is not a ``KDConfig``; in ``setup``, a LightningModule with manual
            optimization.

    Example:
        >>> kd = DistillationCallback(temperature=2.0, hidden_scale=0.5,
        ...                           hidden_map=["model.layers.1:[post]model.layers.3"])
        >>> kd.config_key, kd.hidden_pairs[0].teacher, kd.config.shape()["memory_bank_size"]
        ('compress.kd', 'model.layers.3', 0)
        >>> DistillationCallback(KDConfig(temperature=2.0)).config.temperature
        2.0
    """

    technique = "kd"
    order = 50  # canonical order: last, after MoE splits (10), gates (20), masks (30), fake-quant (40)
    config_class = KDConfig

    def __init__(
        self,
        config: KDConfig | None = None,
        *,
        targets: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        name: str | None = None,
        network: str | Callable[[nn.Module], nn.Module] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(name=name, network=network)
        if targets is not None or exclude:
            raise self.fail(
                "targets" if targets is not None else "exclude",
                "distillation selects no modules (it adds loss terms over the whole network); "
                "drop targets/exclude and pair features with hidden_map",
            )
        self.config: KDConfig = self.configure(config, options)
        self.projection_attr = f"kd_projections_{name}" if name else "kd_projections"
        self.state = {"kd_steps": 0}  # training steps distilled (all ranks alike)
        self.plan: KDPlan | None = None  # resolved in setup: projections, layer pairs, mask sides
        self.bank = MemoryBank(self.config.memory_bank_size)
        self._teacher_model: nn.Module | None = None
        self._student_features: dict[tuple[str, str], Tensor] = {}
        self._saved_attention: str | None = None

    @contextlib.contextmanager
    def _prefixed(self) -> Iterator[None]:
        """Errors of the pure ops (``hidden_map[0]: ...``) get this callback's ``compress.<key>.`` prefix."""
        try:
            yield
        except (ValueError, RuntimeError) as err:
            if type(err) not in (ValueError, RuntimeError):
                raise
            raise type(err)(f"{self.config_key}.{err}") from None

    @property
    def hidden_pairs(self) -> list[HiddenPair]:
        """The parsed ``hidden_map``."""
        return self.config.hidden_pairs

    @property
    def active_terms(self) -> list[str]:
        """Distillation terms with a non-zero scale, in the order ``logits, hidden, attention, contrastive``."""
        return self.config.active_terms

    @property
    def teacher_model(self) -> nn.Module | None:
        """The frozen teacher network (built in ``setup``); never a submodule of the student."""
        return self._teacher_model

    # ------------------------------------------------------------------ setup: teacher and structure

    @override
    def prepare_model(self, trainer: Trainer, pl_module: LightningModule) -> None:
        teacher = self._build_teacher(trainer, pl_module)
        with self._prefixed():
            device = trainer.strategy.root_device if trainer is not None else None
            self.plan = prepare_(self.network(pl_module), teacher, self.config, device=device)
        self._teacher_model = teacher
        if len(self.plan.projections):
            self._register_projections(pl_module, self.plan.projections)

    def _build_teacher(self, trainer: Trainer, pl_module: LightningModule) -> nn.Module:
        if self.config.teacher == FINETUNE:
            raise self.fail(
                "teacher",
                f"{FINETUNE!r} is a stage of the app (python run.py ...: lightcook.app.stages fine-tunes "
                "the teacher first); in your own Trainer, fine-tune the dense model and pass its folder",
            )
        if self.config.teacher != "student":
            return self._load_pretrained(pl_module, self.config.teacher)
        source = (getattr(pl_module, "hparams", None) or {}).get("name_or_path")
        if source:
            return self._load_pretrained(pl_module, source)
        earlier = self._earlier_compressors(trainer, pl_module)
        try:
            return starting_copy(self.network(pl_module), rebuild_only=bool(earlier))
        except ValueError as err:
            raise self._order_error(earlier, str(err).removeprefix("teacher: ")) from None

    def _load_pretrained(self, pl_module: LightningModule, source: str) -> nn.Module:
        import transformers

        from lightcook.modules.hub import resolve_model_path

        auto_name = getattr(pl_module, "auto_class_name", None)
        if auto_name is None:
            seq2seq = is_encoder_decoder(self.network(pl_module))
            auto_name = "AutoModelForSeq2SeqLM" if seq2seq else "AutoModelForCausalLM"
        path = resolve_model_path(source, f"{self.config_key}.teacher")
        try:
            return getattr(transformers, auto_name).from_pretrained(path, dtype=torch.float32)
        except (OSError, ValueError) as err:
            raise self.fail(
                "teacher", f"cannot load {source!r} with {auto_name}: {str(err).splitlines()[0]}"
            ) from err

    def _earlier_compressors(self, trainer: Trainer | None, pl_module: LightningModule) -> list[str]:
        """Config keys of other compression callbacks whose ``setup`` already prepared ``pl_module``."""
        callbacks = compression_callbacks(getattr(trainer, "callbacks", None) or [])
        return [cb.config_key for cb in callbacks if cb is not self and cb._prepared_model == id(pl_module)]

    def _order_error(self, earlier: list[str], why: str) -> ValueError:
        names = ", ".join(earlier) or "another callback"
        return self.fail(
            "teacher",
            f"'student' must be the uncompressed starting model, but {names} (earlier in the canonical "
            f"order) already changed it in setup ({why}); set {self.config_key}.teacher to the original "
            "model's path, or build the module from model.name_or_path so the teacher is reloaded",
        )

    def _register_projections(self, pl_module: LightningModule, projections: nn.ModuleDict) -> None:
        """Add the projections to the LightningModule (checkpointed, in ``parameters()``, optimized)."""
        existing = getattr(pl_module, self.projection_attr, None)
        holder = existing if isinstance(existing, nn.ModuleDict) else nn.ModuleDict()
        reference = next(self.network(pl_module).parameters(), None)
        for key, layer in projections.items():
            if key not in holder:
                holder[key] = layer if reference is None else layer.to(reference.device, reference.dtype)
        setattr(pl_module, self.projection_attr, holder)

    def projection_module(self, pl_module: LightningModule, key: str) -> nn.Module:
        """The learned projection ``key`` (``hidden_<i>`` or ``contrastive``), identity when widths match."""
        holder = getattr(pl_module, self.projection_attr, None)
        return holder[key] if holder is not None and key in holder else nn.Identity()

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)  # prepares every compression callback once, in order
        if stage == "fit" and self.config.attention_scale and self._saved_attention is None:
            self._saved_attention = set_attention_implementation(self.network(pl_module), "eager")

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self._teacher_model is not None:
            self._teacher_model.to(pl_module.device)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if stage == "fit" and self._saved_attention is not None:
            set_attention_implementation(self.network(pl_module), self._saved_attention)
            self._saved_attention = None

    # ------------------------------------------------------------------ the loss hook

    @override
    def network_kwargs(self) -> dict[str, Any]:
        return dict(self.config.forward_kwargs())

    @override
    def task_scale(self) -> float:
        return float(self.config.task_scale)

    @override
    def step_context(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any
    ) -> contextlib.AbstractContextManager:
        self._student_features = {}
        points = self.config.student_points
        return self._capture_student(pl_module, points) if points else contextlib.nullcontext()

    @contextlib.contextmanager
    def _capture_student(self, pl_module: LightningModule, points: list[tuple[str, str]]) -> Iterator[None]:
        with capture_features(self.network(pl_module), points) as features:
            self._student_features = features
            yield

    @override
    def loss_terms(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, outputs: Any
    ) -> dict[str, Tensor]:
        if outputs is None or self.plan is None:
            raise RuntimeError(
                f"{self.config_key}: the student network was not called in training_step, so there are "
                f"no student outputs to distil ({self.where(pl_module)})"
            )
        student = self.network(pl_module)
        labels = self._labels(pl_module, batch)
        t_out, t_feats = self._teacher_forward(student, batch, labels)
        with self._prefixed():
            terms = distillation_terms(
                self.config,
                self.plan,
                outputs,
                t_out,
                real_positions(batch, labels, self.plan.encoder_decoder),
                student_features=self._student_features,
                teacher_features=t_feats,
                projections=getattr(pl_module, self.projection_attr, None) or {},
                token_ids=batch["input_ids"],
                bank=self.bank,
            )
        self._student_features = {}
        self.state["kd_steps"] += 1
        return terms

    @torch.no_grad()
    def _teacher_forward(
        self, student: nn.Module, batch: dict[str, Tensor], labels: Tensor | None
    ) -> tuple[Any, dict]:
        teacher = self._teacher_model
        assert teacher is not None  # built in setup, before any training step
        device = batch["input_ids"].device
        if next(teacher.parameters()).device != device:
            teacher.to(device)
        with capture_features(teacher, self.config.teacher_points) as feats:
            outputs = teacher(
                **teacher_inputs(batch, student, teacher, labels), **self.config.forward_kwargs()
            )
        return outputs, feats

    @staticmethod
    def _labels(pl_module: LightningModule, batch: dict[str, Tensor]) -> Tensor | None:
        mask_padding = getattr(pl_module, "mask_padding", None)
        masked = mask_padding(batch) if callable(mask_padding) else batch
        return masked.get("labels")

    # ------------------------------------------------------------------ state and summary

    @override
    def state_dict(self) -> dict[str, Any]:
        """The primitive counters and config, plus the contrastive memory bank (a CPU tensor) when filling."""
        state = super().state_dict()
        if self.bank.tensor is not None:
            state["memory_bank"] = self.bank.tensor.detach().cpu()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        self.bank = MemoryBank(self.config.memory_bank_size, state.pop("memory_bank", None))
        super().load_state_dict(state)

    @override
    def summary(self) -> dict[str, Any]:
        return {
            "teacher": self.config.teacher,
            "terms": self.active_terms,
            "kd_steps": self.state["kd_steps"],
        }
