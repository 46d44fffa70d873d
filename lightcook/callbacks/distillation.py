"""Knowledge distillation from a frozen teacher into the model being trained: :class:`DistillationCallback`.

A Lightning callback cannot replace the loss, so in ``setup`` this callback wraps the module's
``training_step`` (one instance, restored in ``teardown``). The wrapped step computes the task loss
with ``pl_module.compute_loss(batch)``, runs the teacher on the same batch under ``no_grad``, and
returns ``task_scale * task + Σ scale_i * kd_i``, logging every term (``train/task_loss``,
``train/kd_logits``, ``train/kd_hidden``, ``train/kd_attention``, ``train/kd_contrastive``) and the
total as ``train/loss``. The loss math lives in :mod:`lightcook.ops.distill`. The wrapped step calls
``compute_loss`` itself, not a ``training_step`` installed before it: callbacks that add to the loss
wrap later, at ``on_fit_start``, around this one (as ``StructuredPruningCallback`` does).

The teacher is never a registered submodule of the student: it is a plain attribute of this callback,
so it is not in the checkpoint, not in ``parameters()`` (nor the optimizer), and not inside the DDP
wrapper. It is frozen, in eval mode, optionally cast to bf16/fp16, and moved to the student's device
in ``on_fit_start``.

Where the teacher comes from (``teacher``):

* ``"student"`` (default): the *uncompressed starting model*.
  - A module built from ``name_or_path`` (``CausalLMModule(name_or_path=...)``): the teacher is
    reloaded from that same source with the module's Auto class. Independent of the order of the
    other compression callbacks and of resuming: a resumed run distils from the original pretrained
    weights, never from the checkpoint.
  - A module built from a ``config`` (random init) or a Hugging Face model object: the architecture is
    rebuilt from ``model.config`` and the student's tensors are copied in when this callback prepares
    the model (``setup``, before Lightning restores a checkpoint, so a resumed run gets the same
    seeded start). Compression callbacks prepare the model in the canonical order of
    :mod:`lightcook.callbacks.base` (distillation is 50, after MoEfication, structured pruning, N:M
    masks and fake-quant), and none of them changes weight values there: extra buffers they add
    (masks, scales) are ignored and ``torch.nn.utils.parametrize`` renames are undone. If one has
    moved weights so that they are missing from the rebuilt model, ``setup`` raises and names it:
    give ``teacher`` the original model's path.
  - A non-Hugging-Face model object: a deep copy, taken only if no other compression callback has
    prepared the model yet (else the same error).
* a path or hub name: loaded with the student's Auto class (``AutoModelForCausalLM`` /
  ``AutoModelForSeq2SeqLM``). Its vocabulary must match the student's.

Hidden-state distillation uses BMCook-style maps ``"[post]student.module:[post]teacher.module"``
(``[post]``, the default, is the module's output; ``[pre]`` its first input), names relative to
``pl_module.model``, captured with forward hooks registered around each step. When widths differ a
learned ``nn.Linear`` (student → teacher width) per pair is added in ``setup`` as
``pl_module.kd_projections`` so the optimizer trains it and checkpoints save and restore it.

Attention-map distillation needs attention probabilities, which Hugging Face models return only with
*eager* attention: while fitting with ``attention_scale > 0`` both models are switched to
``attn_implementation="eager"`` (the student's setting is restored in ``teardown``). This is slower
than SDPA and uses O(T²) memory per layer.

Loss masks: for causal LMs real positions are ``attention_mask == 1`` and ``labels != -100`` (after
``pl_module.mask_padding``); for encoder-decoders decoder positions with ``labels != -100`` (encoder
hidden states and attention use the encoder ``attention_mask``).

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
    >>> sorted(k for k in trainer.callback_metrics if k.startswith("train/kd"))
    ['train/kd_hidden', 'train/kd_logits']
    >>> any(p is q for p in module.parameters() for q in kd.teacher_model.parameters())
    False
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn
from typing_extensions import override

from lightcook.callbacks.base import CompressionCallback, target_model
from lightcook.ops.distill import (
    ATTENTION_KINDS,
    NEGATIVES,
    attention_loss,
    hidden_mse,
    kd_logits_loss,
    token_contrastive_loss,
    uniform_layer_map,
)

IGNORE_INDEX = -100
TEACHER_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
POINTS = ("pre", "post")
TERMS = ("logits", "hidden", "attention", "contrastive")
_MAP_SIDE = re.compile(r"^\s*(?:\[(?P<point>[a-z]+)\])?\s*(?P<name>[^\s:\[\]]+)\s*$")
_PAIR = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_PARAMETRIZED = re.compile(r"\.parametrizations\.([^.]+)\.original$")


# --------------------------------------------------------------------------- configuration parsing


@dataclass(frozen=True)
class HiddenPair:
    """One hidden-state mapping: ``[point]student_name : [point]teacher_name``."""

    student: str
    student_point: str
    teacher: str
    teacher_point: str


def parse_hidden_map(entries: Sequence[str], key: str = "compress.kd.hidden_map") -> list[HiddenPair]:
    """Parse ``"[post]model.layers.1:[pre]model.layers.3"`` entries (``[post]`` when omitted).

    Raises:
        ValueError: an entry without exactly one ``:``, an empty side or an unknown ``[point]``;
            the message names ``key[i]``.

    Example:
        >>> parse_hidden_map(["model.layers.0:[pre]model.layers.2"])[0]
        HiddenPair(student='model.layers.0', student_point='post', teacher='model.layers.2', teacher_point='pre')
    """
    if isinstance(entries, str):
        entries = [entries]
    pairs = []
    for i, entry in enumerate(entries):
        sides = str(entry).split(":")
        matches = [_MAP_SIDE.match(side) for side in sides]
        if len(sides) != 2 or not all(matches):
            raise ValueError(
                f"{key}[{i}]: {entry!r} is not '[post]student.module:[post]teacher.module' "
                "([pre] = module input, [post] = output, default post)"
            )
        (s_point, s_name), (t_point, t_name) = ((m["point"] or "post", m["name"]) for m in matches)
        for point in (s_point, t_point):
            if point not in POINTS:
                raise ValueError(f"{key}[{i}]: unknown point [{point}] in {entry!r}; allowed: [pre], [post]")
        pairs.append(HiddenPair(s_name, s_point, t_name, t_point))
    return pairs


def parse_layer_pairs(spec: str | Sequence[str], key: str) -> str | list[tuple[int, int]]:
    """``"uniform"`` or a list of ``"student_layer:teacher_layer"`` index pairs.

    Raises:
        ValueError: anything else; the message names ``key``.
    """
    if spec == "uniform":
        return spec
    if isinstance(spec, str) or not spec:
        raise ValueError(f"{key}: expected 'uniform' or a non-empty list like ['0:1', '1:3'], got {spec!r}")
    pairs = []
    for i, item in enumerate(spec):
        match = _PAIR.match(str(item))
        if not match:
            raise ValueError(f"{key}[{i}]: expected 'student_layer:teacher_layer' (e.g. '1:3'), got {item!r}")
        pairs.append((int(match[1]), int(match[2])))
    return pairs


# --------------------------------------------------------------------------- model helpers


def model_width(model: nn.Module) -> int | None:
    """Hidden size from a Hugging Face config (``hidden_size``, ``d_model`` or ``n_embd``)."""
    config = getattr(model, "config", None)
    for attr in ("hidden_size", "d_model", "n_embd"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


def feature_width(model: nn.Module, name: str, point: str) -> int | None:
    """Channels of a module's output (``post``) or input (``pre``), inferred without a forward pass.

    Linear-like modules give ``out_features``/``in_features``, embeddings their dimension, norms the
    size of their 1-D weight; anything else (a decoder layer, a block) the model's hidden size.
    """
    module = model.get_submodule(name)
    attr = "out_features" if point == "post" else "in_features"
    if isinstance(getattr(module, attr, None), int):
        return getattr(module, attr)
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, Tensor):
        return weight.shape[1] if point == "post" else weight.shape[0]  # weight is (in, out)
    if isinstance(module, nn.Embedding):
        return module.embedding_dim if point == "post" else None
    if isinstance(weight, Tensor) and weight.dim() == 1:
        return weight.numel()
    return model_width(model)


def vocab_size(model: nn.Module) -> int | None:
    """Number of output logits (LM head rows), else ``config.vocab_size``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, Tensor):
        return weight.shape[0]
    return getattr(getattr(model, "config", None), "vocab_size", None)


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether ``model`` is an encoder-decoder (T5, BART)."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _config_int(model: nn.Module, *names: str) -> int | None:
    """The first of ``names`` that the model's config holds as an integer."""
    config = getattr(model, "config", None)
    return next((getattr(config, n) for n in names if isinstance(getattr(config, n, None), int)), None)


