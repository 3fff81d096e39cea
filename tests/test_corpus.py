"""Tests for t2r_export.data.corpus: stdlib split, user files, token streams, block iterators."""

import itertools
import json
from collections import Counter

import numpy as np
import pytest
import torch

from t2r_export.data import corpus
from t2r_export.data.tokenizer import train_bpe_tokenizer


def _relative(path):
    return path.relative_to(corpus.stdlib_root()).as_posix()


def test_split_of_depends_only_on_the_path():
    assert corpus.split_of("json/decoder.py") == corpus.split_of("json/decoder.py")
    assert {corpus.split_of(f"pkg/module_{i}.py") for i in range(200)} == {"train", "valid", "test"}


def test_stdlib_files_are_sorted_and_exclude_installed_packages():
    files = corpus.stdlib_files()
    relative = [_relative(p) for p in files]
    assert relative == sorted(relative)
    assert len(files) > 100
    assert not any("site-packages" in r or "dist-packages" in r for r in relative)


def test_stdlib_split_is_about_90_5_5():
    counts = Counter(corpus.split_of(_relative(p)) for p in corpus.stdlib_files())
    total = sum(counts.values())
    assert 0.85 < counts["train"] / total < 0.95
    assert 0.02 < counts["valid"] / total < 0.08
    assert 0.02 < counts["test"] / total < 0.08


def test_no_file_is_in_two_splits():
    splits = {split: set(corpus.split_files(split)) for split in corpus.SPLITS}
    for a, b in itertools.combinations(corpus.SPLITS, 2):
        assert not splits[a] & splits[b]
    assert set().union(*splits.values()) == set(corpus.stdlib_files())


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        corpus.read_split("dev")


def test_read_text_files_reads_txt_md_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.md").write_text("# beta")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "gamma"}) + "\n\n" + json.dumps({"text": "delta"}) + "\n")
    (tmp_path / "ignored.bin").write_bytes(b"\x00")
    assert corpus.read_text_files(tmp_path) == ["alpha", "# beta", "gamma", "delta"]
    assert corpus.read_text_files([tmp_path / "c.jsonl", str(tmp_path / "a.txt")]) == ["gamma", "delta", "alpha"]


def test_read_text_files_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        corpus.read_text_files(tmp_path / "missing")
    with pytest.raises(ValueError, match="no documents"):
        corpus.read_text_files(tmp_path)
    (tmp_path / "bad.jsonl").write_text("{not json}\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1 is not valid JSON"):
        corpus.read_text_files(tmp_path / "bad.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match='no string field "text"'):
        corpus.read_text_files(tmp_path / "bad.jsonl")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported data file"):
        corpus.read_text_files(tmp_path / "data.csv")


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return train_bpe_tokenizer(corpus.read_split("valid", max_files=3), vocab_size=300)


def test_tokenize_documents_ends_every_document_with_eos(tiny_tokenizer):
    stream = corpus.tokenize_documents(tiny_tokenizer, ["x = 1\n", "", "print(x)\n"])
    eos = tiny_tokenizer.eos_token_id
    assert stream.dtype == np.int32
    assert stream[-1] == eos
    assert (stream == eos).sum() == 3
    first = stream[: list(stream).index(eos)]
    assert tiny_tokenizer.decode(first.tolist()) == "x = 1\n"


def test_stdlib_token_stream_is_cached(tiny_tokenizer, tmp_path):
    stream = corpus.stdlib_token_stream(tiny_tokenizer, "test", cache_dir=tmp_path, max_files=2)
    cached = list(tmp_path.glob("*.npy"))
    assert len(cached) == 1 and "tmp" not in cached[0].name
    again = corpus.stdlib_token_stream(tiny_tokenizer, "test", cache_dir=tmp_path, max_files=2)
    np.testing.assert_array_equal(stream, again)
    # a different file list is a different cache entry
    corpus.stdlib_token_stream(tiny_tokenizer, "test", cache_dir=tmp_path, max_files=1)
    assert len(list(tmp_path.glob("*.npy"))) == 2


def _stream(n=1000):
    return np.arange(n, dtype=np.int32)


def test_iter_blocks_shapes_and_shifted_targets():
    batch = next(corpus.iter_blocks(_stream(), block_size=16, batch_size=4, seed=0))
    assert batch.shape == (4, 17) and batch.dtype == torch.int64
    # arange stream: every block is consecutive and starts on a block boundary
    assert torch.equal(batch[:, 1:], batch[:, :-1] + 1)
    assert (batch[:, 0] % 16 == 0).all()


def test_iter_blocks_is_deterministic_per_seed():
    take = lambda seed: list(itertools.islice(corpus.iter_blocks(_stream(), 16, 4, seed), 5))
    assert all(torch.equal(a, b) for a, b in zip(take(1), take(1)))
    assert not all(torch.equal(a, b) for a, b in zip(take(1), take(2)))


def test_iter_blocks_epoch_visits_every_block_once():
    # 1000 tokens -> 62 blocks of 16 -> 15 batches of 4 per epoch (2 blocks dropped)
    epoch = torch.cat(list(itertools.islice(corpus.iter_blocks(_stream(), 16, 4, seed=3), 15)))
    starts = epoch[:, 0].tolist()
    assert len(set(starts)) == 60


@pytest.mark.parametrize("k", [1, 7, 15, 33])
def test_iter_blocks_resume_matches_skipping(k):
    fresh = list(itertools.islice(corpus.iter_blocks(_stream(), 16, 4, seed=5), k + 4))[k:]
    resumed = list(itertools.islice(corpus.iter_blocks(_stream(), 16, 4, seed=5, start_step=k), 4))
    assert all(torch.equal(a, b) for a, b in zip(fresh, resumed))


def test_iter_blocks_rejects_short_stream():
    with pytest.raises(ValueError, match="too short for one batch"):
        next(corpus.iter_blocks(_stream(50), block_size=16, batch_size=4, seed=0))
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        next(corpus.iter_blocks(_stream(), block_size=0, batch_size=4, seed=0))


def test_eval_blocks_predict_every_token_once():
    stream = _stream(100)
    blocks = list(corpus.eval_blocks(stream, block_size=16))
    assert [len(b) for b in blocks] == [17] * 6 + [4]
    targets = torch.cat([b[1:] for b in blocks])
    assert torch.equal(targets, torch.from_numpy(stream[1:].astype(np.int64)))
