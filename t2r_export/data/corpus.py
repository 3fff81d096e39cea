"""Text corpora for the bundled teacher and for user data, as flat token streams.

The default corpus is the CPython standard library source of the running interpreter: every
``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` except installed packages
(``site-packages``, ``dist-packages``). It is present wherever Python is, so training and
evaluation work offline.

Files are split deterministically by their relative POSIX path: the first 8 hex digits of the
path's sha1, as an integer mod 100, put a file in ``train`` (0-89, 90%), ``valid`` (90-94, 5%)
or ``test`` (95-99, 5%). A whole file always lands in one split, so no text is shared between
splits, and the split of a file never depends on which other files exist.

A corpus becomes one flat int32 token stream (each document followed by the EOS id), which
``iter_blocks`` cuts into training batches and ``eval_blocks`` into evaluation blocks.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from ..cache import cache_root

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
TEXT_SUFFIXES = (".txt", ".py", ".md")
JSONL_SUFFIX = ".jsonl"
EXCLUDED_DIRS = ("site-packages", "dist-packages")


def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """Every ``*.py`` file of the stdlib (installed packages excluded), sorted by relative POSIX path."""
    return list(_stdlib_files(stdlib_root()))


@functools.lru_cache(maxsize=None)
def _stdlib_files(root: Path) -> tuple[Path, ...]:
    # the stdlib does not change while we run, and walking it takes seconds on a busy machine
    files = [
        path
        for path in root.rglob("*.py")
        if path.is_file() and not any(part in EXCLUDED_DIRS for part in path.relative_to(root).parts)
    ]
    return tuple(sorted(files, key=lambda path: path.relative_to(root).as_posix()))


def split_of(relative_path: str) -> str:
    """The split (``train`` / ``valid`` / ``test``) of a file, from its relative POSIX path alone."""
    bucket = int(hashlib.sha1(relative_path.encode("utf-8")).hexdigest()[:8], 16) % 100
    if bucket < 90:
        return "train"
    if bucket < 95:
        return "valid"
    return "test"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")


def split_files(split: str, max_files: int | None = None) -> list[Path]:
    """The stdlib files of one split, in sorted order; ``max_files`` keeps only the first ones."""
    _check_split(split)
    if max_files is not None and max_files <= 0:
        raise ValueError(f"max_files must be a positive integer or None, got {max_files}")
    root = stdlib_root()
    files = [path for path in stdlib_files() if split_of(path.relative_to(root).as_posix()) == split]
    if not files:
        raise ValueError(f"the {split} split of the standard library at {root} is empty: no *.py files found")
    return files[:max_files] if max_files is not None else files


def _read(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def read_split(split: str, max_files: int | None = None) -> list[str]:
    """Texts of the stdlib files of one split (utf-8, undecodable bytes replaced)."""
    return [_read(path) for path in split_files(split, max_files)]


def _expand(path: Path) -> list[Path]:
    if not path.exists():
        raise ValueError(f"data path {path} does not exist: expected a file or directory of .txt/.py/.md/.jsonl")
    if path.is_file():
        return [path]
    suffixes = TEXT_SUFFIXES + (JSONL_SUFFIX,)
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    for line_no, line in enumerate(_read(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{line_no} is not valid JSON ({err.msg}): expected one object per line") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f'{path}:{line_no} has no string field "text": expected {{"text": "..."}} per line')
        docs.append(record["text"])
    return docs


def read_text_files(paths: Path | str | Iterable[Path | str]) -> list[str]:
    """Documents from user files: ``.txt``/``.py``/``.md`` are one document each, ``.jsonl`` one per line.

    A directory stands for every such file under it, in sorted order.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    docs: list[str] = []
    for path in paths:
        for file in _expand(Path(path)):
            if file.suffix == JSONL_SUFFIX:
                docs.extend(_read_jsonl(file))
            elif file.suffix in TEXT_SUFFIXES:
                docs.append(_read(file))
            else:
                raise ValueError(f"unsupported data file {file}: expected .txt, .py, .md or .jsonl")
    docs = [doc for doc in docs if doc]
    if not docs:
        raise ValueError(f"no documents found in {[str(p) for p in paths]}: expected non-empty .txt/.py/.md/.jsonl files")
    return docs


def _backend(tokenizer):
    # a transformers fast tokenizer wraps a tokenizers.Tokenizer; accept either
    return getattr(tokenizer, "backend_tokenizer", tokenizer)


