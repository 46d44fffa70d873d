"""Knowledge distillation in pure torch: the configuration (:class:`KDConfig`), the setup of a
student/teacher pair (:func:`prepare_`), the terms of one step (:func:`distillation_terms`) and the
losses they are made of: logits KL, hidden-state MSE, attention maps, token contrastive (InfoNCE),
plus the uniform layer map used when teacher and student depths differ.

Every loss takes an optional boolean ``mask`` of real positions, shape ``(B, T)``, and averages over
those positions only, so padding never changes the value. Shapes are noted as ``(B, T, V)`` (batch,
time, vocabulary), ``(B, T, C)`` (channels) and ``(B, H, T, S)`` (heads, queries, keys).

Usable without Lightning: a training loop of one's own calls :func:`prepare_` once and
:func:`distillation_terms` every step (see its example); :class:`~lightcook.callbacks.distillation.DistillationCallback`
does exactly that from Lightning hooks.

Example:
    >>> import torch
    >>> logits = torch.randn(2, 5, 11)
    >>> abs(float(kd_logits_loss(logits, logits, temperature=2.0))) < 1e-5
    True
    >>> uniform_layer_map(2, 4)
    [(0, 1), (1, 3)]
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightcook.ops.config import TechniqueConfig, check_choice, check_int, check_number
from lightcook.ops.names import is_conv1d

__all__ = [
    "ATTENTION_KINDS",
    "FINETUNE",
    "IGNORE_INDEX",
    "NEGATIVES",
    "POINTS",
    "TEACHER_DTYPES",
    "resolve_teacher_dtype",
    "TERMS",
    "HiddenPair",
    "KDConfig",
    "KDPlan",
    "MemoryBank",
    "attention_loss",
    "capture_features",
    "distillation_terms",
    "feature_width",
    "hidden_mse",
    "is_encoder_decoder",
    "kd_logits_loss",
    "model_width",
    "parse_hidden_map",
    "parse_layer_pairs",
    "prepare_",
    "real_positions",
    "set_attention_implementation",
    "starting_copy",
    "teacher_inputs",
    "token_contrastive_loss",
    "uniform_layer_map",
    "vocab_size",
]

ATTENTION_KINDS = ("mse", "kl")
NEGATIVES = ("sequence", "batch")
_EPS = 1e-12


def _full_mask(mask: Tensor | None, like: Tensor) -> Tensor:
    """``mask`` as bool ``(B, T)``; all True when ``None``. ``like`` is ``(B, T, ...)``."""
    if mask is None:
        return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    if mask.shape != like.shape[:2]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match (B, T) = {tuple(like.shape[:2])}")
    return mask.to(device=like.device, dtype=torch.bool)


def _check_pair(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"{what}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ")


def _zero(like: Tensor) -> Tensor:
    """A zero that stays connected to the graph (no real positions in the batch)."""
    return like.sum() * 0.0


def kd_logits_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    """``T² · KL(teacher ‖ student)`` of the softened next-token distributions, mean over real tokens.

    The KL divergence is summed over the vocabulary and averaged over real positions (not summed over
    the sequence, a BMCook defect); ``T²`` keeps gradient magnitudes comparable across temperatures
    (Hinton et al., 2015). Computed in float32 whatever the input dtype.

    Args:
        student_logits: ``(B, T, V)`` student logits (gradients flow here).
        teacher_logits: ``(B, T, V)`` teacher logits.
        temperature: softmax temperature ``T > 0``.
        mask: ``(B, T)`` bool, True at real tokens; ``None`` counts every position.

    Raises:
        ValueError: shapes differ (e.g. vocabulary sizes), or ``temperature <= 0``.

    Example:
        >>> s, t = torch.zeros(1, 3, 4), torch.tensor([[[0.0, 0, 0, 10]]]).expand(1, 3, 4)
        >>> round(float(kd_logits_loss(s, t)), 2)  # KL(near one-hot ‖ uniform) = log 4 - H(p_t)
        1.38
    """
    _check_pair(student_logits, teacher_logits, "kd_logits_loss")
    if temperature <= 0:
        raise ValueError(f"kd_logits_loss: temperature must be > 0, got {temperature}")
    student, teacher = _real_rows(student_logits, mask), _real_rows(teacher_logits, mask)  # (N, V)
    if student.shape[0] == 0:
        return _zero(student_logits)
    with torch.no_grad():  # the teacher side is a constant
        log_t = F.log_softmax(_soften(teacher.float(), temperature), dim=-1)  # (N, V)
        p_t = log_t.exp()  # (N, V)
        neg_entropy = (p_t * log_t).sum(-1)  # (N,) Σ p log p
    # KL(p_t ‖ p_s) = -Σ p_t log p_s + Σ p_t log p_t; the soft-target cross-entropy is one fused
    # log-softmax with a cheap backward (p_s - p_t), about 3x faster on CPU than the explicit form.
    cross = F.cross_entropy(_soften(student.float(), temperature), p_t, reduction="none")  # (N,)
    return (cross + neg_entropy).mean() * temperature**2


def _real_rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """``(B, T, V) -> (N, V)``: the real positions; a view, not a copy, when every position is real."""
    keep = _full_mask(mask, x)
    return x.reshape(-1, x.shape[-1]) if bool(keep.all()) else x[keep]


def _soften(logits: Tensor, temperature: float) -> Tensor:
    return logits if temperature == 1 else logits / temperature


def hidden_mse(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error between hidden states, averaged over real positions and channels.

    Args:
        student: ``(B, T, C)`` student states (already projected to the teacher's width).
        teacher: ``(B, T, C)`` teacher states.
        mask: ``(B, T)`` bool, True at real tokens.

    Raises:
        ValueError: shapes differ.

    Example:
        >>> float(hidden_mse(torch.ones(1, 2, 3), torch.zeros(1, 2, 3)))
        1.0
    """
    _check_pair(student, teacher, "hidden_mse")
    keep = _full_mask(mask, student)
    s, t = student[keep].float(), teacher[keep].float()  # (N, C)
    return ((s - t) ** 2).mean() if s.numel() else _zero(student)


