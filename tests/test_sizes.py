"""`t2r-export sizes`: the public configs, the per-stage measurement, the table and its bad input."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import transformers
from typer.testing import CliRunner

from t2r_export.bench import sizes
from t2r_export.cli import app
from t2r_export.models import ADAPTERS

runner = CliRunner()


@pytest.mark.parametrize("name", sizes.MODELS)
def test_every_public_config_builds_a_supported_architecture(name):
    config_class, kwargs = sizes.CONFIGS[name]
    config = getattr(transformers, config_class)(**kwargs)
    assert config.model_type in ADAPTERS
    # the meta device builds the real shapes without allocating them
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == kwargs["tie_word_embeddings"]
    assert model.get_input_embeddings().weight.shape[0] == kwargs["vocab_size"]


def test_a_stage_reports_its_own_peak_memory_and_failure(tmp_path):
    log = tmp_path / "log.txt"
    small = sizes.run_process([sys.executable, "-c", "pass"], log)
    big = sizes.run_process([sys.executable, "-c", "x = bytearray(300_000_000); x[::4096] = b'1' * len(x[::4096])"],
                            log)
    assert small.ok and big.ok and small.seconds > 0
    # the child's own peak, not this process's: the 300 MB buffer shows in the second one only
    assert big.peak_rss - small.peak_rss >= 300_000_000 * 0.9
    bad = sizes.run_process([sys.executable, "-c", "import sys; sys.exit('error: boom')"], log)
    assert not bad.ok and bad.message == "error: boom"


def test_safetensors_parameters_are_read_from_the_headers(tiny_t2r_dir):
    from t2r_export.models import load_t2r_model

    expected = sum(t.numel() for t in load_t2r_model(tiny_t2r_dir).state_dict().values())
    assert sizes._safetensors_params(tiny_t2r_dir) == expected


def test_the_table_marks_failed_stages(tmp_path):
    good = sizes.Stage(1.0, 3 * 10**9, True)
    failed = sizes.Stage(2.0, 10**9, False, "error: boom")
    row = sizes.SizeRow("gpt2-124m", 10**9, "fp32", 4 * 10**9, good, good, 4 * 10**9, 4 * 10**9, 10**6,
                        failed, None)
    cells = dict(zip(sizes.TABLE_COLUMNS, sizes.table_rows([row])[0]))
    assert cells["generate s"] == "FAIL" and cells["check --trt"] == "-"
    assert cells["peak / fp32"] == f"{3 / 4:.2f}" and cells["bundle / ckpt"] == f"{1:.3f}"
    assert sizes.markdown_table([row]).count("\n") == 2


@pytest.mark.parametrize("args, expected", [
    (["--models", "gpt5"], "--models"),
    (["--precisions", "fp8"], "--precisions"),
    (["--models", ""], "--models"),
])
def test_bad_choices_are_one_line_and_exit_2(tmp_path, args, expected):
    result = runner.invoke(app, ["sizes", "--work", str(tmp_path / "w"), *args])
    assert result.exit_code == 2
    assert expected in result.output and "Traceback" not in result.output
    assert not (tmp_path / "w").exists()


def test_json_and_markdown_outputs(tmp_path, monkeypatch):
    stage = sizes.Stage(1.0, 2 * 10**9, True)
    row = sizes.SizeRow("gpt2-124m", 10**8, "fp32", 4 * 10**8, stage, stage, 4 * 10**8, 4 * 10**8, 10**6, stage,
                        stage)
    def one_row(*args, on_row=None, **kwargs):
        on_row(row)
        return [row]

    monkeypatch.setattr(sizes, "run_sizes", one_row)
    md, js = tmp_path / "sizes.md", tmp_path / "sizes.json"
    result = runner.invoke(app, ["sizes", "--models", "gpt2-124m", "--precisions", "fp32", "--work",
                                 str(tmp_path / "w"), "--markdown", str(md), "--json", str(js)])
    assert result.exit_code == 0, result.output
    assert "| gpt2-124m |" in md.read_text()
    assert json.loads(js.read_text())[0]["export"]["peak_rss"] == stage.peak_rss
    assert sizes.SizeRow.from_json(json.loads(js.read_text())[0]) == row