def tokenize_documents(tokenizer, docs: Sequence[str]) -> np.ndarray:
    """One flat int32 token stream ``[N]``: each document's tokens followed by the EOS id."""
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token_id: expected a tokenizer with an end-of-sequence token")
    # no special tokens per document: the EOS separator is the only one
    encodings = _backend(tokenizer).encode_batch(list(docs), add_special_tokens=False)
    pieces = []
    for encoding in encodings:
        pieces.append(np.asarray(encoding.ids, dtype=np.int32))
        pieces.append(np.asarray([eos_id], dtype=np.int32))
    if not pieces:
        return np.zeros(0, dtype=np.int32)
    return np.concatenate(pieces)


def cache_dir_default() -> Path:
    """The package's one cache root (``t2r_export.cache``)."""
    return cache_root()


def _stream_key(tokenizer, split: str, files: Sequence[Path]) -> str:
    digest = hashlib.sha1()
    digest.update(_backend(tokenizer).to_str().encode("utf-8"))
    digest.update(f"\0{sys.version}\0{split}\0".encode("utf-8"))
    root = stdlib_root()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode("utf-8") + b"\0")
    return digest.hexdigest()


def stdlib_token_stream(
    tokenizer, split: str, cache_dir: Path | str | None = None, max_files: int | None = None
) -> np.ndarray:
    """The token stream ``[N]`` int32 of one stdlib split, cached as ``.npy``.

    The cache key hashes the tokenizer.json contents, the Python version, the split and the file
    list, so a different tokenizer or interpreter never reads a stale stream.
    """
    files = split_files(split, max_files)
    cache = Path(cache_dir) if cache_dir is not None else cache_dir_default()
    target = cache / f"stdlib-{split}-{_stream_key(tokenizer, split, files)}.npy"
    if target.exists():
        logger.info("token stream for %s split read from cache %s", split, target)
        return np.load(target)
    stream = tokenize_documents(tokenizer, [_read(path) for path in files])
    cache.mkdir(parents=True, exist_ok=True)
    # write then rename, so a killed run never leaves a truncated cache file behind
    tmp = target.with_name(f"{target.stem}.tmp-{os.getpid()}.npy")
    np.save(tmp, stream)
    os.replace(tmp, target)
    logger.info("tokenized %s split: %d files, %d tokens, cached at %s", split, len(files), len(stream), target)
    return stream


def _block_count(stream: np.ndarray, block_size: int) -> int:
    if block_size <= 0:
        raise ValueError(f"block_size must be a positive integer, got {block_size}")
    return max(0, (len(stream) - 1) // block_size)


def _block(stream: np.ndarray, index: int, block_size: int) -> np.ndarray:
    start = index * block_size
    return stream[start : start + block_size + 1]


def iter_blocks(
    stream: np.ndarray, block_size: int, batch_size: int, seed: int, start_step: int = 0
) -> Iterator[torch.Tensor]:
    """Endless, seeded batches ``[batch_size, block_size + 1]`` int64 (inputs + shifted targets).

    Block ``i`` is ``stream[i*block_size : i*block_size + block_size + 1]``: inputs never overlap,
    the last token of a block is the first of the next. Epoch ``e`` visits the blocks in the order
    ``np.random.default_rng(seed + e).permutation``; a last incomplete batch is dropped. Batch
    number ``n`` depends only on (stream, block_size, batch_size, seed, n), so ``start_step=k``
    yields exactly the batches a fresh iterator yields after its first ``k``.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    n_blocks = _block_count(stream, block_size)
    batches_per_epoch = n_blocks // batch_size
    if batches_per_epoch == 0:
        raise ValueError(
            f"the token stream ({len(stream)} tokens) is too short for one batch of {batch_size} blocks of "
            f"{block_size + 1} tokens: expected at least {batch_size * block_size + 1} tokens"
        )
    epoch, offset = divmod(start_step, batches_per_epoch)
    while True:
        order = np.random.default_rng(seed + epoch).permutation(n_blocks)
        for batch_index in range(offset, batches_per_epoch):
            chosen = order[batch_index * batch_size : (batch_index + 1) * batch_size]
            batch = np.stack([_block(stream, int(i), block_size) for i in chosen])
            yield torch.from_numpy(batch.astype(np.int64))
        epoch, offset = epoch + 1, 0


def eval_blocks(stream: np.ndarray, block_size: int) -> Iterator[torch.Tensor]:
    """Every block ``[block_size + 1]`` int64 of the stream, in order, then the shorter tail block.

    Together the blocks predict every token after the first exactly once.
    """
    n_blocks = _block_count(stream, block_size)
    for index in range(n_blocks):
        yield torch.from_numpy(_block(stream, index, block_size).astype(np.int64))
    tail = stream[n_blocks * block_size :]
    if len(tail) >= 2:
        yield torch.from_numpy(tail.astype(np.int64))
