"""The [bench] extra: everything onnxruntime-genai's peer needs is installed, and its path runs.

`make setup` installs the extra, so in CI these tests run. They skip only where onnxruntime-genai
is absent outside CI; with it installed but a builder import missing, or under CI=true, they fail:
the strongest softmax peer must not drop out of the comparison unnoticed.
"""

from __future__ import annotations

import os
import re
from importlib import metadata

import numpy as np
import pytest
import torch

from t2r_export.bench.peers import GenaiPath, build_genai_model
from t2r_export.tolerances import check_close


def _bench_requirements() -> list[str]:
    """Distribution names the [bench] extra requires (this package's own extras excluded)."""
    names = []
    for req in metadata.requires("t2r-export") or []:
        if re.search(r"""extra\s*==\s*["']bench["']""", req):
            name = re.match(r"[A-Za-z0-9_.\-]+", req).group(0)
            if name.replace("_", "-").lower() != "t2r-export":
                names.append(name)
    return names


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def _require_the_extra() -> None:
    """Skip only where onnxruntime-genai itself is absent outside CI; a partial extra always fails."""
    missing = [name for name in _bench_requirements() if not _installed(name)]
    if not missing:
        return
    if _installed("onnxruntime-genai") or os.environ.get("CI"):
        pytest.fail(f"the [bench] extra is incomplete (missing {', '.join(missing)}); make setup installs it")
    pytest.skip(f"the [bench] extra is not installed (missing {', '.join(missing)})")


def test_the_bench_extra_names_the_builders_imports():
    assert {"onnxruntime-genai", "onnx-ir"} <= {n.lower() for n in _bench_requirements()}


def test_the_genai_builder_and_one_decode_match_transformers(tmp_path):
    """The builder runs on a tiny Llama (head dim 16, as its attention kernel needs) and its decoder
    gives HF's logits after a prefill and one single-token step."""
    _require_the_extra()
    from transformers import LlamaConfig, LlamaForCausalLM

    from t2r_export.data.tokenizer import train_bpe_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "softmax")
    train_bpe_tokenizer(["def f(x):\n    return x + 1\n"] * 30, vocab_size=300).save_pretrained(tmp_path / "softmax")
    built = build_genai_model(tmp_path / "softmax", 64, tmp_path / "cache")
    assert (built / "genai_config.json").is_file()
    ids = np.random.default_rng(0).integers(0, 300, 11)
    with torch.no_grad():
        ref = model(torch.as_tensor(ids)[None]).logits[0].numpy()
    path = GenaiPath(built, max_length=32, threads=1)
    try:
        path.prefill(ids[:10])
        path.step(int(ids[10]))
        assert path.position == 11
        logits = np.asarray(path.generator.get_logits()).reshape(-1)
        check_close("genai logits after prefill + one step", logits, ref[10], ("ort", "fp32"))
    finally:
        path.close()
