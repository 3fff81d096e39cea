"""The bundled models: ``softmax/`` (the pretrained teacher), ``t2r/`` (its T2R finetune, the paper's
recipe) and ``hybrid/`` (Hedgehog + sliding window, LoLCATs' recipe, at 10% of the pretraining tokens).

See README.md beside this file for the commands that made them.
"""

from __future__ import annotations

from pathlib import Path

TEACHER_DIR = Path(__file__).resolve().parent
KINDS = ("softmax", "t2r", "hybrid")


def bundled_model_dir(kind: str = "t2r") -> Path:
    """Path of a bundled model; a clear error when it is missing from this install."""
    if kind not in KINDS:
        raise ValueError(f"unknown bundled model {kind!r}; expected one of {', '.join(KINDS)}")
    path = TEACHER_DIR / kind
    if not (path / "config.json").is_file():
        raise ValueError(f"the bundled {kind} model is missing ({path}); reinstall t2r-export or name a model")
    return path
