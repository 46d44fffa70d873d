import math

import pytest
import torch
import torch.nn.functional as F

from lightcook.modules import CausalLMModule, Seq2SeqLMModule
from lightcook.modules.lm import warmup_cosine
from tests.helpers import TINY_LLAMA, random_batch


def test_loss_matches_cross_entropy_and_ppl_is_exp_loss():
    module = CausalLMModule(config=TINY_LLAMA).eval()
    batch = random_batch(length=12)
    with torch.no_grad():
        loss, out = module.compute_loss(batch)
        ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, 256), batch["labels"][:, 1:].reshape(-1))
        assert torch.allclose(loss, ref, atol=1e-5)
        logits, labels = module.aligned_logits_and_labels(out.logits, batch["labels"])
        module.val_ppl(logits, labels)
        assert math.isclose(module.val_ppl.compute().item(), math.exp(ref.item()), rel_tol=1e-4)


def test_padding_is_masked_out_of_the_loss():
    module = CausalLMModule(config=TINY_LLAMA).eval()
    batch = random_batch(batch=1, length=10)
    padded = {k: torch.cat([v, torch.full((1, 6), 7)], dim=1) for k, v in batch.items()}
    padded["attention_mask"][:, 10:] = 0
    with torch.no_grad():
        loss, _ = module.compute_loss(batch)
        loss_padded, _ = module.compute_loss(padded)  # right padding cannot change earlier positions
    assert torch.allclose(loss, loss_padded, atol=1e-6)


def test_seq2seq_t5_loss_and_module_object():
    t5 = {
        "model_type": "t5",
        "vocab_size": 128,
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 64,
        "num_layers": 1,
        "num_heads": 4,
        "decoder_start_token_id": 0,
        "pad_token_id": 0,
    }
    module = Seq2SeqLMModule(config=t5)
    batch = {
        "input_ids": torch.randint(1, 128, (2, 9)),
        "attention_mask": torch.ones(2, 9, dtype=torch.long),
        "labels": torch.tensor([[5, 6, 7, -100], [8, 9, -100, -100]]),
    }
    loss, out = module.compute_loss(batch)
    ref = F.cross_entropy(out.logits.reshape(-1, 128), batch["labels"].reshape(-1), ignore_index=-100)
    assert torch.allclose(loss, ref, atol=1e-5)
    wrapped = CausalLMModule(model=module.model)
    assert wrapped.model is module.model and wrapped.num_parameters() == module.num_parameters()


def test_exactly_one_model_source():
    with pytest.raises(ValueError, match="exactly one of model.name_or_path, model.config"):
        CausalLMModule()
    with pytest.raises(ValueError, match="model.config: needs a 'model_type'"):
        CausalLMModule(config={"hidden_size": 8})


def test_unknown_model_name_names_the_key():
    with pytest.raises(ValueError, match="model.name_or_path='/no/such/model'"):
        CausalLMModule(name_or_path="/no/such/model")


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 4, 20, 0.1) == 0.25 and warmup_cosine(3, 4, 20, 0.1) == 1.0
    assert warmup_cosine(4, 4, 20, 0.1) == 1.0
    assert math.isclose(warmup_cosine(12, 4, 20, 0.1), 0.55)
    assert math.isclose(warmup_cosine(20, 4, 20, 0.1), 0.1) and math.isclose(
        warmup_cosine(99, 4, 20, 0.1), 0.1
    )


def test_weight_decay_only_on_matrices(tmp_path):
    from lightning.pytorch import Trainer

    module = CausalLMModule(config=TINY_LLAMA, weight_decay=0.1)
    module.trainer = Trainer(max_steps=5, logger=False, default_root_dir=tmp_path)
    opt = module.configure_optimizers()["optimizer"]
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.ndim >= 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.ndim < 2 for p in plain["params"])


def test_pretrained_network_starts_in_training_mode(tmp_path):
    # from_pretrained returns eval mode and Lightning keeps the mode it finds: dropout would stay off
    CausalLMModule(config=TINY_LLAMA).model.save_pretrained(tmp_path)
    module = CausalLMModule(name_or_path=str(tmp_path))
    assert module.model.training and all(m.training for m in module.model.modules())
