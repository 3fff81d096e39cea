"""`t2r-export swap` end to end through typer's runner: success and every kind of bad input."""

import json

import pytest
from typer.testing import CliRunner

from conftest import make_tiny_model
from t2r_export.cli import app
from t2r_export.models import load_t2r_model

runner = CliRunner()


@pytest.fixture()
def softmax_dir(tmp_path, tiny_tokenizer):
    path = tmp_path / "softmax"
    make_tiny_model("qwen2").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("swap", "onnx"):
        assert command in result.output


def test_swap_writes_a_loadable_t2r_model_and_prints_a_summary(softmax_dir, tmp_path):
    out = tmp_path / "t2r"
    result = runner.invoke(app, ["swap", str(softmax_dir), "-o", str(out), "--feature-dim", "8"])
    assert result.exit_code == 0, result.output
    assert "layers_swapped" in result.output and "parameters_added" in result.output and "qwen2" in result.output
    model = load_t2r_model(out)
    assert model.config.t2r["feature_dim"] == 8
    assert (out / "tokenizer.json").is_file()
    assert json.loads((out / "config.json").read_text())["model_type"] == "t2r_qwen2"
    # parameters added = 2 layers × 2 KV heads × (8×8 weight + 8 bias)
    assert "288" in result.output
    assert not list(tmp_path.glob(".t2r.tmp-*"))


def _bad(args):
    result = runner.invoke(app, ["swap", *args])
    assert result.exit_code == 2, result.output
    return result.output


def test_swap_hedgehog_with_a_window(softmax_dir, tmp_path):
    out = tmp_path / "t2r"
    result = runner.invoke(app, ["swap", str(softmax_dir), "-o", str(out), "--feature-map", "hedgehog",
                                 "--feature-dim", "8", "--window", "16"])
    assert result.exit_code == 0, result.output
    model = load_t2r_model(out)
    assert model.config.t2r["feature_map"] == "hedgehog" and model.config.t2r["window"] == 16
    fm = model.model.layers[0].self_attn.t2r_feature_map
    assert fm.window == 16 and fm.feature_dim == 16
    # state per sequence: 2 layers × 4 bytes × (2 KV heads × 16 features × 9 + 16 × (2 × 2 × 8 + 1))
    assert f"{2 * 4 * (2 * 16 * 9 + 16 * 33):,}" in result.output


@pytest.mark.parametrize("args, message", [
    (["--window", "-1"], "window must be >= 0"),
    (["--window", "100000"], "window 100000 exceeds the model's"),
    (["--feature-map", "hedgehogs"], "unknown feature map 'hedgehogs'"),
])
def test_bad_window_or_feature_map_is_one_line(softmax_dir, tmp_path, args, message):
    out = tmp_path / "t2r"
    output = _bad([str(softmax_dir), "-o", str(out), *args])
    assert message in output and len(output.strip().splitlines()) == 1
    assert not out.exists()


def test_missing_model_dir(tmp_path):
    out = _bad([str(tmp_path / "nope"), "-o", str(tmp_path / "out")])
    assert "model directory not found" in out and not (tmp_path / "out").exists()


def test_unreadable_model_dir(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text("{not json")
    out = _bad([str(tmp_path / "junk"), "-o", str(tmp_path / "out")])
    assert "cannot read the model config" in out and not (tmp_path / "out").exists()


def test_not_a_causal_lm(tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    model = GPT2ForSequenceClassification(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=50, pad_token_id=0))
    model.save_pretrained(tmp_path / "cls")
    out = _bad([str(tmp_path / "cls"), "-o", str(tmp_path / "out")])
    assert "not a causal LM" in out and not (tmp_path / "out").exists()


def test_unsupported_architecture(tmp_path):
    from transformers import BertConfig, BertLMHeadModel

    BertLMHeadModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=32,
                               vocab_size=50, is_decoder=True)).save_pretrained(tmp_path / "bert")
    out = _bad([str(tmp_path / "bert"), "-o", str(tmp_path / "out")])
    assert "unsupported architecture 'bert'" in out and "llama" in out and not (tmp_path / "out").exists()


@pytest.mark.parametrize("dim", ["0", "-3"])
def test_feature_dim_must_be_positive(softmax_dir, tmp_path, dim):
    out = _bad([str(softmax_dir), "-o", str(tmp_path / "out"), "--feature-dim", dim])
    assert "feature dim must be a positive integer" in out and not (tmp_path / "out").exists()


def test_out_dir_not_writable(softmax_dir, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    out = _bad([str(softmax_dir), "-o", str(blocker / "out")])
    assert "cannot be created" in out


def test_existing_out_dir_is_left_unchanged_on_failure(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    _bad([str(tmp_path / "nope"), "-o", str(out_dir)])
    assert (out_dir / "keep.txt").read_text() == "mine"


def test_errors_are_one_line(tmp_path):
    out = _bad([str(tmp_path / "nope"), "-o", str(tmp_path / "out")])
    assert len(out.strip().splitlines()) == 1
