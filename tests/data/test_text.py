import pytest
import torch

from lightcook.data import Seq2SeqDataModule, TextDataModule, collect_documents, load_tokenizer
from lightcook.data.text import SINGLE_FILE_PIECES, shakespeare_files, split_documents


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


def test_shakespeare_has_38_plays():
    assert len(shakespeare_files()) == 38


def test_split_is_by_document_deterministic_and_disjoint():
    docs = [f"doc {i} " * 10 for i in range(40)]
    train, val = split_documents(docs, 0.1, seed=3)
    assert len(val) == 4 and len(train) == 36
    assert not set(train) & set(val) and set(train) | set(val) == set(docs)
    assert split_documents(docs, 0.1, seed=3) == (train, val)
    assert split_documents(docs, 0.1, seed=4)[1] != val


def test_validation_blocks_never_appear_in_training(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTCOOK_CACHE", str(tmp_path))
    lines = [f"Line {i}: the quick brown fox number {i * 7919 % 10007} jumps.\n" for i in range(3000)]
    for d in range(10):
        (tmp_path / f"doc{d}.txt").write_text("".join(lines[d * 300 : (d + 1) * 300]))
    dm = TextDataModule(tokenizer, paths=[str(tmp_path)], block_size=32, batch_size=2, val_fraction=0.2)
    dm.setup()
    train = {tuple(r.tolist()) for r in dm.train_set.columns["input_ids"]}
    val = {tuple(r.tolist()) for r in dm.val_set.columns["input_ids"]}
    assert train and val and not train & val
    # every token row is a real block: full length, EOS between documents
    assert dm.train_set.columns["input_ids"].shape[1] == 32
    assert (dm.train_set.columns["input_ids"] == tokenizer.eos_token_id).sum() >= 7


def test_token_cache_is_reused_and_keyed_by_block_size(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTCOOK_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"verse {i} of a long poem\n" for i in range(2000)))
    TextDataModule(tokenizer, paths=[str(corpus)], block_size=16).setup()
    cached = sorted((tmp_path / "cache" / "tokens").glob("*.pt"))
    assert len(cached) == 2  # train + val
    stamps = [p.stat().st_mtime_ns for p in cached]
    TextDataModule(tokenizer, paths=[str(corpus)], block_size=16).setup()
    assert [p.stat().st_mtime_ns for p in cached] == stamps
    TextDataModule(tokenizer, paths=[str(corpus)], block_size=24).setup()
    assert len(list((tmp_path / "cache" / "tokens").glob("*.pt"))) == 4
    corpus.write_text(corpus.read_text() + "one more line\n")
    TextDataModule(tokenizer, paths=[str(corpus)], block_size=16).setup()
    assert len(list((tmp_path / "cache" / "tokens").glob("*.pt"))) >= 5


def test_single_file_is_cut_into_documents(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("".join(f"line {i}\n" for i in range(100)))
    docs = collect_documents([str(f)])
    assert len(docs) == SINGLE_FILE_PIECES and "".join(docs) == f.read_text()


@pytest.mark.parametrize(
    ("paths", "match"),
    [
        (["/no/such/dir"], "data.paths: '/no/such/dir' does not exist"),
        ("EMPTY", "data.paths: no non-empty text"),
    ],
)
def test_bad_paths_name_the_key(tmp_path, paths, match):
    if paths == "EMPTY":
        (tmp_path / "empty.txt").write_text("  \n")
        paths = [str(tmp_path)]
    with pytest.raises(ValueError, match=match):
        collect_documents(paths)


def test_bad_settings_name_the_key(tokenizer):
    with pytest.raises(ValueError, match="data.block_size"):
        TextDataModule(tokenizer, block_size=1)
    with pytest.raises(ValueError, match="data.batch_size"):
        TextDataModule(tokenizer, batch_size=0)
    with pytest.raises(ValueError, match="data.val_fraction"):
        split_documents(["a", "b"], 1.5, 0)


def test_seq2seq_next_line_task(tokenizer):
    dm = Seq2SeqDataModule(tokenizer, source_length=48, target_length=16, batch_size=3)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (3, 48) and batch["labels"].shape == (3, 16)
    # padding is masked: attention 0 where the source is padded, labels -100 after the target's EOS
    assert set(batch["attention_mask"].unique().tolist()) <= {0, 1}
    for row in batch["labels"]:
        real = row[row != -100]
        assert real[-1] == tokenizer.eos_token_id and (row[len(real) :] == -100).all()
    assert len(dm.val_set) > 100 and torch.is_tensor(dm.val_set[0]["labels"])
