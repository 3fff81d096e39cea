"""Store a trained model as a bundled one: fp16 weights on disk (half the size), fp32 compute.

    python -m t2r_export.teacher.ship runs/t2r-c t2r_export/teacher/t2r

Copies the tokenizer and the run's record (finetune.json / training.json) beside the weights,
and writes the directory atomically.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ..atomic import atomic_dir

RECORDS = ("finetune.json", "training.json", "tokenizer.json", "tokenizer_config.json")


def ship(src: Path, dst: Path) -> None:
    from ..models import load_causal_lm
    from ..train.pretrain import _save_model

    model = load_causal_lm(src)
    # shipping replaces the bundled model, a folder this tool wrote; any other folder is refused
    with atomic_dir(dst, overwrite=True, inputs=[src]) as tmp:
        _save_model(model, tmp, "float16")
        for name in RECORDS:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    args = parser.parse_args()
    ship(args.src, args.dst)
