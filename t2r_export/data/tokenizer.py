"""The bundled teacher's tokenizer: byte-level BPE trained with the ``tokenizers`` library.

Byte-level means every byte string is encodable (no unknown tokens in practice) and
``decode(encode(text)) == text`` for any text. The one special token, ``<|endoftext|>``, serves
as BOS, EOS, UNK and PAD, as in GPT-2. The saved ``tokenizer.json`` carries its own decoder, so the
torch-free runtime can load it with plain ``tokenizers.Tokenizer.from_file``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

ENDOFTEXT = "<|endoftext|>"
# 256 byte symbols + the special token is the smallest vocabulary byte-level BPE can have
MIN_VOCAB_SIZE = 257
# the files a saved Hugging Face tokenizer may consist of
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "special_tokens_map.json")


def train_bpe_tokenizer(
    docs: Iterable[str], vocab_size: int = 4096, model_max_length: int | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``docs``; deterministic for the same docs and vocab size."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + {ENDOFTEXT}), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    # no prefix space: source code is not English prose, and a leading space would change round trips
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT],
        # the full byte alphabet, so bytes unseen in training still encode
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(docs, trainer=trainer)
    logger.info("trained byte-level BPE tokenizer with %d tokens", tokenizer.get_vocab_size())
    extra = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        **extra,
    )


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer saved in folder ``path`` (or a tokenizer.json file); one ValueError line naming the
    file when it is unusable.

    Custom tokenizer code (``auto_map``) is refused unless ``trust_remote_code``; transformers is
    always told explicitly, so it never asks on a terminal.
    """
    from transformers import AutoTokenizer

    from ..trust import check_remote_code

    path = Path(path)
    # a tokenizer.json beside its tokenizer_config.json loads with its special tokens (eos, pad, ...)
    if path.is_file() and path.name == "tokenizer.json" and (path.parent / "tokenizer_config.json").is_file():
        path = path.parent
    if path.is_file() and path.name == "tokenizer.json":
        _check_json(path)
        try:
            return PreTrainedTokenizerFast(tokenizer_file=str(path))
        except Exception as err:  # noqa: BLE001 - tokenizers raises its own exception types for bad files
            raise ValueError(f"{path} is not a readable tokenizer.json ({str(err).splitlines()[0]})") from None
    if not path.is_dir():
        raise ValueError(f"tokenizer {path} not found: expected a directory with tokenizer.json (or the file)")
    check_remote_code(path, trust_remote_code)
    files = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
    if not files:
        raise ValueError(f"no tokenizer in {path}: expected tokenizer.json (or vocab.json + merges.txt) "
                         "beside the model, or pass --tokenizer")
    for file in files:
        if file.suffix == ".json":
            _check_json(file)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # tokenizers raises bare Exception on a corrupt tokenizer.json
        text = (str(err).strip() or type(err).__name__).splitlines()[0][:200]
        raise ValueError(f"the tokenizer in {path} cannot be loaded ({', '.join(f.name for f in files)}): "
                         f"{text}") from None


def _check_json(file: Path) -> None:
    """One line naming ``file`` when it is not readable UTF-8 JSON."""
    import json

    try:
        json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{file} is not UTF-8 text; expected a JSON tokenizer file") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON (line {err.lineno}: {err.msg}); re-save the tokenizer") from None
