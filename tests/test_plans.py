"""Reduced-precision bundles are verified against the fp32 model before they are written, and
`t2r-export info` shows what a bundle holds (export/plans.py, export/plan_check.py, runtime/info.py)."""

import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from t2r_export import contract, tolerances
from t2r_export.cli import app
from t2r_export.contract import RuntimeConfig
from t2r_export.tolerances import MIN_AGREEMENT, TOLERANCES

runner = CliRunner()


def _figures(record) -> dict:
    return {f.name: f for f in record.figures}


def _assert_goals(record, precision: str) -> None:
    """The stated goals of tolerances.py, asserted on the recorded figures themselves."""
    figures = _figures(record)
    assert figures["teacher-forced steps: top-1 agreement"].value >= MIN_AGREEMENT[precision]
    assert figures["teacher-forced steps: perplexity delta"].value <= TOLERANCES[("ppl-delta", precision)]
    assert figures["teacher-forced steps: logits (relative)"].value <= TOLERANCES[("ort", precision)]
    assert record.passed and all(f.passed for f in record.figures)


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory, tiny_tokenizer):
    from conftest import make_tiny_model
    from t2r_export.models import T2RConfig, swap_attention

    root = tmp_path_factory.mktemp("int8")
    model = swap_attention(make_tiny_model("llama"), T2RConfig())
    model.save_pretrained(root / "model")
    tiny_tokenizer.save_pretrained(root / "model")
    out = root / "bundle"
    result = runner.invoke(app, ["onnx", str(root / "model"), "-o", str(out), "--precision", "int8",
                                 "--chained-steps", "8"])
    assert result.exit_code == 0, result.output
    return root / "model", out, result.output


def test_int8_export_is_verified_against_the_fp32_model(int8_bundle):
    _, out, output = int8_bundle
    runtime = RuntimeConfig.read(out / contract.RUNTIME_JSON)
    assert runtime.precision == "int8" and runtime.quantization is not None
    assert runtime.verification.reference.startswith("fp32 torch model")
    _assert_goals(runtime.verification, "int8")
    # the compact table: one row per figure with its tolerance beside it, then one verdict line
    assert "int8 bundle vs fp32 torch model" in output
    assert f"≥ {MIN_AGREEMENT['int8']:.3g}" in output and f"≤ {TOLERANCES[('ppl-delta', 'int8')]:.3g}" in output
    assert "PASS: 4/4 figures within tolerance; greedy tokens" in output


@pytest.mark.parametrize("precision", ["fp16", "fp16-all"])
def test_fp16_plans_are_verified_too(tiny_t2r_dir, tmp_path, precision):
    out = tmp_path / precision
    result = runner.invoke(app, ["onnx", str(tiny_t2r_dir), "-o", str(out), "--precision", precision,
                                 "--chained-steps", "8"])
    assert result.exit_code == 0, result.output
    runtime = RuntimeConfig.read(out / contract.RUNTIME_JSON)
    _assert_goals(runtime.verification, precision)
    assert "PASS" in result.output


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_a_failing_check_writes_no_bundle(int8_bundle, tmp_path, monkeypatch, precision):
    model, _, _ = int8_bundle
    # a goal no bundle can meet: the check must fail and stop the export
    monkeypatch.setitem(tolerances.MIN_AGREEMENT, precision, 1.01)
    out = tmp_path / "out"
    result = runner.invoke(app, ["onnx", str(model), "-o", str(out), "--precision", precision,
                                 "--chained-steps", "8"])
    assert result.exit_code == 1, result.output
    assert "verification failed, no bundle written" in result.output
    assert "top-1 agreement" in result.output and "< 1.01" in result.output
    assert "Traceback" not in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # --no-verify writes it, says so, and records no verification
    result = runner.invoke(app, ["onnx", str(model), "-o", str(out), "--precision", precision, "--no-verify"])
    assert result.exit_code == 0, result.output
    assert "not verified" in result.output
    assert RuntimeConfig.read(out / contract.RUNTIME_JSON).verification is None


