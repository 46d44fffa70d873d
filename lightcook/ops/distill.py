"""Knowledge-distillation losses in pure torch: logits KL, hidden-state MSE, attention maps, token
contrastive (InfoNCE), plus the uniform layer map used when teacher and student depths differ.

Every loss takes an optional boolean ``mask`` of real positions, shape ``(B, T)``, and averages over
those positions only, so padding never changes the value. Shapes are noted as ``(B, T, V)`` (batch,
time, vocabulary), ``(B, T, C)`` (channels) and ``(B, H, T, S)`` (heads, queries, keys).

Example:
    >>> import torch
    >>> logits = torch.randn(2, 5, 11)
    >>> abs(float(kd_logits_loss(logits, logits, temperature=2.0))) < 1e-5
    True
    >>> uniform_layer_map(2, 4)
    [(0, 1), (1, 3)]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ATTENTION_KINDS",
    "NEGATIVES",
    "attention_loss",
    "hidden_mse",
    "kd_logits_loss",
    "token_contrastive_loss",
    "uniform_layer_map",
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
