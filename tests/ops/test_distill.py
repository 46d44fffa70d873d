"""Distillation losses against torch.nn.functional references and brute-force loops."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightcook.ops.distill import (
    attention_loss,
    hidden_mse,
    kd_logits_loss,
    token_contrastive_loss,
    uniform_layer_map,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pad_time(x: torch.Tensor, extra: int, seed: int = 99) -> torch.Tensor:
    """Append ``extra`` large garbage positions along dim 1."""
    shape = list(x.shape)
    shape[1] = extra
    return torch.cat([x, torch.randn(shape, generator=_gen(seed)) * 50], dim=1)


# --------------------------------------------------------------------------- logits KL


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_logits_matches_kl_div_with_t_squared(temperature):
    s, t = torch.randn(2, 5, 17, generator=_gen(1)), torch.randn(2, 5, 17, generator=_gen(2)) * 3
    reference = F.kl_div(
        F.log_softmax(s.reshape(10, 17) / temperature, -1),
        F.log_softmax(t.reshape(10, 17) / temperature, -1),
        log_target=True,
        reduction="batchmean",  # sum over vocabulary, mean over tokens
    )
    ours = kd_logits_loss(s, t, temperature)
    assert torch.allclose(ours, temperature**2 * reference, rtol=1e-5)
    assert ours > 0


def test_kd_logits_direction_is_teacher_to_student():
    s, t = torch.randn(1, 3, 9, generator=_gen(3)), torch.randn(1, 3, 9, generator=_gen(4))
    p_t, p_s = F.softmax(t, -1), F.softmax(s, -1)
    forward_kl = (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
    assert torch.allclose(kd_logits_loss(s, t), forward_kl, rtol=1e-5)
    assert not torch.allclose(kd_logits_loss(s, t), kd_logits_loss(t, s), rtol=1e-3)


def test_kd_logits_padding_changes_nothing():
    s, t = torch.randn(2, 6, 11, generator=_gen(5)), torch.randn(2, 6, 11, generator=_gen(6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    masked = kd_logits_loss(s, t, 2.0, mask)
    real_only = 4.0 * F.kl_div(
        F.log_softmax(s[mask] / 2, -1), F.log_softmax(t[mask] / 2, -1), log_target=True, reduction="batchmean"
    )
    assert torch.allclose(masked, real_only, rtol=1e-5)
    padded = kd_logits_loss(_pad_time(s, 3), _pad_time(t, 3, seed=98), 2.0, F.pad(mask, (0, 3)))
    assert torch.allclose(padded, masked, rtol=1e-6)
    # averaged over tokens, not summed over the sequence: duplicating the batch keeps the value
    assert torch.allclose(
        kd_logits_loss(s.repeat(3, 1, 1), t.repeat(3, 1, 1), 2.0, mask.repeat(3, 1)), masked
    )


def test_kd_logits_gradient_only_to_student_and_zero_when_equal():
    s = torch.randn(2, 4, 7, generator=_gen(7), requires_grad=True)
    t = torch.randn(2, 4, 7, generator=_gen(8))
    kd_logits_loss(s, t, 2.0).backward()
    assert s.grad.abs().sum() > 0
    assert float(kd_logits_loss(t, t, 3.0)) == pytest.approx(0.0, abs=1e-6)
    nothing = kd_logits_loss(s, t, 1.0, torch.zeros(2, 4, dtype=torch.bool))
    assert float(nothing.detach()) == 0.0 and nothing.requires_grad


def test_kd_logits_bf16_inputs_computed_in_float32():
    s, t = torch.randn(2, 3, 13, generator=_gen(9)), torch.randn(2, 3, 13, generator=_gen(10))
    low = kd_logits_loss(s.bfloat16(), t.bfloat16(), 2.0)
    assert low.dtype == torch.float32
    assert torch.allclose(low, kd_logits_loss(s.bfloat16().float(), t.bfloat16().float(), 2.0))


def test_kd_logits_errors():
    with pytest.raises(ValueError, match="differ"):
        kd_logits_loss(torch.zeros(1, 2, 5), torch.zeros(1, 2, 6))
    with pytest.raises(ValueError, match="temperature"):
        kd_logits_loss(torch.zeros(1, 2, 5), torch.zeros(1, 2, 5), temperature=0.0)
    with pytest.raises(ValueError, match="mask shape"):
        kd_logits_loss(torch.zeros(1, 2, 5), torch.zeros(1, 2, 5), mask=torch.ones(2, 1, dtype=torch.bool))


# --------------------------------------------------------------------------- hidden MSE


def test_hidden_mse_matches_mse_loss_and_ignores_padding():
    s, t = torch.randn(2, 5, 8, generator=_gen(11)), torch.randn(2, 5, 8, generator=_gen(12))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.allclose(hidden_mse(s, t), F.mse_loss(s, t))
    assert torch.allclose(hidden_mse(s, t, mask), F.mse_loss(s[mask], t[mask]))
    padded = hidden_mse(_pad_time(s, 2), _pad_time(t, 2, seed=98), F.pad(mask, (0, 2)))
    assert torch.allclose(padded, hidden_mse(s, t, mask))
    with pytest.raises(ValueError, match="hidden_mse"):
        hidden_mse(s, t[..., :4])


# --------------------------------------------------------------------------- attention maps


def _maps(b, h, t, seed):
    return torch.softmax(torch.randn(b, h, t, t, generator=_gen(seed)), dim=-1)  # (B, H, T, S)


def test_attention_mse_and_kl_match_functional_references():
    s, t = _maps(2, 3, 5, 13), _maps(2, 3, 5, 14)
    assert torch.allclose(attention_loss(s, t, kind="mse"), F.mse_loss(s, t) * 5)  # summed over keys
    kl_ref = F.kl_div(s.log(), t, reduction="sum") / (2 * 3 * 5)  # per row, mean over heads and queries
    assert torch.allclose(attention_loss(s, t, kind="kl"), kl_ref, rtol=1e-5)
    assert float(attention_loss(t, t, kind="kl")) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["mse", "kl"])
def test_attention_padding_changes_nothing(kind):
    real_s, real_t = _maps(1, 2, 4, 15), _maps(1, 2, 4, 16)

    def pad(maps):  # two padded keys (probability 0) and two padded query rows (garbage)
        maps = F.pad(maps, (0, 2))  # (1, 2, 4, 6)
        junk = torch.softmax(torch.randn(1, 2, 2, 6, generator=_gen(17)), -1)
        return torch.cat([maps, junk], dim=2)  # (1, 2, 6, 6)

    mask = torch.tensor([[1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    expected = attention_loss(real_s, real_t, kind=kind)
    assert torch.allclose(attention_loss(pad(real_s), pad(real_t), mask, kind), expected, rtol=1e-5)


def test_attention_head_counts_differ_compares_head_averages():
    s, t = _maps(1, 2, 4, 18), _maps(1, 4, 4, 19)
    expected = F.mse_loss(s.mean(1), t.mean(1)) * 4
    assert torch.allclose(attention_loss(s, t, kind="mse"), expected)
    with pytest.raises(ValueError, match="kind"):
        attention_loss(s, t, kind="l1")


# --------------------------------------------------------------------------- token contrastive


def _brute_contrastive(s, t, mask, tau, negatives, bank=None, ids=None):
    """Explicit loops: for each real anchor, -log softmax over positive + allowed negatives."""
    anchors = [(b, i) for b in range(s.shape[0]) for i in range(s.shape[1]) if mask[b, i]]
    losses = []
    for b, i in anchors:
        pool = anchors if negatives == "batch" else [(b, j) for (bb, j) in anchors if bb == b]
        keys = [k for k in pool if k == (b, i) or ids is None or ids[k] != ids[b, i]]
        sims = [F.cosine_similarity(s[b, i], t[k], dim=0) / tau for k in keys]
        if bank is not None:
            sims += [F.cosine_similarity(s[b, i], row, dim=0) / tau for row in bank]
        sims = torch.stack(sims)
        positive = sims[keys.index((b, i))]
        losses.append(torch.logsumexp(sims, 0) - positive)
    return torch.stack(losses).mean()


@pytest.mark.parametrize("negatives", ["sequence", "batch"])
@pytest.mark.parametrize("with_bank", [False, True])
def test_token_contrastive_matches_brute_force(negatives, with_bank):
    s, t = torch.randn(2, 5, 6, generator=_gen(20)), torch.randn(2, 5, 6, generator=_gen(21))
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    ids = torch.tensor([[3, 4, 3, 5, 3], [7, 8, 9, 7, 3]])  # repeated tokens are not negatives
    bank = torch.randn(4, 6, generator=_gen(22)) if with_bank else None
    ours = token_contrastive_loss(s, t, mask, 0.5, negatives, bank=bank, token_ids=ids)
    assert torch.allclose(ours, _brute_contrastive(s, t, mask, 0.5, negatives, bank, ids), rtol=1e-5)
    plain = token_contrastive_loss(s, t, mask, 0.5, negatives, bank=bank)
    assert torch.allclose(plain, _brute_contrastive(s, t, mask, 0.5, negatives, bank), rtol=1e-5)


def test_token_contrastive_padding_and_gradients():
    s = torch.randn(2, 4, 8, generator=_gen(23), requires_grad=True)
    t = torch.randn(2, 4, 8, generator=_gen(24))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    loss = token_contrastive_loss(s, t, mask, 0.1)
    padded = token_contrastive_loss(
        _pad_time(s.detach(), 2), _pad_time(t, 2, seed=98), F.pad(mask, (0, 2)), 0.1
    )
    assert torch.allclose(padded, loss.detach(), rtol=1e-5)
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad[0, 3].abs().sum() == 0  # padding gets no gradient
    with torch.no_grad():  # a step against the gradient lowers the loss: student moves toward teacher
        lower = token_contrastive_loss(s - 0.5 * s.grad, t, mask, 0.1)
    assert lower < loss


def test_token_contrastive_orthogonal_match_is_near_zero_and_errors():
    eye = torch.eye(4).unsqueeze(0)  # (1, 4, 4)
    assert float(token_contrastive_loss(eye, eye, temperature=0.01)) < 1e-6
    assert float(token_contrastive_loss(eye, eye.flip(1), temperature=0.01)) > 10  # wrong positives
    with pytest.raises(ValueError, match="negatives"):
        token_contrastive_loss(eye, eye, negatives="queue")
    with pytest.raises(ValueError, match="temperature"):
        token_contrastive_loss(eye, eye, temperature=0)


# --------------------------------------------------------------------------- layer map


def test_uniform_layer_map():
    assert uniform_layer_map(4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert uniform_layer_map(2, 6) == [(0, 2), (1, 5)]
    assert uniform_layer_map(4, 2) == [(0, 0), (1, 0), (2, 0), (3, 1)]
    assert all(t == math.floor((s + 1) * 30 / 10) - 1 for s, t in uniform_layer_map(10, 30))
    with pytest.raises(ValueError, match="layer counts"):
        uniform_layer_map(0, 3)
