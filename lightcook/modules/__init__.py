"""Generic LightningModules over Hugging Face language models."""

from lightcook.modules.lm import CausalLMModule, LMModule, Seq2SeqLMModule

__all__ = ["CausalLMModule", "LMModule", "Seq2SeqLMModule"]
