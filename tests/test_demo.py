"""`t2r-export demo` on the bundled T2R teacher: export, verify, generate (the speed part is bench's)."""

from typer.testing import CliRunner

from t2r_export.cli import app
from t2r_export.contract import RuntimeConfig
from t2r_export.tolerances import TOLERANCES

runner = CliRunner()


def test_demo_exports_verifies_and_generates_from_the_bundled_model(tmp_path):
    out = tmp_path / "graphs" / "demo"
    result = runner.invoke(app, ["demo", "-o", str(out), "--no-speed", "--max-new-tokens", "8", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "256 chained steps" in result.output and "tokens/s" in result.output
    runtime = RuntimeConfig.read(out / "runtime.json")
    assert runtime.architecture == "llama" and runtime.num_layers == 6 and runtime.vocab_size == 4096
    chained = {f.name: f for f in runtime.verification.figures}["256 chained steps: logits"]
    assert chained.value <= TOLERANCES[("ort", "fp32")] and runtime.verification.passed


def test_demo_rejects_bad_input(tmp_path):
    result = runner.invoke(app, ["demo", "-o", str(tmp_path / "d"), "--finetune-steps", "-1"])
    assert result.exit_code == 2 and "--finetune-steps must be" in result.output
    result = runner.invoke(app, ["demo", "-o", str(tmp_path / "d"), "--prompt", ""])
    assert result.exit_code == 2 and "prompt is empty" in result.output


def test_demo_runs_the_bundled_hybrid_too(tmp_path):
    out = tmp_path / "hybrid"
    result = runner.invoke(app, ["demo", "--model", "hybrid", "-o", str(out), "--no-speed", "--max-new-tokens", "8",
                                 "--threads", "1"])
    assert result.exit_code == 0, result.output
    runtime = RuntimeConfig.read(out / "runtime.json")
    assert runtime.window == 64 and runtime.feature_map == "hedgehog" and runtime.verification.passed


def test_demo_rejects_an_unknown_model_or_a_finetuned_hybrid(tmp_path):
    result = runner.invoke(app, ["demo", "--model", "gpt", "-o", str(tmp_path / "d")])
    assert result.exit_code == 2 and "unknown --model 'gpt'" in result.output
    result = runner.invoke(app, ["demo", "--model", "hybrid", "--finetune-steps", "3", "-o", str(tmp_path / "d")])
    assert result.exit_code == 2 and "cannot be combined with --model hybrid" in result.output
    assert not (tmp_path / "d").exists()
