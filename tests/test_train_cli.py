"""`t2r-export finetune` and `t2r-export eval` through typer's runner: success and bad input."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from t2r_export.cli import train_cmd
from t2r_export.models import T2RConfig, load_causal_lm, swap_attention
from t2r_export.train.finetune import FinetuneConfig
from test_finetune import make_tiny_files

runner = CliRunner()

# the lead registers these in t2r_export/cli/__init__.py; a local app keeps the tests independent of that
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command("finetune")(train_cmd.finetune)
app.command("eval")(train_cmd.evaluate)

FAST = ["--steps", "2", "--batch-size", "2", "--block-size", "32", "--feature-dim", "8", "--eval-max-tokens", "256",
        "--num-threads", "1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_files(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_t2r(tiny, tmp_path_factory):
    """The tiny model swapped to T2R and saved with its tokenizer (as `t2r-export swap` writes it)."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("t2r") / "tiny-t2r"
    torch.manual_seed(0)
    swap_attention(load_causal_lm(tiny[0]), T2RConfig(feature_dim=8)).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny[0]).save_pretrained(path)
    return path


def test_finetune_writes_a_model_and_prints_a_summary(tiny, tmp_path):
    model_dir, data = tiny
    out = tmp_path / "out"
    result = runner.invoke(app, ["finetune", str(model_dir), "--data", str(data), "-o", str(out), *FAST])
    assert result.exit_code == 0, result.output
    assert "valid perplexity" in result.stdout and "finetune last loss" in result.stdout
    record = json.loads((out / "finetune.json").read_text())
    assert record["command"].startswith("t2r-export") and len(record["losses"]["finetune"]) == 2
    assert load_causal_lm(out).config.t2r["feature_dim"] == 8


def test_cli_defaults_match_the_config_defaults():
    defaults = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}
    renamed = {"out": "out_dir"}
    seen = set()
    for name, param in inspect.signature(train_cmd.finetune).parameters.items():
        key = renamed.get(name, name)
        seen.add(key)
        # --force is about the output folder, not a training setting
        if key in ("model", "data", "tokenizer", "force"):
            continue
        assert param.default.default == defaults[key], name
    # every setting of the library is reachable from the command
    assert set(defaults) <= seen, set(defaults) - seen


@pytest.fixture()
def empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    return path


@pytest.mark.parametrize("case, message", [
    ("missing data", "does not exist"),
    ("empty corpus", "no documents found"),
    ("zero steps", "steps must be a positive integer"),
    ("unwritable output", "cannot be created"),
    ("unknown train mode", "unknown train mode"),
    ("negative window", "window must be >= 0"),
    ("window past the positions", "window 129 exceeds the model's 128 positions"),
    ("unknown feature map", "unknown feature map 'hedgehogs'"),
])
def test_finetune_bad_input_exits_2_with_one_line_and_writes_nothing(tiny, tmp_path, empty_file, case, message):
    model_dir, data = tiny
    out = tmp_path / "out"
    args = {"missing data": ["--data", str(tmp_path / "nope.txt")],
            "empty corpus": ["--data", str(empty_file)],
            "zero steps": ["--data", str(data), "--steps", "0"],
            "unwritable output": ["--data", str(data)],
            "unknown train mode": ["--data", str(data), "--train", "everything"],
            "negative window": ["--data", str(data), "--window", "-1"],
            "window past the positions": ["--data", str(data), "--window", "129"],
            "unknown feature map": ["--data", str(data), "--feature-map", "hedgehogs"]}[case]
    if case == "unwritable output":
        # tests run as root, where chmod does not stop writes; a path under a regular file can never be a directory
        out = empty_file / "out"
    # a repeated option takes its last value, so "--steps 0" overrides FAST's
    result = runner.invoke(app, ["finetune", str(model_dir), "-o", str(out), *FAST, *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_eval_prints_a_table_and_valid_json(tiny, tiny_t2r):
    model_dir, data = tiny
    args = ["eval", str(model_dir), str(tiny_t2r), "--data", str(data), "--block-size", "32", "--max-tokens", "600"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for text in ("model", "kind", "params", "test loss", "ppl", "ratio", "softmax", "t2r", "1.000"):
        assert text in result.stdout, text
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["kind"] for r in rows] == ["softmax", "t2r"]
    assert rows[0]["ratio"] == 1.0 and rows[1]["ratio"] == pytest.approx(rows[1]["perplexity"] / rows[0]["perplexity"])
    assert rows[0]["tokens"] == rows[1]["tokens"] == 599
    assert rows[1]["params"] - rows[0]["params"] == 2 * 2 * (8 * 8 + 8)


def test_eval_refuses_models_with_different_vocabularies(tiny, tmp_path):
    other, _ = make_tiny_files(tmp_path / "other", vocab_size=280)
    result = runner.invoke(app, ["eval", str(tiny[0]), str(other), "--data", str(tiny[1])])
    assert result.exit_code == 2
    assert "different vocabulary" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_eval_missing_model_dir(tiny, tmp_path):
    result = runner.invoke(app, ["eval", str(tmp_path / "nope"), "--data", str(tiny[1])])
    assert result.exit_code == 2 and "model directory not found" in result.stderr
