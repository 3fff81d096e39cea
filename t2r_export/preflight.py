"""Cheap checks of a command's inputs, run before any heavy import or work (torch-free, well under 2 s).

A model folder, its config, its architecture, its tokenizer and the output path are all checked
here, so a wrong path or a missing tokenizer fails in a second with one ``ValueError`` line
instead of after minutes of loading and exporting. The full checks still run later where the
work happens; these only move the cheap ones to the front.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .architectures import ADAPTERS, base_model_type, supported
from .atomic import check_writable

TOKENIZER_FILE = "tokenizer.json"
# what a slow (python) tokenizer saves instead of tokenizer.json; transformers can still load those
SLOW_TOKENIZER_FILES = ("tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    model_type: str
    is_t2r: bool
    vocab_size: int | None


def check_model_dir(path: Path, what: str = "model", need_t2r: bool = False) -> ModelInfo:
    """A Hugging Face model folder: config.json readable, a supported architecture, safetensors weights."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{what} directory not found: {path} (expected a directory with config.json and "
                         "model.safetensors)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} has no config.json; expected a Hugging Face model directory")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read the model config {config_file}: {err}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str):
        raise ValueError(f"{config_file} names no model_type; expected a Hugging Face model config")
    if base_model_type(model_type) not in ADAPTERS:
        raise ValueError(f"unsupported architecture {model_type!r} in {path}; supported: {supported()}")
    is_t2r = config.get("t2r") is not None
    if need_t2r and not is_t2r:
        raise ValueError(f"{path} is a softmax model, not a T2R model (its config has no t2r settings); "
                         "run `t2r-export swap` (or `finetune`) on it first")
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"{path} has no *.safetensors weights; only safetensors are loaded "
                         "(convert .bin checkpoints with safetensors first)")
    vocab = config.get("vocab_size")
    return ModelInfo(path, model_type, is_t2r, vocab if isinstance(vocab, int) else None)


def tokenizer_file(model_dir: Path | None, tokenizer: Path | None = None) -> Path:
    """The tokenizer.json to use: ``tokenizer`` (the file or a folder holding it), else the model's own."""
    if tokenizer is not None:
        tokenizer = Path(tokenizer)
        candidate = tokenizer / TOKENIZER_FILE if tokenizer.is_dir() else tokenizer
        if not candidate.is_file():
            raise ValueError(f"--tokenizer {tokenizer} not found: expected a tokenizer.json file or a folder "
                             "holding one")
        return candidate
    candidate = Path(model_dir) / TOKENIZER_FILE
    if not candidate.is_file():
        raise ValueError(f"no tokenizer.json in {model_dir}; save the model's fast tokenizer beside it or pass "
                         "--tokenizer PATH")
    return candidate


def check_tokenizer(path: Path, vocab_size: int | None) -> int:
    """Load ``tokenizer.json`` with the tokenizers library (fast, no torch); its vocabulary must fit the
    model's embedding rows. Returns the tokenizer's size."""
    from tokenizers import Tokenizer

    try:
        size = Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
    except Exception as err:  # noqa: BLE001 - tokenizers raises its own exception types for bad files
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{path} is not a readable tokenizer.json ({first})") from None
    if vocab_size is not None and size > vocab_size:
        raise ValueError(f"the tokenizer {path} has {size} tokens but the model only {vocab_size} embedding rows; "
                         "use the tokenizer the model was trained with")
    return size


def check_model_and_tokenizer(model_dir: Path, tokenizer: Path | None = None, what: str = "model",
                              need_t2r: bool = False, need_fast: bool = True) -> ModelInfo:
    """Model folder and tokenizer together (the tokenizer must fit the model's vocabulary).

    ``need_fast`` False (training, evaluation) also accepts a slow tokenizer's files without a
    tokenizer.json; transformers checks those when it loads them. A bundle always needs the fast one.
    """
    info = check_model_dir(model_dir, what, need_t2r)
    slow = any((Path(model_dir) / name).is_file() for name in SLOW_TOKENIZER_FILES)
    if tokenizer is None and not need_fast and slow and not (Path(model_dir) / TOKENIZER_FILE).is_file():
        return info
    check_tokenizer(tokenizer_file(model_dir, tokenizer), info.vocab_size)
    return info


def check_output(out: Path, what: str = "output directory") -> None:
    check_writable(out, what)
