"""Text DataModules: files, folders or the packaged Shakespeare corpus, tokenized and packed."""

from lightcook.data.text import Seq2SeqDataModule, TextDataModule, collect_documents, load_tokenizer

__all__ = ["Seq2SeqDataModule", "TextDataModule", "collect_documents", "load_tokenizer"]
