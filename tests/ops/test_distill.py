"""Distillation losses against torch.nn.functional references and brute-force loops; KDConfig
validation; prepare_ / distillation_terms in a training loop of one's own (no Lightning)."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightcook.ops.distill import (
    KDConfig,
    MemoryBank,
    attention_loss,
    capture_features,
    distillation_terms,
    hidden_mse,
    kd_logits_loss,
    parse_hidden_map,
    prepare_,
    real_positions,
    resolve_teacher_dtype,
    starting_copy,
    teacher_inputs,
    token_contrastive_loss,
    uniform_layer_map,
)
from tests.helpers import TINY_LLAMA


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


def test_parse_hidden_map_defaults_to_post():
    (pair,) = parse_hidden_map([" [pre]model.layers.0 : model.layers.2 "])
    assert (pair.student, pair.student_point, pair.teacher, pair.teacher_point) == (
        "model.layers.0",
        "pre",
        "model.layers.2",
        "post",
    )


# --------------------------------------------------------------------------- KDConfig


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"logits_scale": 0.0}, r"^logits_scale: every distillation scale is 0"),
        ({"task_scale": -0.5}, r"^task_scale: must lie in \[0.0, inf\], got -0.5"),
        ({"contrastive_scale": float("nan")}, r"^contrastive_scale: must be a finite number"),
        ({"temperature": -1.0}, r"^temperature: must be > 0.0, got -1.0"),
        ({"contrastive_temperature": "hot"}, r"^contrastive_temperature: must be a number"),
        ({"teacher_dtype": "int4"}, r"^teacher_dtype: got 'int4'; allowed: None, 'auto', 'float32'"),
        ({"memory_bank_size": 1.5}, r"^memory_bank_size: must be an integer"),
        ({"hidden_scale": 1.0, "hidden_map": ["a:b:c"]}, r"^hidden_map\[0\]: 'a:b:c' is not"),
        ({"attention_layers": "all"}, r"^attention_layers: expected 'uniform' or a non-empty list"),
        ({"attention_layers": []}, r"^attention_layers: expected 'uniform' or a non-empty list"),
    ],
)
def test_kd_config_validates_itself_without_a_prefix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KDConfig(**kwargs)


def test_kd_config_lists_become_tuples_and_shape_fields():
    config = KDConfig(hidden_scale=1.0, hidden_map=["a:b"], attention_layers=["0:1"], memory_bank_size=4)
    assert config.hidden_map == ("a:b",) and config.attention_layers == ("0:1",)
    assert hash(config) == hash(
        KDConfig(hidden_scale=1.0, hidden_map=("a:b",), attention_layers=("0:1",), memory_bank_size=4)
    )
    assert config.shape() == {"hidden_map": ["a:b"], "projection": True, "memory_bank_size": 4}
    assert config.student_points == [("a", "post")] and config.teacher_points == [("b", "post")]
    assert KDConfig(attention_scale=1.0, contrastive_scale=1.0).forward_kwargs() == {
        "output_attentions": True,
        "output_hidden_states": True,
    }
    with pytest.raises(ValueError, match=r"^compress.kd.memory_bank_size: must lie"):
        KDConfig.build("compress.kd.", memory_bank_size=-2)


# --------------------------------------------------------------------------- a loop of one's own


def _tiny(width: int = 32, layers: int = 2, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    fields = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    fields.update(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields))


def test_plain_loop_terms_match_references_and_train_the_projection():
    student, teacher = _tiny(), _tiny(width=48, layers=4, seed=1)
    config = KDConfig(
        task_scale=0.5,
        logits_scale=2.0,
        temperature=2.0,
        hidden_scale=3.0,
        hidden_map=["model.layers.0:model.layers.1"],
        contrastive_scale=1.0,
        memory_bank_size=10,
    )
    plan = prepare_(student, teacher, config)
    assert set(plan.projections) == {"hidden_0", "contrastive"} and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    optimizer = torch.optim.SGD([*student.parameters(), *plan.projections.parameters()], lr=0.1)
    bank = MemoryBank(config.memory_bank_size)
    ids = torch.randint(0, 256, (2, 6), generator=_gen(30))
    batch = {"input_ids": ids, "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2]), "labels": ids}
    before = plan.projections["hidden_0"].weight.detach().clone()
    for step in range(2):
        with capture_features(student, config.student_points) as s_feats:
            s_out = student(**batch, **config.forward_kwargs())
        with torch.no_grad(), capture_features(teacher, config.teacher_points) as t_feats:
            t_out = teacher(**teacher_inputs(batch, student, teacher), **config.forward_kwargs())
        masks = real_positions(batch)
        terms = distillation_terms(
            config,
            plan,
            s_out,
            t_out,
            masks,
            student_features=s_feats,
            teacher_features=t_feats,
            token_ids=ids,
            bank=bank,
        )
        if step == 0:  # against references outside our code, before any update
            real = masks["decoder"]
            kl = F.kl_div(
                F.log_softmax(s_out.logits[real] / 2, -1),
                F.log_softmax(t_out.logits[real] / 2, -1),
                log_target=True,
                reduction="batchmean",
            )
            assert torch.allclose(terms["logits"], 2.0 * 4.0 * kl, rtol=1e-4)
            s_hidden = plan.projections["hidden_0"](s_feats[("model.layers.0", "post")])
            mse = F.mse_loss(s_hidden[real], t_feats[("model.layers.1", "post")][real])
            assert torch.allclose(terms["hidden"], 3.0 * mse, rtol=1e-5)
            assert bank.tensor.shape == (10, 48)  # this step's teacher tokens (10 real) went in
        loss = config.task_scale * s_out.loss + sum(terms.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not torch.equal(plan.projections["hidden_0"].weight, before)  # the projection trained


def test_prepare_rejects_mismatched_pairs():
    student = _tiny()
    with pytest.raises(
        ValueError,
        match=r"^hidden_map\[0\]: widths differ \(student 32, teacher 48\) and projection is false",
    ):
        prepare_(
            student,
            _tiny(width=48),
            KDConfig(hidden_scale=1.0, hidden_map=["model.norm:model.norm"], projection=False),
        )
    with pytest.raises(ValueError, match=r"^attention_layers: pair 0:5 is out of range"):
        prepare_(student, _tiny(), KDConfig(attention_scale=1.0, attention_layers=["0:5"]))
    other = _tiny()
    other.resize_token_embeddings(300)
    with pytest.raises(ValueError, match=r"^teacher: vocabulary mismatch: .* 300 tokens, the student 256"):
        prepare_(student, other, KDConfig())


def test_starting_copy_rebuilds_and_refuses_moved_weights():
    student = _tiny()
    teacher = starting_copy(student)
    assert teacher is not student and type(teacher) is type(student)
    assert all(
        torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), student.state_dict().values())
    )
    mlp = student.model.layers[0].mlp
    mlp.down_proj = torch.nn.Sequential(mlp.down_proj)  # a module swap moves the weight
    with pytest.raises(ValueError, match=r"^teacher: its weights \['model.layers.0.mlp.down_proj.weight'\]"):
        starting_copy(student)
    with pytest.raises(ValueError, match=r"^teacher: it is not a Hugging Face model"):
        starting_copy(torch.nn.Linear(2, 2), rebuild_only=True)


def test_memory_bank_keeps_the_newest_and_real_positions():
    bank = MemoryBank(3, torch.arange(8.0).reshape(4, 2))
    assert bank.tensor.shape == (3, 2)
    bank.push(torch.full((2, 2), -1.0))
    assert bank.tensor[:, 0].tolist() == [-1.0, -1.0, 0.0]
    off = MemoryBank(0)
    off.push(torch.ones(2, 2))
    assert off.tensor is None
    batch = {"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1, 0]])}
    labels = torch.tensor([[-100, 5, 5, 5]])
    assert real_positions(batch, labels)["decoder"].tolist() == [[False, True, True, False]]
    seq2seq = real_positions(batch, labels, encoder_decoder=True)
    assert seq2seq["encoder"].tolist() == [[True, True, True, False]]
    assert seq2seq["decoder"].tolist() == [[False, True, True, True]]


@pytest.mark.parametrize(
    ("name", "expected"), [("bf16", torch.bfloat16), ("fp16", torch.float16), (None, None)]
)
def test_teacher_dtype_casts_the_teacher_and_auto_follows_the_device(name, expected):
    from lightcook.ops.kernels import bf16_supported

    student, teacher = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    prepare_(student, teacher, KDConfig(teacher_dtype=name))
    assert teacher.weight.dtype == (expected or torch.float32) and student.weight.dtype == torch.float32
    auto = torch.nn.Linear(4, 3)
    prepare_(student, auto, KDConfig(teacher_dtype="auto"), device="cpu")
    native = bf16_supported("cpu")
    assert auto.weight.dtype == (torch.bfloat16 if native else torch.float32) == resolve_teacher_dtype("auto")