def test_verify_text_is_used_and_checked(int8_bundle, tmp_path):
    model, _, _ = int8_bundle
    text = tmp_path / "text.txt"
    text.write_text("import os\nprint(os.getcwd())\n" * 8)
    out = tmp_path / "out"
    result = runner.invoke(app, ["onnx", str(model), "-o", str(out), "--precision", "fp16", "--verify-text",
                                 str(text), "--chained-steps", "8"])
    assert result.exit_code == 0, result.output
    record = RuntimeConfig.read(out / contract.RUNTIME_JSON).verification
    assert "of 1 texts" in record.reference
    text.write_bytes(b"\xff\xfe")
    result = runner.invoke(app, ["onnx", str(model), "-o", str(tmp_path / "o2"), "--precision", "fp16",
                                 "--verify-text", str(text)])
    assert result.exit_code == 2 and "cannot be read as UTF-8" in result.output


def test_info_is_torch_free_and_shows_everything(int8_bundle):
    _, out, _ = int8_bundle
    code = textwrap.dedent(f"""
        import sys
        for name in ("torch", "transformers", "onnx"):
            sys.modules[name] = None
        import typer
        from typer.testing import CliRunner
        from t2r_export.cli import info_cmd

        app = typer.Typer()
        app.callback()(lambda: None)
        app.command("info")(info_cmd.info)
        result = CliRunner().invoke(app, ["info", {str(out)!r}])
        assert result.exit_code == 0, result.output
        print(result.output)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = " ".join(proc.stdout.split())
    runtime = RuntimeConfig.read(out / contract.RUNTIME_JSON)
    for needle in ("precision: int8", "format version 2", "step.onnx", "prefill.onnx", "tokenizer.json",
                   "int8 bundle vs fp32 torch model", "PASS", "weights: weights.bin is shared by step.onnx and prefill.onnx",
                   f"checkpoint sha256 {runtime.source_checkpoint_sha256}",
                   f"onnxruntime {runtime.tools['onnxruntime']}"):
        assert needle in text, needle


def test_info_shows_which_graphs_share_a_weight_file(tmp_path):
    import onnx

    from t2r_export.runtime.info import bundle_info
    from toy_bundle import build_toy_bundle

    bundle = build_toy_bundle(tmp_path / "b")
    for kind in contract.GRAPH_KINDS:
        model = onnx.load(str(bundle / f"{kind}.onnx"))
        tensor = next(t for t in model.graph.initializer if t.name == "unembed")
        data = tensor.raw_data
        (bundle / "weights.bin").write_bytes(data)
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", "weights.bin"), ("offset", "0"), ("length", str(len(data)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        (bundle / f"{kind}.onnx").write_bytes(model.SerializeToString())
    info = bundle_info(bundle)
    assert info.shared == {"weights.bin": ["step.onnx", "prefill.onnx"]}
    assert info.sizes["weights.bin"] == len(data) and info.total_bytes == sum(info.sizes.values())
    result = runner.invoke(app, ["info", str(bundle)])
    assert result.exit_code == 0, result.output
    assert "weights.bin is shared by step.onnx and prefill.onnx" in " ".join(result.output.split())


def test_info_refuses_a_hostile_bundle_in_one_line(tmp_path):
    from toy_bundle import build_toy_bundle

    bundle = build_toy_bundle(tmp_path / "b")
    (bundle / "step.onnx").unlink()
    (bundle / "step.onnx").symlink_to("/etc/passwd")
    result = runner.invoke(app, ["info", str(bundle)])
    assert result.exit_code == 2 and "symlink leading outside" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_teacher_int8_meets_the_stated_goals(tmp_path):
    from t2r_export.export.plans import export_plan
    from t2r_export.teacher import bundled_model_dir

    result = export_plan(bundled_model_dir("t2r"), tmp_path / "int8", precision="int8", chained_steps=16)
    _assert_goals(result.runtime.verification, "int8")