def _layer_counts(model: nn.Module) -> dict[str, int | None]:
    """Attention layers per output field: ``attentions`` or ``encoder_/decoder_attentions``."""
    if is_encoder_decoder(model):
        return {
            "encoder_attentions": _config_int(model, "num_layers", "encoder_layers", "num_hidden_layers"),
            "decoder_attentions": _config_int(model, "num_decoder_layers", "decoder_layers", "num_layers"),
        }
    return {"attentions": _config_int(model, "num_hidden_layers", "n_layer", "num_layers")}


def _set_attention(model: nn.Module, implementation: str) -> str | None:
    """Switch a Hugging Face model's attention implementation; return the previous one."""
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    if previous == implementation or config is None:
        return previous
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
    else:
        config._attn_implementation = implementation
    return previous


def _first_tensor(value: Any) -> Tensor | None:
    """The tensor in a module's output/input: itself, the first of a tuple, or the first dict value."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return next((v for v in value if isinstance(v, Tensor)), None)
    return None


def _store_output(store: dict, key: tuple[str, str]) -> Any:
    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        store[key] = _first_tensor(output)

    return hook


def _store_input(store: dict, key: tuple[str, str]) -> Any:
    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        store[key] = _first_tensor(list(args) or kwargs)

    return hook


@contextlib.contextmanager
def capture_features(
    model: nn.Module, points: Sequence[tuple[str, str]]
) -> Iterator[dict[tuple[str, str], Tensor]]:
    """Record module outputs (``post``) or first inputs (``pre``) during a forward pass.

    Yields a dict ``(name, point) -> tensor`` filled as the forward runs (last call wins); the hooks
    are removed on exit.
    """
    store: dict[tuple[str, str], Tensor] = {}
    handles = []
    for name, point in points:
        module = model.get_submodule(name)
        if point == "post":
            handles.append(module.register_forward_hook(_store_output(store, (name, point))))
        else:
            handles.append(
                module.register_forward_pre_hook(_store_input(store, (name, point)), with_kwargs=True)
            )
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------- the callback


class DistillationCallback(CompressionCallback):
    """Add distillation losses from a frozen teacher to the training loss (logits, hidden states,
    attention maps, token contrastive).

    The training loss becomes ``task_scale * task + logits_scale * kd_logits + hidden_scale * kd_hidden
    + attention_scale * kd_attention + contrastive_scale * kd_contrastive``; terms with scale 0 are
    not computed. Several hidden or attention pairs are averaged within their term.

    Args:
        teacher: ``"student"`` (the uncompressed starting model; see the module docstring for how it
            is obtained) or a model path / hub name, loaded with the student's Auto class.
        teacher_dtype: ``None`` (keep float32), ``"bfloat16"``/``"bf16"`` or ``"float16"``/``"fp16"``.
        task_scale: weight of the task loss from ``pl_module.compute_loss`` (0: distillation only).
        logits_scale: weight of ``T² · KL(teacher ‖ student)`` over real tokens.
        temperature: softmax temperature ``T`` of the logits term.
        hidden_scale: weight of the hidden-state MSE term.
        hidden_map: ``"[post]student.module:[post]teacher.module"`` entries (``[pre]`` = module input),
            names relative to ``pl_module.model``; required when ``hidden_scale > 0``.
        projection: add a learned Linear (student → teacher width) where widths differ; with
            ``False`` differing widths are an error.
        attention_scale: weight of the attention-map term (switches both models to eager attention).
        attention_kind: ``"mse"`` (squared error per row) or ``"kl"`` (``KL(teacher ‖ student)`` per row).
        attention_layers: ``"uniform"`` (student layer ``i`` ↔ teacher layer ``⌊(i+1)·Lt/Ls⌋-1``,
            identity when depths match) or a list of ``"student_layer:teacher_layer"`` pairs; applied
            to the decoder stack and, for encoder-decoders, to the encoder stack too.
        contrastive_scale: weight of token-level contrastive distillation (Tao et al., ACL 2022) on
            the last hidden states.
        contrastive_temperature: InfoNCE temperature.
        contrastive_negatives: ``"sequence"`` (other tokens of the same sequence) or ``"batch"``.
        memory_bank_size: extra negatives: teacher token representations from earlier steps (0: off).
            The bank is saved in the callback's checkpoint state, so a resumed run continues with it
            (under DDP each rank keeps its own bank; rank 0's is saved and every rank resumes with it).
        name: distinguishes two instances (checkpoint ``state_key``, config key ``compress.<name>``,
            projection attribute ``kd_projections_<name>``).

    Raises:
        ValueError: in ``__init__``, an argument outside its allowed values, every distillation scale
            zero, ``hidden_scale > 0`` without ``hidden_map``, or a malformed map entry (messages name
            ``compress.kd.<arg>``); in ``setup``, a mapped module missing from the student or the
            teacher, widths that differ with ``projection=False``, attention layers out of range, a
            teacher whose vocabulary or architecture family differs, or a ``teacher="student"`` that
            cannot be rebuilt because another compression callback already restructured the model.
        TypeError: in ``setup``, a LightningModule without ``compute_loss`` or with manual optimization.

    Example:
        >>> kd = DistillationCallback(temperature=2.0, hidden_scale=0.5,
        ...                           hidden_map=["model.layers.1:[post]model.layers.3"])
        >>> kd.config_key, kd.hidden_pairs[0].teacher
        ('compress.kd', 'model.layers.3')
    """

    order = 50  # canonical order: last, after MoE splits (10), gates (20), masks (30), fake-quant (40)

    def __init__(
        self,
        teacher: str = "student",
        teacher_dtype: str | None = None,
        task_scale: float = 1.0,
        logits_scale: float = 1.0,
        temperature: float = 1.0,
        hidden_scale: float = 0.0,
        hidden_map: Sequence[str] = (),
        projection: bool = True,
        attention_scale: float = 0.0,
        attention_kind: str = "mse",
        attention_layers: str | Sequence[str] = "uniform",
        contrastive_scale: float = 0.0,
        contrastive_temperature: float = 0.1,
        contrastive_negatives: str = "sequence",
        memory_bank_size: int = 0,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        self.config_key = f"compress.{name or 'kd'}"
        self.projection_attr = f"kd_projections_{name}" if name else "kd_projections"
        self.teacher, self.teacher_dtype, self.projection = teacher, teacher_dtype, projection
        self.task_scale = task_scale
        self.scales = {
            "logits": logits_scale,
            "hidden": hidden_scale,
            "attention": attention_scale,
            "contrastive": contrastive_scale,
        }
        self.temperature, self.attention_kind = temperature, attention_kind
        self.contrastive_temperature, self.contrastive_negatives = (
            contrastive_temperature,
            contrastive_negatives,
        )
        self.memory_bank_size = memory_bank_size
        self._check_teacher_args()
        self._check_scales()
        self._check_choices()
        self.hidden_pairs = parse_hidden_map(hidden_map, f"{self.config_key}.hidden_map")
        self.attention_layers = parse_layer_pairs(attention_layers, f"{self.config_key}.attention_layers")
        if hidden_scale > 0 and not self.hidden_pairs:
            raise self._fail(
                "hidden_map", "hidden_scale > 0 needs at least one '[post]student:[post]teacher' entry"
            )
        self.state = {"kd_steps": 0}  # wrapped training steps run (all ranks alike)
        self._teacher_model: nn.Module | None = None
        self._attention_pairs: dict[str, list[tuple[int, int]]] = {}
        self._hidden_sides: list[str] = []  # "encoder" / "decoder" mask per hidden pair
        self._saved_step: Any = None
        self._saved_attention: str | None = None
        self._bank: Tensor | None = None

    # ------------------------------------------------------------------ argument checks

    def _fail(self, arg: str, message: str) -> ValueError:
        return ValueError(f"{self.config_key}.{arg}: {message}")

    def _check_teacher_args(self) -> None:
        if not isinstance(self.teacher, str) or not self.teacher.strip():
            raise self._fail("teacher", f"'student' or a model path/name, got {self.teacher!r}")
        if self.teacher_dtype is not None and self.teacher_dtype not in TEACHER_DTYPES:
            raise self._fail(
                "teacher_dtype", f"got {self.teacher_dtype!r}, allowed: null, {', '.join(TEACHER_DTYPES)}"
            )
        if not isinstance(self.projection, bool):
            raise self._fail("projection", f"must be true or false, got {self.projection!r}")

    def _check_scales(self) -> None:
        for arg, value in [("task_scale", self.task_scale)] + [
            (f"{k}_scale", v) for k, v in self.scales.items()
        ]:
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise self._fail(arg, f"must be a finite number >= 0, got {value!r}")
        if not any(self.scales.values()):
            raise ValueError(
                f"{self.config_key}: every distillation scale is 0 (logits_scale, hidden_scale, attention_scale, "
                "contrastive_scale); set at least one > 0 or drop kd from compress"
            )

    def _check_choices(self) -> None:
        for arg, value in (
            ("temperature", self.temperature),
            ("contrastive_temperature", self.contrastive_temperature),
        ):
            if not isinstance(value, int | float) or not value > 0:
                raise self._fail(arg, f"must be > 0, got {value!r}")
        if self.attention_kind not in ATTENTION_KINDS:
            raise self._fail(
                "attention_kind", f"got {self.attention_kind!r}, allowed: {', '.join(ATTENTION_KINDS)}"
            )
        if self.contrastive_negatives not in NEGATIVES:
            raise self._fail(
                "contrastive_negatives",
                f"got {self.contrastive_negatives!r}, allowed: {', '.join(NEGATIVES)}",
            )
        if not isinstance(self.memory_bank_size, int) or self.memory_bank_size < 0:
            raise self._fail(
                "memory_bank_size", f"must be an integer >= 0 (0: off), got {self.memory_bank_size!r}"
            )

    @property
    def active_terms(self) -> list[str]:
        """Distillation terms with a non-zero scale, in the order ``logits, hidden, attention, contrastive``."""
        return [term for term in TERMS if self.scales[term] > 0]

    @property
    def teacher_model(self) -> nn.Module | None:
        """The frozen teacher network (built in ``setup``); never a submodule of the student."""
        return self._teacher_model

    # ------------------------------------------------------------------ setup: teacher and structure

    @override
    def prepare_model(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check_module(pl_module)
        teacher = self._build_teacher(trainer, pl_module)
        self._check_compatible(target_model(pl_module), teacher)
        self._teacher_model = teacher
        projections = self._hidden_projections(pl_module) | self._contrastive_projection(pl_module)
        self._resolve_attention(pl_module)
        if projections:
            self._register_projections(pl_module, projections)

    def _check_module(self, pl_module: LightningModule) -> None:
        if not callable(getattr(pl_module, "compute_loss", None)):
            raise TypeError(
                f"{self.config_key}: {type(pl_module).__name__} has no compute_loss(batch) -> (loss, outputs); "
                "use lightcook.modules.CausalLMModule / Seq2SeqLMModule or add one"
            )
        if not pl_module.automatic_optimization:
            raise TypeError(
                f"{self.config_key}: manual optimization is not supported (the loss is returned by training_step)"
            )

    def _build_teacher(self, trainer: Trainer, pl_module: LightningModule) -> nn.Module:
        if self.teacher == "student":
            teacher = self._starting_model(trainer, pl_module)
        else:
            teacher = self._load_pretrained(pl_module, self.teacher)
        teacher.eval().requires_grad_(False)
        if self.teacher_dtype is not None:
            teacher.to(TEACHER_DTYPES[self.teacher_dtype])
        return teacher

    def _load_pretrained(self, pl_module: LightningModule, source: str) -> nn.Module:
        import transformers

        from lightcook.modules.hub import resolve_model_path

        auto_name = getattr(pl_module, "auto_class_name", None)
        if auto_name is None:
            auto_name = (
                "AutoModelForSeq2SeqLM"
                if is_encoder_decoder(target_model(pl_module))
                else "AutoModelForCausalLM"
            )
        path = resolve_model_path(source, f"{self.config_key}.teacher")
        try:
            return getattr(transformers, auto_name).from_pretrained(path, dtype=torch.float32)
        except (OSError, ValueError) as err:
            raise self._fail(
                "teacher", f"cannot load {source!r} with {auto_name}: {str(err).splitlines()[0]}"
            ) from err

    def _starting_model(self, trainer: Trainer, pl_module: LightningModule) -> nn.Module:
        """The uncompressed starting model: reloaded from its source, rebuilt, or deep-copied."""
        source = (getattr(pl_module, "hparams", None) or {}).get("name_or_path")
        if source:
            return self._load_pretrained(pl_module, source)
        student = target_model(pl_module)
        if getattr(student, "config", None) is not None and hasattr(type(student), "config_class"):
            return self._rebuild(trainer, pl_module, student)
        earlier = self._earlier_compressors(trainer, pl_module)
        if earlier:
            raise self._order_error(earlier, "it is not a Hugging Face model, so it can only be deep-copied")
        return copy.deepcopy(student)

    def _rebuild(self, trainer: Trainer, pl_module: LightningModule, student: nn.Module) -> nn.Module:
        """A fresh instance of the student's class from its config, holding the student's tensors."""
        fresh = type(student)(copy.deepcopy(student.config))
        state = {_PARAMETRIZED.sub(r".\1", k): v for k, v in student.state_dict().items()}
        missing, _unexpected = fresh.load_state_dict(state, strict=False)  # extra buffers (masks) are fine
        if missing:
            earlier = self._earlier_compressors(trainer, pl_module)
            raise self._order_error(
                earlier, f"its weights {missing[:3]} are no longer where the config puts them"
            )
        return fresh

    def _earlier_compressors(self, trainer: Trainer | None, pl_module: LightningModule) -> list[str]:
        """Config keys of other compression callbacks whose ``setup`` already prepared ``pl_module``."""
        callbacks = getattr(trainer, "callbacks", None) or []
        return [
            cb.config_key
            for cb in callbacks
            if isinstance(cb, CompressionCallback) and cb is not self and cb._prepared_model == id(pl_module)
        ]

    def _order_error(self, earlier: list[str], why: str) -> ValueError:
        names = ", ".join(earlier) or "another callback"
        return self._fail(
            "teacher",
            f"'student' must be the uncompressed starting model, but {names} (earlier in the canonical "
            f"order) already changed it in setup ({why}); set {self.config_key}.teacher to the original "
            "model's path, or build the module from model.name_or_path so the teacher is reloaded",
        )

    def _check_compatible(self, student: nn.Module, teacher: nn.Module) -> None:
        s_vocab, t_vocab = vocab_size(student), vocab_size(teacher)
        if s_vocab is not None and t_vocab is not None and s_vocab != t_vocab:
            raise self._fail(
                "teacher",
                f"vocabulary mismatch: teacher {self.teacher!r} has {t_vocab} tokens, the student {s_vocab}; "
                "teacher and student must share one tokenizer",
            )
        if is_encoder_decoder(student) != is_encoder_decoder(teacher):
            kinds = ["decoder-only", "encoder-decoder"]
            raise self._fail(
                "teacher",
                f"the teacher is {kinds[is_encoder_decoder(teacher)]} but the student is {kinds[is_encoder_decoder(student)]}",
            )

    # ------------------------------------------------------------------ setup: maps and projections

    def _check_names(self, model: nn.Module, side: str) -> None:
        names = dict(model.named_modules())
        for i, pair in enumerate(self.hidden_pairs):
            name = getattr(pair, side)
            if name not in names:
                sample = ", ".join(n for n in list(names)[1:] if n.count(".") <= 2)[:200]
                raise self._fail(
                    f"hidden_map[{i}]", f"the {side} has no module {name!r} (modules look like: {sample})"
                )

    def _hidden_projections(self, pl_module: LightningModule) -> dict[str, nn.Linear]:
        if not self.scales["hidden"]:
            return {}
        student, teacher = target_model(pl_module), self._teacher_model
        self._check_names(student, "student")
        self._check_names(teacher, "teacher")
        encoder_prefix = self._encoder_prefix(student)
        self._hidden_sides = [
            "encoder" if encoder_prefix and (p.student + ".").startswith(encoder_prefix + ".") else "decoder"
            for p in self.hidden_pairs
        ]
        projections = {}
        for i, pair in enumerate(self.hidden_pairs):
            s_width = feature_width(student, pair.student, pair.student_point)
            t_width = feature_width(teacher, pair.teacher, pair.teacher_point)
            layer = self._projection_for(f"hidden_map[{i}]", s_width, t_width)
            if layer is not None:
                projections[f"hidden_{i}"] = layer
        return projections

    @staticmethod
    def _encoder_prefix(model: nn.Module) -> str | None:
        if not is_encoder_decoder(model) or not hasattr(model, "get_encoder"):
            return None
        encoder = model.get_encoder()
        return next((name for name, m in model.named_modules() if m is encoder and name), None)

    def _projection_for(self, arg: str, s_width: int | None, t_width: int | None) -> nn.Linear | None:
        if s_width is None or t_width is None:
            raise self._fail(
                arg, "cannot infer the feature width of a mapped module; map layer outputs, Linears or norms"
            )
        if s_width == t_width:
            return None
        if not self.projection:
            raise self._fail(
                arg,
                f"widths differ (student {s_width}, teacher {t_width}) and {self.config_key}.projection is false",
            )
        return nn.Linear(s_width, t_width)

    def _contrastive_projection(self, pl_module: LightningModule) -> dict[str, nn.Linear]:
        if not self.scales["contrastive"]:
            return {}
        layer = self._projection_for(
            "contrastive_scale", model_width(target_model(pl_module)), model_width(self._teacher_model)
        )
        return {"contrastive": layer} if layer is not None else {}

    def _register_projections(self, pl_module: LightningModule, projections: dict[str, nn.Linear]) -> None:
        """Add the projections to the LightningModule (checkpointed, in ``parameters()``, optimized)."""
        existing = getattr(pl_module, self.projection_attr, None)
        holder = existing if isinstance(existing, nn.ModuleDict) else nn.ModuleDict()
        reference = next(target_model(pl_module).parameters(), None)
        for key, layer in projections.items():
            if key not in holder:
                holder[key] = layer if reference is None else layer.to(reference.device, reference.dtype)
        setattr(pl_module, self.projection_attr, holder)

    def projection_module(self, pl_module: LightningModule, key: str) -> nn.Module:
        """The learned projection ``key`` (``hidden_<i>`` or ``contrastive``), identity when widths match."""
        holder = getattr(pl_module, self.projection_attr, None)
        return holder[key] if holder is not None and key in holder else nn.Identity()

    def _resolve_attention(self, pl_module: LightningModule) -> None:
        if not self.scales["attention"]:
            return
        s_counts, t_counts = _layer_counts(target_model(pl_module)), _layer_counts(self._teacher_model)
        for field, s_layers in s_counts.items():
            t_layers = t_counts.get(field)
            if not s_layers or not t_layers:
                raise self._fail(
                    "attention_scale", f"cannot tell how many attention layers the models have ({field})"
                )
            pairs = (
                uniform_layer_map(s_layers, t_layers)
                if self.attention_layers == "uniform"
                else self.attention_layers
            )
            for s, t in pairs:
                if not (0 <= s < s_layers and 0 <= t < t_layers):
                    raise self._fail(
                        "attention_layers",
                        f"pair {s}:{t} is out of range ({field}: student has {s_layers} layers, teacher {t_layers})",
                    )
            self._attention_pairs[field] = list(pairs)

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)  # prepare_model once: teacher, checks, projections
        if stage != "fit":
            return
        if self.scales["attention"]:
            _set_attention(self._teacher_model, "eager")
            self._saved_attention = _set_attention(target_model(pl_module), "eager")
        self._wrap(pl_module)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._teacher_model.to(pl_module.device)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._unwrap(pl_module)
        if self._saved_attention is not None:
            _set_attention(target_model(pl_module), self._saved_attention)
            self._saved_attention = None

    def _wrap(self, pl_module: LightningModule) -> None:
        current = pl_module.__dict__.get("training_step")
        if getattr(current, "_kd_owner", None) is self:
            return
        self._saved_step = current

        def training_step(batch: dict[str, Tensor], batch_idx: int) -> Tensor:
            return self.distillation_step(pl_module, batch, batch_idx)

        training_step._kd_owner = self  # type: ignore[attr-defined]
        pl_module.training_step = training_step  # an instance attribute: other modules are untouched

    def _unwrap(self, pl_module: LightningModule) -> None:
        if getattr(pl_module.__dict__.get("training_step"), "_kd_owner", None) is not self:
            return
        if self._saved_step is None:
            del pl_module.training_step  # the class's method shows through again
        else:
            pl_module.training_step = self._saved_step
        self._saved_step = None

    # ------------------------------------------------------------------ the wrapped training step

    def distillation_step(
        self, pl_module: LightningModule, batch: dict[str, Tensor], batch_idx: int
    ) -> Tensor:
        """The wrapped ``training_step``: task loss + scaled distillation terms, each logged."""
        flags = self._output_flags()
        student_points = (
            [(p.student, p.student_point) for p in self.hidden_pairs] if self.scales["hidden"] else []
        )
        with capture_features(target_model(pl_module), student_points) as s_feats:
            task, s_out = pl_module.compute_loss({**batch, **flags})
        t_out, t_feats = self._teacher_forward(pl_module, batch, flags)
        masks = self._masks(pl_module, batch)
        terms = self._terms(pl_module, batch, masks, (s_out, s_feats), (t_out, t_feats))
        loss = sum((self.scales[k] * v for k, v in terms.items()), start=self._task_part(task))
        self._log(pl_module, batch, task, terms, loss)
        self.state["kd_steps"] += 1
        return loss

    def _output_flags(self) -> dict[str, bool]:
        flags = {}
        if self.scales["attention"]:
            flags["output_attentions"] = True
        if self.scales["contrastive"]:
            flags["output_hidden_states"] = True
        return flags

    def _task_part(self, task: Tensor | None) -> Tensor | float:
        if task is None:
            if self.task_scale:
                raise RuntimeError(
                    f"{self.config_key}.task_scale > 0 but the batch has no labels (task loss is None)"
                )
            return 0.0
        return self.task_scale * task if self.task_scale else 0.0 * task

    @torch.no_grad()
    def _teacher_forward(
        self, pl_module: LightningModule, batch: dict[str, Tensor], flags: dict[str, bool]
    ) -> tuple[Any, dict]:
        teacher = self._teacher_model
        device = batch["input_ids"].device
        if next(teacher.parameters()).device != device:
            teacher.to(device)
        points = [(p.teacher, p.teacher_point) for p in self.hidden_pairs] if self.scales["hidden"] else []
        with capture_features(teacher, points) as feats:
            outputs = teacher(**self._teacher_inputs(pl_module, batch), **flags)
        return outputs, feats

    def _teacher_inputs(self, pl_module: LightningModule, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The student's batch without labels; encoder-decoders get the student's decoder inputs."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        labels = self._labels(pl_module, batch)
        if not is_encoder_decoder(self._teacher_model) or "decoder_input_ids" in batch or labels is None:
            return inputs
        prepare = getattr(target_model(pl_module), "prepare_decoder_input_ids_from_labels", None)
        if prepare is None:
            return {**inputs, "labels": labels}  # the teacher shifts them itself
        return {**inputs, "decoder_input_ids": prepare(labels=labels)}

    @staticmethod
    def _labels(pl_module: LightningModule, batch: dict[str, Tensor]) -> Tensor | None:
        masked = pl_module.mask_padding(batch) if hasattr(pl_module, "mask_padding") else batch
        return masked.get("labels")

    def _masks(self, pl_module: LightningModule, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Real positions ``(B, T)``: ``encoder`` (inputs) and ``decoder`` (where logits are scored)."""
        ids = batch["input_ids"]  # (B, T)
        attention = batch.get("attention_mask")
        inputs = torch.ones_like(ids, dtype=torch.bool) if attention is None else attention.bool()
        labels = self._labels(pl_module, batch)
        if is_encoder_decoder(target_model(pl_module)):
            if labels is not None:
                return {"encoder": inputs, "decoder": labels != IGNORE_INDEX}
            dec = batch.get("decoder_attention_mask", torch.ones_like(batch["decoder_input_ids"]))
            return {"encoder": inputs, "decoder": dec.bool()}
        tokens = inputs if labels is None else inputs & (labels != IGNORE_INDEX)
        return {"encoder": tokens, "decoder": tokens}

    def _terms(self, pl_module, batch, masks, student, teacher) -> dict[str, Tensor]:
        (s_out, s_feats), (t_out, t_feats) = student, teacher
        terms = {}
        if self.scales["logits"]:
            terms["logits"] = kd_logits_loss(s_out.logits, t_out.logits, self.temperature, masks["decoder"])
        if self.scales["hidden"]:
            terms["hidden"] = self._hidden_term(pl_module, masks, s_feats, t_feats)
        if self.scales["attention"]:
            terms["attention"] = self._attention_term(masks, s_out, t_out)
        if self.scales["contrastive"]:
            terms["contrastive"] = self._contrastive_term(pl_module, batch, masks, s_out, t_out)
        return terms

    def _hidden_term(self, pl_module, masks, s_feats, t_feats) -> Tensor:
        losses = []
        for i, (pair, side) in enumerate(zip(self.hidden_pairs, self._hidden_sides)):
            s = s_feats.get((pair.student, pair.student_point))  # (B, T, Cs)
            t = t_feats.get((pair.teacher, pair.teacher_point))  # (B, T, Ct)
            if s is None or t is None:
                which = "student" if s is None else "teacher"
                raise RuntimeError(
                    f"{self.config_key}.hidden_map[{i}]: the {which} module produced no tensor in forward"
                )
            s = self.projection_module(pl_module, f"hidden_{i}")(s)  # (B, T, Ct)
            if s.shape != t.shape:
                raise ValueError(
                    f"{self.config_key}.hidden_map[{i}]: student {tuple(s.shape)} vs teacher {tuple(t.shape)} "
                    "(after projection); map modules whose outputs have the model's hidden size"
                )
            losses.append(hidden_mse(s, t.to(s.dtype), masks[side]))
        return torch.stack(losses).mean()

    def _attention_term(self, masks, s_out, t_out) -> Tensor:
        losses = []
        for field, pairs in self._attention_pairs.items():
            s_maps, t_maps = getattr(s_out, field, None), getattr(t_out, field, None)
            if not s_maps or not t_maps:
                raise RuntimeError(
                    f"{self.config_key}.attention_scale: the model returned no {field}; it needs eager attention "
                    "(attn_implementation='eager') and output_attentions support"
                )
            mask = masks["encoder" if field.startswith("encoder") else "decoder"]
            losses += [attention_loss(s_maps[s], t_maps[t], mask, self.attention_kind) for s, t in pairs]
        return torch.stack(losses).mean()

    def _contrastive_term(self, pl_module, batch, masks, s_out, t_out) -> Tensor:
        field = "decoder_hidden_states" if is_encoder_decoder(target_model(pl_module)) else "hidden_states"
        s = self.projection_module(pl_module, "contrastive")(getattr(s_out, field)[-1])  # (B, T, Ct)
        t = getattr(t_out, field)[-1].to(s.dtype)  # (B, T, Ct)
        mask = masks["decoder"]
        ids = batch["input_ids"] if field == "hidden_states" else None
        bank = None if self._bank is None else self._bank.to(s.device)
        loss = token_contrastive_loss(
            s, t, mask, self.contrastive_temperature, self.contrastive_negatives, bank, ids
        )
        self._update_bank(t[mask])
        return loss

    @torch.no_grad()
    def _update_bank(self, teacher_tokens: Tensor) -> None:
        """Keep the newest ``memory_bank_size`` teacher token representations ``(K, C)``."""
        if not self.memory_bank_size:
            return
        fresh = teacher_tokens.detach().float()
        self._bank = fresh if self._bank is None else torch.cat([fresh, self._bank.to(fresh.device)])
        self._bank = self._bank[: self.memory_bank_size]

    @override
    def state_dict(self) -> dict[str, Any]:
        """The primitive counters, plus the contrastive memory bank (a CPU tensor) when one is filling."""
        state = super().state_dict()
        if self._bank is not None:
            state["memory_bank"] = self._bank.detach().cpu()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        bank = state.pop("memory_bank", None)
        self._bank = bank[: self.memory_bank_size] if bank is not None and self.memory_bank_size else None
        super().load_state_dict(state)

    def _log(self, pl_module, batch, task, terms, loss) -> None:
        size = batch["input_ids"].shape[0]
        pl_module.log("train/loss", loss, prog_bar=True, batch_size=size)
        if task is not None:
            pl_module.log("train/task_loss", task.detach(), batch_size=size)
        for key, value in terms.items():
            pl_module.log(f"train/kd_{key}", value.detach(), batch_size=size)