def _head_match(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Average over heads when the head counts differ (head-averaged maps are still distributions)."""
    if student.shape[1] == teacher.shape[1]:
        return student, teacher
    return student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)


def attention_loss(student: Tensor, teacher: Tensor, mask: Tensor | None = None, kind: str = "mse") -> Tensor:
    """Distance between attention probability maps, averaged over heads and real query positions.

    ``kind="mse"``: squared error summed over keys (each row is a distribution). ``kind="kl"``:
    ``KL(teacher ‖ student)`` per row. Padded keys hold probability 0 in both maps and add nothing,
    so padding never changes the value. With different head counts the maps are head-averaged first.

    Args:
        student: ``(B, H, T, S)`` attention probabilities (rows sum to 1).
        teacher: ``(B, H', T, S)`` attention probabilities.
        mask: ``(B, T)`` bool, True at real query positions.
        kind: ``"mse"`` or ``"kl"``.

    Raises:
        ValueError: unknown ``kind``, or query/key lengths differ.

    Example:
        >>> p = torch.softmax(torch.randn(1, 2, 3, 3), -1)
        >>> float(attention_loss(p, p, kind="mse"))
        0.0
    """
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention_loss: kind must be one of {', '.join(ATTENTION_KINDS)}, got {kind!r}")
    student, teacher = _head_match(student, teacher)
    _check_pair(student, teacher, "attention_loss")
    keep = _full_mask(mask, student.transpose(1, 2))
    s = student.transpose(1, 2)[keep].float()  # (N, H, S): real query rows
    t = teacher.transpose(1, 2)[keep].float()  # (N, H, S)
    if s.shape[0] == 0:
        return _zero(student)
    if kind == "mse":
        per_row = ((s - t) ** 2).sum(-1)  # (N, H)
    else:
        per_row = (torch.xlogy(t, t) - t * s.clamp_min(_EPS).log()).sum(-1)  # (N, H)
    return per_row.mean()


def _negative_logits(
    anchors: Tensor, keys: Tensor, valid: Tensor, ids: Tensor | None, temperature: float
) -> Tensor:
    """Cosine-similarity logits ``(..., N, N)``; invalid keys and other same-id keys get ``-inf``.

    ``anchors``/``keys`` are L2-normalised ``(..., N, C)``, ``valid`` is ``(..., N)``.
    """
    logits = anchors @ keys.transpose(-1, -2) / temperature  # (..., N, N)
    blocked = ~valid.unsqueeze(-2)  # (..., 1, N): padded keys are never negatives
    if ids is not None:  # another occurrence of the same token is not a negative
        blocked = blocked | (ids.unsqueeze(-1) == ids.unsqueeze(-2))  # (..., N, N)
    eye = torch.eye(logits.shape[-1], dtype=torch.bool, device=logits.device)
    return logits.masked_fill(blocked & ~eye, float("-inf"))  # the positive stays finite (no NaN rows)


def token_contrastive_loss(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor | None = None,
    temperature: float = 0.1,
    negatives: str = "sequence",
    bank: Tensor | None = None,
    token_ids: Tensor | None = None,
) -> Tensor:
    """Token-level contrastive distillation (InfoNCE), after Tao et al., "Compression of Generative
    Pre-trained Language Models via Quantization", ACL 2022.

    For every real token the student representation must pick the teacher representation of the same
    token (the positive) out of the teacher representations of the other real tokens of the same
    sequence (``negatives="sequence"``) or of the whole batch (``"batch"``), plus optional extra
    negatives from a memory bank of earlier teacher representations. Similarity is cosine / ``temperature``.
    With ``token_ids`` other occurrences of the anchor's own token are not used as negatives.

    Args:
        student: ``(B, T, C)`` student token representations (projected to the teacher's width).
        teacher: ``(B, T, C)`` teacher token representations.
        mask: ``(B, T)`` bool, True at real tokens.
        temperature: InfoNCE temperature ``> 0``.
        negatives: ``"sequence"`` or ``"batch"``.
        bank: ``(K, C)`` extra negative teacher representations (a memory bank), or ``None``.
        token_ids: ``(B, T)`` token ids, to drop same-token negatives; ``None`` keeps all.

    Raises:
        ValueError: unknown ``negatives``, ``temperature <= 0`` or shapes that differ.

    Example:
        >>> t = torch.eye(4).unsqueeze(0)  # four orthogonal teacher tokens
        >>> float(token_contrastive_loss(t, t, temperature=0.01)) < 1e-6
        True
    """
    if negatives not in NEGATIVES:
        raise ValueError(
            f"token_contrastive_loss: negatives must be one of {', '.join(NEGATIVES)}, got {negatives!r}"
        )
    if temperature <= 0:
        raise ValueError(f"token_contrastive_loss: temperature must be > 0, got {temperature}")
    _check_pair(student, teacher, "token_contrastive_loss")
    valid = _full_mask(mask, student)  # (B, T)
    s = F.normalize(student.float(), dim=-1)  # (B, T, C)
    t = F.normalize(teacher.float(), dim=-1)  # (B, T, C)
    ids = token_ids
    if negatives == "batch":  # one "sequence" made of every real token of the batch
        s, t = s[valid].unsqueeze(0), t[valid].unsqueeze(0)  # (1, N, C)
        ids = None if ids is None else ids.to(valid.device)[valid].unsqueeze(0)  # (1, N)
        valid = valid[valid].unsqueeze(0)  # (1, N)
    if not bool(valid.any()):
        return _zero(student)
    logits = _negative_logits(s, t, valid, ids, temperature)  # (B, T, T)
    if bank is not None and bank.numel():
        extra = s @ F.normalize(bank.float().to(s.device), dim=-1).T / temperature  # (B, T, K)
        logits = torch.cat([logits, extra], dim=-1)  # (B, T, T + K)
    positive = torch.diagonal(logits[..., : s.shape[1]], dim1=-2, dim2=-1)  # (B, T)
    nll = torch.logsumexp(logits, dim=-1) - positive  # (B, T)
    return nll[valid].mean()


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Pair each student layer ``i`` with teacher layer ``⌊(i+1)·Lt/Ls⌋ - 1`` (last maps to last).

    Args:
        student_layers: number of student layers ``Ls >= 1``.
        teacher_layers: number of teacher layers ``Lt >= 1``.

    Raises:
        ValueError: a layer count below 1.

    Example:
        >>> uniform_layer_map(3, 6)
        [(0, 1), (1, 3), (2, 5)]
    """
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError(
            f"uniform_layer_map: layer counts must be >= 1, got {student_layers}, {teacher_layers}"
        )
    return [(i, max(0, (i + 1) * teacher_layers // student_layers - 1)) for i in range(student_layers)]


# --------------------------------------------------------------------------- configuration

IGNORE_INDEX = -100
#: ``teacher_dtype`` values and the dtype each casts the teacher to.
TEACHER_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_teacher_dtype(name: str | None, device: str | torch.device = "cpu") -> torch.dtype | None:
    """The dtype a ``teacher_dtype`` value casts the teacher to on ``device`` (``None``: leave it).

    ``"auto"`` is bfloat16 where ``device`` computes it natively (CUDA with bf16, a CPU with
    AVX-512 BF16 or AMX) and float32 elsewhere: on an AVX2-only CPU a bf16 matmul measured 6x slower
    than float32 (512x576 @ 576x1536, one thread), so a bf16 teacher there costs time instead of
    saving it.

    Example:
        >>> resolve_teacher_dtype("bf16"), resolve_teacher_dtype(None)
        (torch.bfloat16, None)
        >>> resolve_teacher_dtype("auto") in (torch.bfloat16, torch.float32)
        True
    """
    if name == "auto":
        from lightcook.ops.kernels import bf16_supported

        return torch.bfloat16 if bf16_supported(device) else torch.float32
    return None if name is None else TEACHER_DTYPES[name]


#: Where a hidden-state map reads a module: its first input (``pre``) or its output (``post``).
POINTS = ("pre", "post")
#: The distillation terms, in the order they are computed and logged.
TERMS = ("logits", "hidden", "attention", "contrastive")
_MAP_SIDE = re.compile(r"^\s*(?:\[(?P<point>[a-z]+)\])?\s*(?P<name>[^\s:\[\]]+)\s*$")
_PAIR = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_PARAMETRIZED = re.compile(r"\.parametrizations\.([^.]+)\.original$")


@dataclasses.dataclass(frozen=True)
class HiddenPair:
    """One hidden-state mapping: ``[point]student_name : [point]teacher_name``."""

    student: str
    student_point: str
    teacher: str
    teacher_point: str


def parse_hidden_map(entries: Sequence[str], key: str = "hidden_map") -> list[HiddenPair]:
    """Parse ``"[post]model.layers.1:[pre]model.layers.3"`` entries (``[post]`` when omitted).

    Args:
        entries: map entries (a single string counts as one entry).
        key: the name errors start with (``key[i]``).

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
        (s_point, s_name), (t_point, t_name) = ((m["point"] or "post", m["name"]) for m in matches)  # type: ignore[index]
        for point in (s_point, t_point):
            if point not in POINTS:
                raise ValueError(f"{key}[{i}]: unknown point [{point}] in {entry!r}; allowed: [pre], [post]")
        pairs.append(HiddenPair(s_name, s_point, t_name, t_point))
    return pairs


def parse_layer_pairs(
    spec: str | Sequence[str], key: str = "attention_layers"
) -> str | list[tuple[int, int]]:
    """``"uniform"`` or a list of ``"student_layer:teacher_layer"`` index pairs.

    Raises:
        ValueError: anything else; the message names ``key``.

    Example:
        >>> parse_layer_pairs(["0:1", " 1 : 3"])
        [(0, 1), (1, 3)]
    """
    if spec == "uniform":
        return "uniform"
    if isinstance(spec, str) or not spec:
        raise ValueError(f"{key}: expected 'uniform' or a non-empty list like ['0:1', '1:3'], got {spec!r}")
    pairs = []
    for i, item in enumerate(spec):
        match = _PAIR.match(str(item))
        if not match:
            raise ValueError(f"{key}[{i}]: expected 'student_layer:teacher_layer' (e.g. '1:3'), got {item!r}")
        pairs.append((int(match[1]), int(match[2])))
    return pairs


def _check_scale(field: str, value: Any) -> None:
    check_number(field, value, 0.0)
    if not math.isfinite(value):
        raise ValueError(f"{field}: must be a finite number >= 0, got {value!r}")


#: The ``teacher`` value of a fine-tuned teacher stage (run by the app before the compression job).
FINETUNE = "finetune"


@dataclasses.dataclass(frozen=True)
class KDConfig(TechniqueConfig):
    """Knowledge distillation: which teacher, which terms, how they are weighed.

    The training loss becomes ``task_scale * task + logits_scale * kd_logits + hidden_scale *
    kd_hidden + attention_scale * kd_attention + contrastive_scale * kd_contrastive``; terms with
    scale 0 are not computed. Several hidden or attention pairs are averaged within their term.

    Raises:
        ValueError: a field outside its allowed values, every distillation scale 0,
            ``hidden_scale > 0`` without ``hidden_map``, or a malformed map / layer-pair entry
            (the message starts with the field's name).

    Example:
        >>> KDConfig(temperature=2.0, hidden_scale=0.5, hidden_map=["model.layers.1:model.layers.3"]).active_terms
        ['logits', 'hidden']
        >>> KDConfig(logits_scale=0.0)
        Traceback (most recent call last):
        ...
        ValueError: logits_scale: every distillation scale is 0 (logits_scale, hidden_scale, attention_scale, contrastive_scale); set at least one > 0 or drop kd from compress
    """

    #: What a resumed run must agree with: the projections (one per mapped pair whose widths
    #: differ, kept in the module's state dict) and the size of the memory bank in the callback state.
    SHAPE_FIELDS: ClassVar[tuple[str, ...]] = ("hidden_map", "projection", "memory_bank_size")

    # "student" (default): the uncompressed starting model; or a model path / hub name, loaded with
    # the student's Auto class (its vocabulary must match the student's); or "finetune": the app
    # (lightcook.app.stages) fine-tunes the dense model for teacher_steps first and passes its folder.
    teacher: str = "student"
    # >= 1 with teacher="finetune" (dense fine-tuning steps of the teacher stage), else 0.
    teacher_steps: int = 0
    # teacher="finetune" only: the student starts from the fine-tuned teacher too (fine-tune, then compress).
    start_from_teacher: bool = False
    # None (keep float32), "float32"/"fp32", "bfloat16"/"bf16", "float16"/"fp16", or "auto" (bf16 where the
    # device computes it natively, else float32; resolve_teacher_dtype): the teacher's dtype.
    teacher_dtype: str | None = None
    # >= 0; weight of the module's own (task) loss; 0 = distillation only.
    task_scale: float = 1.0
    # >= 0; weight of T² · KL(teacher ‖ student) of the next-token distributions over real tokens.
    logits_scale: float = 1.0
    # > 0; softmax temperature T of the logits term.
    temperature: float = 1.0
    # >= 0; weight of the hidden-state MSE (needs hidden_map).
    hidden_scale: float = 0.0
    # ("[post]student.module:[post]teacher.module", ...): pairs of modules whose output ([post], the
    # default) or first input ([pre]) are compared; names relative to the networks.
    hidden_map: tuple[str, ...] = ()
    # True: learn a Linear (student -> teacher width) where widths differ; False: differing widths fail.
    projection: bool = True
    # >= 0; weight of the attention-map term (needs eager attention: both models are switched to it).
    attention_scale: float = 0.0
    # "mse" (squared error per attention row) or "kl" (KL(teacher ‖ student) per row).
    attention_kind: str = "mse"
    # "uniform" (student layer i <-> teacher layer floor((i+1)·Lt/Ls)-1) or ("0:1", "1:3", ...)
    # student:teacher layer pairs; applied to the decoder stack and, for encoder-decoders, the encoder.
    attention_layers: str | tuple[str, ...] = "uniform"
    # >= 0; weight of token-level contrastive distillation (Tao et al., ACL 2022) on the last hidden states.
    contrastive_scale: float = 0.0
    # > 0; InfoNCE temperature of the contrastive term.
    contrastive_temperature: float = 0.1
    # "sequence" (other tokens of the same sequence) or "batch" (of the whole batch) as negatives.
    contrastive_negatives: str = "sequence"
    # >= 0; extra negatives: the newest teacher token representations of earlier steps (0 = off).
    memory_bank_size: int = 0

    def __post_init__(self) -> None:
        for name in ("hidden_map", "attention_layers"):  # lists (YAML, Hydra) become tuples
            value = getattr(self, name)
            if isinstance(value, Sequence) and not isinstance(value, str):
                object.__setattr__(self, name, tuple(str(v) for v in value))
        if not isinstance(self.teacher, str) or not self.teacher.strip():
            raise ValueError(f"teacher: 'student' or a model path/name, got {self.teacher!r}")
        check_choice("teacher_dtype", self.teacher_dtype, (None, "auto", *TEACHER_DTYPES))
        check_int("teacher_steps", self.teacher_steps, 0)
        check_choice("start_from_teacher", self.start_from_teacher, (True, False))
        if self.teacher == FINETUNE and self.teacher_steps < 1:
            raise ValueError(
                f"teacher_steps: teacher={FINETUNE} needs teacher_steps >= 1 (the dense fine-tuning "
                f"steps before compressing), got {self.teacher_steps}"
            )
        if self.teacher != FINETUNE and (self.teacher_steps or self.start_from_teacher):
            field = "teacher_steps" if self.teacher_steps else "start_from_teacher"
            raise ValueError(f"{field}: only used with teacher={FINETUNE}, but teacher is {self.teacher!r}")
        check_choice("projection", self.projection, (True, False))
        for field in ("task_scale", *(f"{t}_scale" for t in TERMS)):
            _check_scale(field, getattr(self, field))
        if not any(self.scales.values()):
            raise ValueError(
                "logits_scale: every distillation scale is 0 (logits_scale, hidden_scale, attention_scale, "
                "contrastive_scale); set at least one > 0 or drop kd from compress"
            )
        check_number("temperature", self.temperature, 0.0, open_low=True)
        check_number("contrastive_temperature", self.contrastive_temperature, 0.0, open_low=True)
        check_choice("attention_kind", self.attention_kind, ATTENTION_KINDS)
        check_choice("contrastive_negatives", self.contrastive_negatives, NEGATIVES)
        check_int("memory_bank_size", self.memory_bank_size, 0)
        if self.hidden_scale > 0 and not self.hidden_pairs:
            raise ValueError(
                "hidden_map: hidden_scale > 0 needs at least one '[post]student:[post]teacher' entry"
            )
        parse_layer_pairs(self.attention_layers)

    @property
    def scales(self) -> dict[str, float]:
        """The weight of each term of :data:`TERMS`."""
        return {term: getattr(self, f"{term}_scale") for term in TERMS}

    @property
    def active_terms(self) -> list[str]:
        """Terms with a non-zero scale, in the order ``logits, hidden, attention, contrastive``."""
        return [term for term, scale in self.scales.items() if scale > 0]

    @functools.cached_property
    def hidden_pairs(self) -> list[HiddenPair]:
        """``hidden_map`` parsed (empty when ``hidden_scale`` is 0 and no map is given)."""
        return parse_hidden_map(self.hidden_map)

    @property
    def student_points(self) -> list[tuple[str, str]]:
        """``(module name, point)`` to capture in the student (:func:`capture_features`)."""
        return [(p.student, p.student_point) for p in self.hidden_pairs] if self.hidden_scale else []

    @property
    def teacher_points(self) -> list[tuple[str, str]]:
        """``(module name, point)`` to capture in the teacher."""
        return [(p.teacher, p.teacher_point) for p in self.hidden_pairs] if self.hidden_scale else []

    def forward_kwargs(self) -> dict[str, bool]:
        """Keyword arguments both networks' forward calls need (attention maps, hidden states)."""
        flags = {}
        if self.attention_scale:
            flags["output_attentions"] = True
        if self.contrastive_scale:
            flags["output_hidden_states"] = True
        return flags


# --------------------------------------------------------------------------- model facts


def model_width(model: nn.Module) -> int | None:
    """Hidden size from a Hugging Face config (``hidden_size``, ``d_model`` or ``n_embd``).

    Example:
        >>> model_width(torch.nn.Linear(2, 2)) is None
        True
    """
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

    Example:
        >>> feature_width(torch.nn.Sequential(torch.nn.Linear(3, 5)), "0", "post")
        5
    """
    module = model.get_submodule(name)
    attr = "out_features" if point == "post" else "in_features"
    if isinstance(getattr(module, attr, None), int):
        return getattr(module, attr)
    weight = getattr(module, "weight", None)
    if is_conv1d(module) and isinstance(weight, Tensor):
        return weight.shape[1] if point == "post" else weight.shape[0]  # weight is (in, out)
    if isinstance(module, nn.Embedding):
        return module.embedding_dim if point == "post" else None
    if isinstance(weight, Tensor) and weight.dim() == 1:
        return weight.numel()
    return model_width(model)


def vocab_size(model: nn.Module) -> int | None:
    """Number of output logits (LM head rows), else ``config.vocab_size``.

    Example:
        >>> vocab_size(torch.nn.Linear(2, 2)) is None
        True
    """
    head = _call(model, "get_output_embeddings")
    weight = getattr(head, "weight", None)
    if isinstance(weight, Tensor):
        return weight.shape[0]
    return getattr(getattr(model, "config", None), "vocab_size", None)


def _call(model: nn.Module, method: str) -> Any:
    """``model.<method>()`` when the model has that method, else ``None``."""
    found = getattr(model, method, None)
    return found() if callable(found) else None


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether ``model`` is an encoder-decoder (T5, BART).

    Example:
        >>> is_encoder_decoder(torch.nn.Linear(2, 2))
        False
    """
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


def set_attention_implementation(model: nn.Module, implementation: str) -> str | None:
    """Switch a Hugging Face model's attention implementation (``"eager"``, ``"sdpa"``); return the
    previous one (``None`` for a model without a config: nothing changes).

    Example:
        >>> set_attention_implementation(torch.nn.Linear(2, 2), "eager") is None
        True
    """
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    if previous == implementation or config is None:
        return previous
    switch = getattr(model, "set_attn_implementation", None)
    if callable(switch):
        switch(implementation)
    else:
        config._attn_implementation = implementation
    return previous


# --------------------------------------------------------------------------- feature capture


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
    are removed on exit, the dict stays filled.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
        >>> with capture_features(net, [("0", "post"), ("1", "pre")]) as feats:
        ...     _ = net(torch.ones(1, 2))
        >>> torch.equal(feats[("0", "post")], feats[("1", "pre")])
        True
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


# --------------------------------------------------------------------------- the teacher and the plan


def _is_pretrained(model: nn.Module) -> bool:
    return getattr(model, "config", None) is not None and hasattr(type(model), "config_class")


def starting_copy(student: nn.Module, rebuild_only: bool = False) -> nn.Module:
    """A copy of ``student`` as it is now, for a teacher that is the uncompressed starting model.

    A Hugging Face model is rebuilt from its config and the student's tensors are copied in (extra
    buffers such as masks or quantizer scales are ignored, ``torch.nn.utils.parametrize`` renames
    undone); any other module is deep-copied.

    Args:
        student: the network, before any technique has changed its weights or module types.
        rebuild_only: refuse to deep-copy (when other techniques already changed ``student``, a deep
            copy would carry their wrappers into the teacher).

    Raises:
        ValueError: a rebuilt model misses weights the student holds elsewhere (a module swap moved
            them; the message lists a few), or ``rebuild_only`` and ``student`` is no Hugging Face model.

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> copy_ = starting_copy(net)
        >>> copy_ is not net and torch.equal(copy_.weight, net.weight)
        True
    """
    if not _is_pretrained(student):
        if rebuild_only:
            raise ValueError("teacher: it is not a Hugging Face model, so it can only be deep-copied")
        return copy.deepcopy(student)
    fresh = type(student)(copy.deepcopy(student.config))
    state = {_PARAMETRIZED.sub(r".\1", k): v for k, v in student.state_dict().items()}
    missing, _unexpected = fresh.load_state_dict(state, strict=False)  # extra buffers (masks) are fine
    if missing:
        raise ValueError(f"teacher: its weights {missing[:3]} are no longer where the config puts them")
    return fresh


@dataclasses.dataclass
class KDPlan:
    """What :func:`prepare_` resolved for one student/teacher pair."""

    #: Learned projections (student -> teacher width): ``hidden_<i>`` per mapped pair, ``contrastive``.
    #: Register them where the optimizer sees them (the callback puts them on the LightningModule).
    projections: nn.ModuleDict
    #: Which mask each hidden pair uses: ``"encoder"`` or ``"decoder"``.
    hidden_sides: list[str]
    #: Attention output field -> ``(student_layer, teacher_layer)`` pairs.
    attention_pairs: dict[str, list[tuple[int, int]]]
    #: Whether the student is an encoder-decoder.
    encoder_decoder: bool


def prepare_(
    student: nn.Module, teacher: nn.Module, config: KDConfig, device: str | torch.device | None = None
) -> KDPlan:
    """Check a student/teacher pair against ``config``, freeze the teacher in place (eval mode, no
    gradients, ``teacher_dtype``, eager attention when attention maps are distilled) and build the
    projections where widths differ. The student is not changed. ``device``: where the teacher will
    run, for ``teacher_dtype="auto"`` (default: the student's parameters' device).

    Raises:
        ValueError: vocabularies or model kinds differ, a mapped module is missing, widths differ
            with ``projection=False`` or cannot be inferred, attention layers out of range (the
            message starts with the field: ``teacher``, ``hidden_map[i]``, ``attention_layers``, ...).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 3))
        >>> config = KDConfig(hidden_scale=1.0, hidden_map=["0:0"])
        >>> teacher = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 3))
        >>> plan = prepare_(net, teacher, config)
        >>> plan.projections["hidden_0"], teacher.training
        (Linear(in_features=4, out_features=6, bias=True), False)
    """
    _check_compatible(student, teacher, config)
    teacher.eval().requires_grad_(False)
    if device is None:
        device = next((p.device for p in student.parameters()), torch.device("cpu"))
    dtype = resolve_teacher_dtype(config.teacher_dtype, device)
    if dtype is not None:
        teacher.to(dtype)
    if config.attention_scale:
        set_attention_implementation(teacher, "eager")
    projections = _hidden_projections(student, teacher, config) | _contrastive_projection(
        student, teacher, config
    )
    return KDPlan(
        projections=nn.ModuleDict(projections),
        hidden_sides=_hidden_sides(student, config),
        attention_pairs=_attention_pairs(student, teacher, config),
        encoder_decoder=is_encoder_decoder(student),
    )


def _check_compatible(student: nn.Module, teacher: nn.Module, config: KDConfig) -> None:
    s_vocab, t_vocab = vocab_size(student), vocab_size(teacher)
    if s_vocab is not None and t_vocab is not None and s_vocab != t_vocab:
        raise ValueError(
            f"teacher: vocabulary mismatch: teacher {config.teacher!r} has {t_vocab} tokens, the student "
            f"{s_vocab}; teacher and student must share one tokenizer"
        )
    if is_encoder_decoder(student) != is_encoder_decoder(teacher):
        kinds = ["decoder-only", "encoder-decoder"]
        raise ValueError(
            f"teacher: the teacher is {kinds[is_encoder_decoder(teacher)]} but the student is "
            f"{kinds[is_encoder_decoder(student)]}"
        )


def _check_names(model: nn.Module, pairs: Sequence[HiddenPair], side: str) -> None:
    names = dict(model.named_modules())
    for i, pair in enumerate(pairs):
        name = getattr(pair, side)
        if name not in names:
            sample = ", ".join(n for n in list(names)[1:] if n.count(".") <= 2)[:200]
            raise ValueError(
                f"hidden_map[{i}]: the {side} has no module {name!r} (modules look like: {sample})"
            )


def _projection_for(
    field: str, s_width: int | None, t_width: int | None, config: KDConfig
) -> nn.Linear | None:
    if s_width is None or t_width is None:
        raise ValueError(
            f"{field}: cannot infer the feature width of a mapped module; map layer outputs, Linears or norms"
        )
    if s_width == t_width:
        return None
    if not config.projection:
        raise ValueError(
            f"{field}: widths differ (student {s_width}, teacher {t_width}) and projection is false"
        )
    return nn.Linear(s_width, t_width)


def _hidden_projections(student: nn.Module, teacher: nn.Module, config: KDConfig) -> dict[str, nn.Module]:
    if not config.hidden_scale:
        return {}
    _check_names(student, config.hidden_pairs, "student")
    _check_names(teacher, config.hidden_pairs, "teacher")
    projections: dict[str, nn.Module] = {}
    for i, pair in enumerate(config.hidden_pairs):
        s_width = feature_width(student, pair.student, pair.student_point)
        t_width = feature_width(teacher, pair.teacher, pair.teacher_point)
        layer = _projection_for(f"hidden_map[{i}]", s_width, t_width, config)
        if layer is not None:
            projections[f"hidden_{i}"] = layer
    return projections


def _contrastive_projection(student: nn.Module, teacher: nn.Module, config: KDConfig) -> dict[str, nn.Module]:
    if not config.contrastive_scale:
        return {}
    layer = _projection_for("contrastive_scale", model_width(student), model_width(teacher), config)
    return {"contrastive": layer} if layer is not None else {}


def _encoder_prefix(model: nn.Module) -> str | None:
    encoder = _call(model, "get_encoder") if is_encoder_decoder(model) else None
    if encoder is None:
        return None
    return next((name for name, m in model.named_modules() if m is encoder and name), None)


def _hidden_sides(student: nn.Module, config: KDConfig) -> list[str]:
    prefix = _encoder_prefix(student)
    return [
        "encoder" if prefix and (p.student + ".").startswith(prefix + ".") else "decoder"
        for p in (config.hidden_pairs if config.hidden_scale else [])
    ]


def _attention_pairs(
    student: nn.Module, teacher: nn.Module, config: KDConfig
) -> dict[str, list[tuple[int, int]]]:
    if not config.attention_scale:
        return {}
    resolved = {}
    t_counts = _layer_counts(teacher)
    for field, s_layers in _layer_counts(student).items():
        t_layers = t_counts.get(field)
        if not s_layers or not t_layers:
            raise ValueError(
                f"attention_scale: cannot tell how many attention layers the models have ({field})"
            )
        spec = parse_layer_pairs(config.attention_layers)
        pairs = uniform_layer_map(s_layers, t_layers) if isinstance(spec, str) else spec
        for s, t in pairs:
            if not (0 <= s < s_layers and 0 <= t < t_layers):
                raise ValueError(
                    f"attention_layers: pair {s}:{t} is out of range ({field}: student has {s_layers} "
                    f"layers, teacher {t_layers})"
                )
        resolved[field] = pairs
    return resolved


# --------------------------------------------------------------------------- one step


def teacher_inputs(
    batch: Mapping[str, Tensor], student: nn.Module, teacher: nn.Module, labels: Tensor | None = None
) -> dict[str, Tensor]:
    """The batch the teacher sees: the student's inputs without labels; an encoder-decoder teacher
    gets the decoder inputs the student derives from ``labels`` (default: ``batch["labels"]``).

    Example:
        >>> sorted(teacher_inputs({"input_ids": torch.ones(1, 2), "labels": torch.ones(1, 2)}, None, None))
        ['input_ids']
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch.get("labels") if labels is None else labels
    if not is_encoder_decoder(teacher) or "decoder_input_ids" in batch or labels is None:
        return inputs
    prepare = getattr(student, "prepare_decoder_input_ids_from_labels", None)
    if prepare is None:
        return {**inputs, "labels": labels}  # the teacher shifts them itself
    return {**inputs, "decoder_input_ids": prepare(labels=labels)}


def real_positions(
    batch: Mapping[str, Tensor], labels: Tensor | None = None, encoder_decoder: bool = False
) -> dict[str, Tensor]:
    """Real positions ``(B, T)`` bool: ``encoder`` (the inputs) and ``decoder`` (where logits are scored).

    Causal LMs: ``attention_mask == 1`` and ``labels != -100`` for both. Encoder-decoders: the
    encoder ``attention_mask``; decoder positions with ``labels != -100`` (else the
    ``decoder_attention_mask``). ``labels`` defaults to ``batch["labels"]``.

    Example:
        >>> batch = {"input_ids": torch.ones(1, 3), "attention_mask": torch.tensor([[1, 1, 0]])}
        >>> real_positions(batch)["decoder"].tolist()
        [[True, True, False]]
    """
    ids = batch["input_ids"]  # (B, T)
    attention = batch.get("attention_mask")
    inputs = torch.ones_like(ids, dtype=torch.bool) if attention is None else attention.bool()
    labels = batch.get("labels") if labels is None else labels
    if encoder_decoder:
        if labels is not None:
            return {"encoder": inputs, "decoder": labels != IGNORE_INDEX}
        dec = batch.get("decoder_attention_mask", torch.ones_like(batch["decoder_input_ids"]))
        return {"encoder": inputs, "decoder": dec.bool()}
    tokens = inputs if labels is None else inputs & (labels != IGNORE_INDEX)
    return {"encoder": tokens, "decoder": tokens}


class MemoryBank:
    """The newest ``size`` teacher token representations ``(K, C)``: extra contrastive negatives.

    Example:
        >>> bank = MemoryBank(3)
        >>> bank.push(torch.ones(2, 4)); bank.push(torch.zeros(2, 4))
        >>> bank.tensor.shape, float(bank.tensor[0].sum())
        (torch.Size([3, 4]), 0.0)
    """

    def __init__(self, size: int, tensor: Tensor | None = None) -> None:
        self.size = size
        self.tensor = tensor[:size] if tensor is not None and size else None

    @torch.no_grad()
    def push(self, tokens: Tensor) -> None:
        """Put ``tokens`` ``(N, C)`` in front; keep the newest ``size`` (nothing when ``size`` is 0)."""
        if not self.size:
            return
        fresh = tokens.detach().float()
        self.tensor = fresh if self.tensor is None else torch.cat([fresh, self.tensor.to(fresh.device)])
        self.tensor = self.tensor[: self.size]


def distillation_terms(
    config: KDConfig,
    plan: KDPlan,
    student_outputs: Any,
    teacher_outputs: Any,
    masks: Mapping[str, Tensor],
    *,
    student_features: Mapping[tuple[str, str], Tensor] | None = None,
    teacher_features: Mapping[tuple[str, str], Tensor] | None = None,
    projections: Mapping[str, nn.Module] | None = None,
    token_ids: Tensor | None = None,
    bank: MemoryBank | None = None,
) -> dict[str, Tensor]:
    """The distillation terms of one step, each already multiplied by its scale (add them to
    ``task_scale * task_loss``). Terms with scale 0 are absent.

    Args:
        config: what to compute.
        plan: from :func:`prepare_` (layer pairs, mask sides, projections).
        student_outputs: the student's forward output (``.logits``; ``.attentions`` /
            ``.hidden_states`` when ``config.forward_kwargs()`` were passed).
        teacher_outputs: the teacher's, on :func:`teacher_inputs` of the same batch.
        masks: :func:`real_positions` of the batch.
        student_features, teacher_features: :func:`capture_features` of ``config.student_points``
            / ``config.teacher_points`` (needed when ``hidden_scale > 0``).
        projections: the trained projections (default ``plan.projections``).
        token_ids: ``(B, T)`` input ids; same-token negatives are dropped (causal LMs only).
        bank: memory bank of earlier teacher tokens; read, then given this step's tokens.

    Raises:
        RuntimeError: a mapped module produced no tensor, or a model returned no attention maps.
        ValueError: projected shapes still differ.

    Example:
        >>> import transformers
        >>> tiny = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
        >>> student = transformers.LlamaForCausalLM(tiny)
        >>> teacher = starting_copy(student)
        >>> config = KDConfig(temperature=2.0, hidden_scale=1.0, hidden_map=["model.layers.0:model.layers.1"])
        >>> plan = prepare_(student, teacher, config)
        >>> batch = {"input_ids": torch.randint(0, 32, (2, 5))}
        >>> with capture_features(student, config.student_points) as s_feats:
        ...     s_out = student(**batch, **config.forward_kwargs())
        >>> with torch.no_grad(), capture_features(teacher, config.teacher_points) as t_feats:
        ...     t_out = teacher(**teacher_inputs(batch, student, teacher), **config.forward_kwargs())
        >>> terms = distillation_terms(config, plan, s_out, t_out, real_positions(batch),
        ...                            student_features=s_feats, teacher_features=t_feats)
        >>> sorted(terms), float(terms["logits"].detach()) < 1e-5, float(terms["hidden"].detach()) > 0
        (['hidden', 'logits'], True, True)
    """
    trained = plan.projections if projections is None else projections
    terms = {}
    if config.logits_scale:
        terms["logits"] = kd_logits_loss(
            student_outputs.logits, teacher_outputs.logits, config.temperature, masks["decoder"]
        )
    if config.hidden_scale:
        terms["hidden"] = _hidden_term(
            config, plan, masks, student_features or {}, teacher_features or {}, trained
        )
    if config.attention_scale:
        terms["attention"] = _attention_term(config, plan, masks, student_outputs, teacher_outputs)
    if config.contrastive_scale:
        ids = None if plan.encoder_decoder else token_ids
        terms["contrastive"] = _contrastive_term(
            config, plan, masks, student_outputs, teacher_outputs, trained, ids, bank
        )
    return {term: config.scales[term] * value for term, value in terms.items()}


def _project(projections: Mapping[str, nn.Module], key: str, x: Tensor) -> Tensor:
    return projections[key](x) if key in projections else x


def _hidden_term(config, plan, masks, s_feats, t_feats, projections) -> Tensor:
    losses = []
    for i, (pair, side) in enumerate(zip(config.hidden_pairs, plan.hidden_sides)):
        s = s_feats.get((pair.student, pair.student_point))  # (B, T, Cs)
        t = t_feats.get((pair.teacher, pair.teacher_point))  # (B, T, Ct)
        if s is None or t is None:
            which = "student" if s is None else "teacher"
            raise RuntimeError(f"hidden_map[{i}]: the {which} module produced no tensor in forward")
        s = _project(projections, f"hidden_{i}", s)  # (B, T, Ct)
        if s.shape != t.shape:
            raise ValueError(
                f"hidden_map[{i}]: student {tuple(s.shape)} vs teacher {tuple(t.shape)} "
                "(after projection); map modules whose outputs have the model's hidden size"
            )
        losses.append(hidden_mse(s, t.to(s.dtype), masks[side]))
    return torch.stack(losses).mean()


def _attention_term(config, plan, masks, s_out, t_out) -> Tensor:
    losses = []
    for field, pairs in plan.attention_pairs.items():
        s_maps, t_maps = getattr(s_out, field, None), getattr(t_out, field, None)
        if not s_maps or not t_maps:
            raise RuntimeError(
                f"attention_scale: the model returned no {field}; it needs eager attention "
                "(attn_implementation='eager') and output_attentions support"
            )
        mask = masks["encoder" if field.startswith("encoder") else "decoder"]
        losses += [attention_loss(s_maps[s], t_maps[t], mask, config.attention_kind) for s, t in pairs]
    return torch.stack(losses).mean()


def _contrastive_term(config, plan, masks, s_out, t_out, projections, ids, bank) -> Tensor:
    field = "decoder_hidden_states" if plan.encoder_decoder else "hidden_states"
    s = _project(projections, "contrastive", getattr(s_out, field)[-1])  # (B, T, Ct)
    t = getattr(t_out, field)[-1].to(s.dtype)  # (B, T, Ct)
    mask = masks["decoder"]
    extra = None if bank is None or bank.tensor is None else bank.tensor.to(s.device)
    loss = token_contrastive_loss(
        s, t, mask, config.contrastive_temperature, config.contrastive_negatives, extra, ids
    )
    if bank is not None:
        bank.push(t[mask])
    return loss
