"""The second bundled model (t2r_export/teacher/hybrid): it loads, exports verified, and still has the
perplexity its record states (on the committed calibration prompts, a slice no run trained on)."""

import json
from pathlib import Path

import pytest

from t2r_export.teacher import bundled_model_dir
from t2r_export.tolerances import TOLERANCES

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def record():
    return json.loads((bundled_model_dir("hybrid") / "eval.json").read_text())


def test_the_hybrid_is_hedgehog_with_a_window_within_the_token_budget(record):
    finetune = json.loads((bundled_model_dir("hybrid") / "finetune.json").read_text())
    config = finetune["config"]
    assert config["feature_map"] == "hedgehog" and config["window"] == 64 and config["decay"]
    assert config["distill"] and config["attention_transfer_steps"] > 0
    tokens = sum(finetune["tokens_seen"].values())
    # at most 10% of the teacher's 2,252,800 pretraining tokens (t2r_export/teacher/README.md)
    assert tokens <= 225_280 and record["tokens_used"] == tokens


def test_the_hybrid_matches_its_recorded_perplexity(record):
    from t2r_export.train.evaluate import evaluate_models

    rows = evaluate_models([bundled_model_dir("softmax"), bundled_model_dir("hybrid")],
                           data=[REPO / record["slice"]["data"]], block_size=256)
    for got, want in zip(rows, record["slice"]["rows"], strict=True):
        assert got["tokens"] == want["tokens"]
        assert abs(got["perplexity"] / want["perplexity"] - 1) <= TOLERANCES[("ppl-record", "fp32")], got
    # the hybrid is closer to the teacher than the bundled paper T2R on the same slice
    t2r = evaluate_models([bundled_model_dir("softmax"), bundled_model_dir("t2r")],
                          data=[REPO / record["slice"]["data"]], block_size=256)
    assert rows[1]["ratio"] < t2r[1]["ratio"]


def test_the_hybrid_exports_verified_with_its_window_in_the_state(tmp_path):
    from t2r_export.export.bundle import export_bundle

    result = export_bundle(bundled_model_dir("hybrid"), tmp_path / "hybrid", chained_steps=80)
    runtime = result.runtime
    assert runtime.window == 64 and runtime.feature_map == "hedgehog" and runtime.verification.passed
    assert "past_state.0.wk" in runtime.graphs["step"].inputs
    # the prompt-longer-than-the-window chain (64 + 8 tokens through prefill) was checked too
    names = {f.name for f in runtime.verification.figures}
    assert {"step batch 2: logits", "prefill 72 + 31 steps: logits"} <= names


@pytest.mark.slow
def test_the_hybrid_holds_up_at_long_positions(record):
    """Perplexity at positions 4k-16k no worse than at 256-1k (one 16,384-token test sequence), and the
    recorded figures are what the evaluation gives."""
    from t2r_export.data.corpus import stdlib_token_stream
    from t2r_export.data.tokenizer import load_tokenizer
    from t2r_export.models import load_causal_lm
    from t2r_export.train.positions import position_perplexity

    path = bundled_model_dir("hybrid")
    stream = stdlib_token_stream(load_tokenizer(path), "test")
    score = position_perplexity(load_causal_lm(path), stream, length=16384)
    ppl = dict(zip(score["buckets"], score["perplexity"]))
    assert ppl["4k-16k"] <= ppl["256-1k"], ppl
    for bucket, want in record["positions"]["perplexity"].items():
        assert abs(ppl[bucket] / want - 1) <= TOLERANCES[("ppl-record", "fp32")], (bucket, ppl[bucket], want)
