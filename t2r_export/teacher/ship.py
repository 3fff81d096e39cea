"""Store a trained model as a bundled one: fp16 weights on disk (half the size), fp32 compute.

    t2r-export ship runs/t2r-c t2r_export/teacher/t2r

Copies the tokenizer and the run's record (finetune.json / training.json) beside the weights,
and writes the directory atomically.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..atomic import atomic_dir

RECORDS = ("finetune.json", "training.json", "tokenizer.json", "tokenizer_config.json")


def ship(src: Path, dst: Path) -> None:
    from ..models import load_causal_lm
    from ..train.checkpoint import save_weights

    model = load_causal_lm(src)
    # shipping replaces the bundled model, a folder this tool wrote; any other folder is refused
    with atomic_dir(dst, overwrite=True, inputs=[src]) as tmp:
        save_weights(model, tmp, "float16")
        for name in RECORDS:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
