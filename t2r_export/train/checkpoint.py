"""Checkpoint and model I/O shared by the training recipes.

Every directory is written through :func:`t2r_export.atomic.atomic_dir` (beside the target, then
one rename), so a crash never leaves a half-written checkpoint or model where a finished one was.
A checkpoint restores model, optimizer, scheduler, RNG and the recipe's own state (data position).
"""

from __future__ import annotations

import base64
import json
import logging
import random
from pathlib import Path

import numpy as np
import torch

from t2r_export.atomic import atomic_dir
from t2r_export.train.distributed import Distributed, gather_model_state, gather_optimizer_state

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
ADAPTER_DIR = "adapter"
DAMAGED_HINT = "the checkpoint is damaged: delete it to start over, or restore it from a copy"


def rng_state() -> dict:
    pack = lambda t: base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")  # noqa: E731
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": pack(torch.get_rng_state()),
        "cuda": [pack(t) for t in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }


def set_rng_state(state: dict) -> None:
    unpack = lambda s: torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)  # noqa: E731
    torch.set_rng_state(unpack(state["torch"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([unpack(s) for s in state["cuda"]])
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))


def save_model(model, tokenizer, directory: Path, state_dict: dict | None = None) -> None:
    """A plain HF model directory; a LoRA model writes its unmerged base plus ``adapter/``.

    ``state_dict``: the gathered full weights of an FSDP-sharded model.
    """
    if state_dict is not None:
        model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
    elif hasattr(model, "peft_config"):
        base = model.get_base_model()
        # the base weights without the adapters, under their original names: loadable as is
        clean = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if ".lora_" not in k}
        base.save_pretrained(directory, state_dict=clean, safe_serialization=True)
        model.save_pretrained(directory / ADAPTER_DIR, safe_serialization=True)
    else:
        model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def save_checkpoint(model, tokenizer, optimizer, scheduler, state: dict, out_dir: Path, dist: Distributed) -> None:
    """Every rank calls it (FSDP gathers); rank 0 writes ``out_dir/checkpoint`` with one rename."""
    model_state = gather_model_state(model, dist)
    optimizer_state = gather_optimizer_state(model, optimizer, dist)
    if not dist.is_main:
        return
    with atomic_dir(out_dir / CHECKPOINT_DIR, overwrite=True, what="checkpoint") as tmp:
        save_model(model, tokenizer, tmp, model_state)
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict()}, tmp / OPTIMIZER_FILE)
        (tmp / STATE_FILE).write_text(json.dumps({**state, "rng": rng_state()}, indent=1) + "\n")
    logger.info("checkpoint: %s step %d -> %s", state["stage"], state["step"], out_dir / CHECKPOINT_DIR)


def load_optimizer_state(model, optimizer, scheduler, checkpoint: Path, dist: Distributed) -> None:
    path = checkpoint / OPTIMIZER_FILE
    try:
        saved = torch.load(path, weights_only=True)
        if not isinstance(saved, dict) or not {"optimizer", "scheduler"} <= saved.keys():
            raise ValueError("not an optimizer/scheduler checkpoint")
    except FileNotFoundError:
        raise ValueError(f"{path} is missing; the checkpoint is incomplete: delete it to start over") from None
    except Exception as err:  # torch.load raises RuntimeError, UnpicklingError, EOFError ... on damage
        text = (str(err).strip() or type(err).__name__).splitlines()[0][:160]
        raise ValueError(f"{path} cannot be read ({text}); {DAMAGED_HINT}") from None
    if dist.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, saved["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])


def read_checkpoint_state(checkpoint: Path) -> dict:
    """The recipe state saved with a checkpoint (``STATE_FILE``), its RNG state included; one
    ValueError line naming the file when it is damaged."""
    path = Path(checkpoint) / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; {DAMAGED_HINT}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON (line {err.lineno}: {err.msg}); {DAMAGED_HINT}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a JSON {type(state).__name__}, expected an object; {DAMAGED_HINT}")
    return state


def save_final(model, tokenizer, record: dict, record_file: str, out_dir: Path,
               state_dict: dict | None = None) -> None:
    """The finished model, its tokenizer and ``record_file`` replace ``out_dir`` in one rename (the
    checkpoint inside ``out_dir``, no longer needed, goes with the old directory)."""
    # the folder holds this run's checkpoint (or a previous run of ours): ours to replace
    with atomic_dir(out_dir, overwrite=True) as tmp:
        save_model(model, tokenizer, tmp, state_dict)
        (tmp / record_file).write_text(json.dumps(record, indent=2) + "\n")


def save_weights(model, directory: Path, save_dtype: str = "float32") -> None:
    """``save_pretrained`` with the weights stored as ``save_dtype``; config.json still says float32,
    so ``from_pretrained`` computes in fp32. The model is left in fp32."""
    model.to(getattr(torch, save_dtype)).save_pretrained(directory, safe_serialization=True)
    model.float()
    config_path = Path(directory) / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
