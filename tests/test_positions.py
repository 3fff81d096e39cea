"""Perplexity by position: chunked evaluation carrying state == one pass, buckets, ablations, the CLI."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import VOCAB, make_tiny_model
from t2r_export.cli import app
from t2r_export.models import T2RConfig, swap_attention
from t2r_export.tolerances import TOLERANCES
from t2r_export.train.positions import _token_losses, bucket_labels, position_perplexity

runner = CliRunner()


def _ids(t=70, seed=0):
    return torch.randint(0, VOCAB, (1, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", [None, dict(feature_map="hedgehog", feature_dim=8, window=6)])
def test_chunks_that_carry_state_or_cache_equal_one_pass(variant):
    model = make_tiny_model("llama")
    if variant is not None:
        model = swap_attention(model, T2RConfig(**variant)).eval()
    ids = _ids()
    one = _token_losses(model, ids, chunk=1000, parts="both")
    chunked = _token_losses(model, ids, chunk=9, parts="both")
    assert one.shape == (69,)
    # T tokens at once vs chunks from the carried state: the resume tolerance
    tol = TOLERANCES[("torch-resume", "fp32")]
    torch.testing.assert_close(chunked, one, atol=tol, rtol=tol)


def test_ablations_drop_one_part():
    model = swap_attention(make_tiny_model("llama"), T2RConfig(feature_map="hedgehog", feature_dim=8,
                                                               window=6)).eval()
    ids = _ids()
    both = _token_losses(model, ids, 16, "both")
    linear = _token_losses(model, ids, 16, "linear")
    window = _token_losses(model, ids, 16, "window")
    # the first W predictions have nothing in the linear part yet: window alone is the model there
    torch.testing.assert_close(window[:5], both[:5])
    assert (linear - both).abs().max() > 1e-3 and (window[10:] - both[10:]).abs().max() > 1e-3
    plain = swap_attention(make_tiny_model("llama"), T2RConfig()).eval()
    with pytest.raises(ValueError, match="needs a sliding window"):
        _token_losses(plain, ids, 16, "linear")


def test_buckets_count_every_prediction_once():
    model = swap_attention(make_tiny_model("llama"), T2RConfig(feature_dim=8, window=4)).eval()
    stream = np.random.default_rng(0).integers(0, VOCAB, 2 * 301)
    result = position_perplexity(model, stream, length=300, sequences=2, chunk=64)
    assert result["buckets"] == bucket_labels() == ["0-256", "256-1k", "1k-4k", "4k-16k"]
    assert result["tokens"] == [2 * 256, 2 * 44, 0, 0]
    assert result["perplexity"][2] is None and all(p > 1 for p in result["perplexity"][:2])
    with pytest.raises(ValueError, match="need 903"):
        position_perplexity(model, stream, length=300, sequences=3)


@pytest.fixture()
def two_models(tmp_path, tiny_tokenizer):
    dirs = []
    for name, variant in (("softmax", None), ("hybrid", dict(feature_map="hedgehog", feature_dim=8, window=4))):
        model = make_tiny_model("llama")
        if variant:
            model = swap_attention(model, T2RConfig(**variant))
        model.save_pretrained(tmp_path / name)
        tiny_tokenizer.save_pretrained(tmp_path / name)
        dirs.append(tmp_path / name)
    data = tmp_path / "data.txt"
    data.write_text("".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(400)))
    return dirs, data


def test_cli_positions_table_json_and_plot(two_models, tmp_path):
    (softmax, hybrid), data = two_models
    plot = tmp_path / "positions.png"
    args = ["eval", str(softmax), str(hybrid), "--data", str(data), "--positions", "--positions-length", "300"]
    result = runner.invoke(app, [*args, "--plot", str(plot), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["kind"], r["parts"]) for r in rows] == [("softmax", "both"), ("t2r", "both"), ("t2r", "linear"),
                                                      ("t2r", "window")]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = runner.invoke(app, args)
    assert table.exit_code == 0 and "256-1k" in table.stdout and "linear part only" in table.stdout


@pytest.mark.parametrize("extra, message", [
    (["--positions-length", "20000"], "length must be between 2 and 16384"),
    (["--positions-length", "100000", "--sequences", "1"], "length must be between"),
    (["--plot", "out.jpg"], "--plot must name a .png file"),
])
def test_cli_positions_bad_input_is_one_line(two_models, extra, message):
    (softmax, _), data = two_models
    result = runner.invoke(app, ["eval", str(softmax), "--data", str(data), "--positions", *extra])
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
