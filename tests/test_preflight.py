"""Cheap preconditions fail fast (before torch is imported, so before any weights load), in one line;
`--tokenizer` on onnx, finetune and eval; `onnx` writes only where -o tells it."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from t2r_export.cli import app
from t2r_export.preflight import check_model_and_tokenizer, check_model_dir, check_tokenizer, tokenizer_file
from toy_bundle import train_toy_tokenizer

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
runner = CliRunner()


def _without_tokenizer(model_dir: Path, dst: Path) -> Path:
    shutil.copytree(model_dir, dst)
    for name in TOKENIZER_FILES:
        (dst / name).unlink(missing_ok=True)
    return dst


def _run_cli(argv: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """The command in a fresh process; reports its exit code, seconds and whether torch got imported."""
    code = textwrap.dedent(f"""
        import json, sys, time
        start = time.perf_counter()
        from t2r_export.cli import main
        sys.argv = ["t2r-export", *{argv!r}]
        try:
            main()
            code = 0
        except SystemExit as exit:
            code = exit.code
        print(json.dumps({{"code": code, "seconds": time.perf_counter() - start,
                           "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=cwd)
    return proc, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("command", ["onnx", "finetune", "eval"])
def test_a_missing_tokenizer_fails_before_torch_is_imported(command, tiny_t2r_dir, tmp_path):
    pytest.importorskip("torch")
    model = _without_tokenizer(tiny_t2r_dir, tmp_path / "no-tokenizer")
    argv = {"onnx": ["onnx", str(model), "-o", str(tmp_path / "bundle")],
            "finetune": ["finetune", str(model), "-o", str(tmp_path / "run")],
            "eval": ["eval", str(model)]}[command]
    proc, result = _run_cli(argv, tmp_path)
    assert result["code"] == 2, proc.stderr
    assert "no tokenizer.json in" in proc.stderr and "--tokenizer" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    # no weights can have been loaded: neither torch nor transformers was even imported
    assert not result["torch"] and not result["transformers"]
    assert not (tmp_path / "bundle").exists() and not (tmp_path / "run").exists()


def test_onnx_without_out_writes_nothing(tiny_t2r_dir, tmp_path):
    work = tmp_path / "cwd"
    work.mkdir()
    proc, result = _run_cli(["onnx", str(tiny_t2r_dir)], work)
    assert result["code"] == 2 and "pass -o/--out DIR" in proc.stderr
    assert list(work.iterdir()) == []


def test_onnx_ships_the_tokenizer_given_with_tokenizer(tiny_t2r_dir, tmp_path):
    model = _without_tokenizer(tiny_t2r_dir, tmp_path / "no-tokenizer")
    out = tmp_path / "bundle"
    result = runner.invoke(app, ["onnx", str(model), "-o", str(out), "--tokenizer", str(tiny_t2r_dir),
                                 "--chained-steps", "4"])
    assert result.exit_code == 0, result.output
    shipped = json.loads((out / "tokenizer.json").read_text())
    assert shipped["model"]["vocab"] == json.loads((tiny_t2r_dir / "tokenizer.json").read_text())["model"]["vocab"]


def test_export_reports_its_stages_through_logging(tiny_t2r_dir, tmp_path, caplog):
    from t2r_export.export.bundle import export_bundle

    with caplog.at_level(logging.INFO, logger="t2r_export"):
        export_bundle(tiny_t2r_dir, tmp_path / "b", chained_steps=4)
    messages = [r.getMessage() for r in caplog.records]
    for expected in ("building the step graph: layer 1/2", "building the prefill graph: layer 2/2",
                     "writing and checking step.onnx", "verifying: the step graph at batch 1 and 3 against torch",
                     "verifying: 4 chained greedy steps and the prefill graph against torch"):
        assert expected in messages, expected


def test_finetune_and_eval_take_a_tokenizer(tmp_path):
    from test_finetune import make_tiny_files

    model_dir, data = make_tiny_files(tmp_path / "tiny")
    bare = _without_tokenizer(model_dir, tmp_path / "bare")
    out = tmp_path / "run"
    result = runner.invoke(app, ["finetune", str(bare), "--tokenizer", str(model_dir / "tokenizer.json"),
                                 "--data", str(data), "-o", str(out), "--steps", "1", "--batch-size", "2",
                                 "--block-size", "32", "--eval-max-tokens", "64", "--num-threads", "1"])
    assert result.exit_code == 0, result.output
    assert (out / "tokenizer.json").is_file()
    result = runner.invoke(app, ["eval", str(bare), "--tokenizer", str(model_dir), "--data", str(data), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["model"] == str(bare)


def _config_dir(tmp_path: Path, **config) -> Path:
    path = tmp_path / "m"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(b"")
    return path


@pytest.mark.parametrize("config, message", [
    ({"model_type": "bert"}, "unsupported architecture 'bert'"),
    ({"model_type": "t2r_bert", "t2r": {}}, "unsupported architecture 't2r_bert'"),
    ({"vocab_size": 10}, "names no model_type"),
])
def test_config_problems_are_one_line(tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        check_model_dir(_config_dir(tmp_path, **config))


def test_a_softmax_model_is_refused_where_a_t2r_one_is_needed(tmp_path):
    path = _config_dir(tmp_path, model_type="llama", vocab_size=10)
    assert not check_model_dir(path).is_t2r
    with pytest.raises(ValueError, match="softmax model, not a T2R model"):
        check_model_dir(path, need_t2r=True)


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    path = _config_dir(tmp_path, model_type="llama", vocab_size=100)
    train_toy_tokenizer(300).save(str(path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"has 300 tokens but the model only 100 embedding rows"):
        check_model_and_tokenizer(path)
    assert check_tokenizer(tokenizer_file(path), 300) == 300


def test_tokenizer_paths(tmp_path):
    (tmp_path / "tok").mkdir()
    train_toy_tokenizer(300).save(str(tmp_path / "tok" / "tokenizer.json"))
    assert tokenizer_file(None, tmp_path / "tok") == tmp_path / "tok" / "tokenizer.json"
    assert tokenizer_file(None, tmp_path / "tok" / "tokenizer.json") == tmp_path / "tok" / "tokenizer.json"
    with pytest.raises(ValueError, match="--tokenizer .* not found"):
        tokenizer_file(None, tmp_path / "missing")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a readable tokenizer.json"):
        check_tokenizer(tmp_path / "bad.json", None)


def test_the_architecture_table_loads_without_torch():
    # the early checks read the one adapter table; it must stay importable on a torch-free install
    code = ("import sys\nsys.modules['torch'] = None\nsys.modules['transformers'] = None\n"
            "from t2r_export.architectures import ADAPTERS\nfrom t2r_export import preflight\n"
            "print(sorted(ADAPTERS))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "llama" in done.stdout and "gpt2" in done.stdout


def test_demo_without_out_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["demo", "--no-speed", "--max-new-tokens", "4", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "the bundle was temporary" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_training_accepts_a_slow_tokenizer_the_bundle_does_not(tmp_path):
    path = _config_dir(tmp_path, model_type="llama", vocab_size=100)
    (path / "vocab.json").write_text("{}")
    check_model_and_tokenizer(path, need_fast=False)
    with pytest.raises(ValueError, match="no tokenizer.json in"):
        check_model_and_tokenizer(path)
