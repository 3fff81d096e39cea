"""`bench --config NAME`: random-init models of public shapes, for timing at realistic sizes.

The shapes are the one table in ``bench/sizes.py`` (``CONFIGS``). For a name this builds, once,
under the cache root (``t2r_export/cache.py``):

    bench-config/<name>-<key>/softmax   the random-init softmax checkpoint (safetensors, fp32)
    bench-config/<name>-<key>/t2r       its T2R swap (random feature maps: speed needs no training)

and the verified bundle of the T2R model goes where every bench bundle goes
(``bench.run.default_bundle``: keyed by the weights and the exporter's source). Random weights say
nothing about quality; the bench only times them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from .sizes import CONFIGS, MODELS

# the T2R swap every config gets (the project's default feature map and size)
FEATURE_MAP = "t2r"
FEATURE_DIM = 32


def check_config(name: str) -> str:
    """``name`` when it is a known shape; ValueError with one line otherwise (no torch import)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown --config {name!r}; expected one of {', '.join(MODELS)}")
    return name


def _key(name: str, seed: int) -> str:
    import transformers

    config_class, kwargs = CONFIGS[name]
    text = json.dumps([config_class, kwargs, seed, FEATURE_MAP, FEATURE_DIM, transformers.__version__],
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def prepare_config(name: str, cache_root: Path, seed: int = 0, progress=lambda message: None) -> dict:
    """{"softmax": dir, "t2r": dir, "bundle": dir} for shape ``name``, built once into the cache."""
    from .child import run_in_child
    from .run import default_bundle

    check_config(name)
    root = Path(cache_root) / "bench-config" / f"{name}-{_key(name, seed)}"
    if not (root / "t2r" / "config.json").is_file():
        progress(f"{name}: building the random-init checkpoint and its T2R swap in a child process")
        # a child's peak: the random model and its swap are not held by the bench that follows
        run_in_child(_build, name, CONFIGS[name], root, seed, what=f"{name} checkpoint build")
    progress(f"{name}: exporting the T2R bundle in a child process (cached after the first run)")
    bundle = default_bundle(root / "t2r", cache_root)
    return {"softmax": root / "softmax", "t2r": root / "t2r", "bundle": bundle}


def _build(name: str, spec: tuple, root: Path, seed: int) -> None:
    """Checkpoint and swap into a temporary sibling, renamed into place when both are written (run in
    a child process: module level, no callbacks)."""
    import os

    import torch

    from ..models import T2RConfig, load_causal_lm, swap_attention
    from .sizes import build_checkpoint

    work = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        build_checkpoint(name, work / "softmax", seed, spec=spec)
        # the feature maps' random init is seeded too: one name and seed, one model
        torch.manual_seed(seed + 1)
        model = swap_attention(load_causal_lm(work / "softmax").eval(),
                               T2RConfig(feature_map=FEATURE_MAP, feature_dim=FEATURE_DIM))
        model.save_pretrained(work / "t2r", safe_serialization=True)
        for file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(work / "softmax" / file, work / "t2r" / file)
        del model
        shutil.rmtree(root, ignore_errors=True)
        os.replace(work, root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
