"""Graph targets and weight-only plans (export/ort_target.py, export/step_graph.py, export/weight_only.py):
the ort target and the int4 / int8-wo plans are verified like the plain fp32 graphs, the runtime
reads their state from the contract, and what they cannot do is refused in one line."""

import json

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from t2r_export import contract, tolerances
from t2r_export.cli import app
from t2r_export.contract import RuntimeConfig
from t2r_export.tolerances import MIN_AGREEMENT, TOLERANCES

runner = CliRunner()


def _ops(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}


def _greedy(bundle, steps: int = 12) -> list[int]:
    from t2r_export.runtime import OrtDecoder, load_bundle

    decoder = OrtDecoder(load_bundle(bundle), provider="cpu", threads=1)
    decoder.reset(1)
    prompt = np.array([[5, 17, 42, 9]], np.int64)
    logits = decoder.prefill(prompt, np.arange(4, dtype=np.int64)[None])
    tokens = []
    for t in range(4, 4 + steps):
        tokens.append(int(np.asarray(logits).reshape(-1)[: decoder.config.vocab_size].argmax()))
        logits = decoder.step(np.array([[tokens[-1]]], np.int64), np.array([[t]], np.int64))
    decoder.close()
    return tokens


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_tokenizer):
    """A tiny T2R Llama exported for both targets (fp32, verified)."""
    from conftest import make_tiny_model
    from t2r_export.models import T2RConfig, swap_attention

    root = tmp_path_factory.mktemp("targets")
    model = swap_attention(make_tiny_model("llama"), T2RConfig())
    model.save_pretrained(root / "model")
    tiny_tokenizer.save_pretrained(root / "model")
    out = {}
    for target in contract.TARGETS:
        out[target] = root / target
        result = runner.invoke(app, ["onnx", str(root / "model"), "-o", str(out[target]), "--target", target,
                                     "--chained-steps", "16"])
        assert result.exit_code == 0, result.output
    return root / "model", out


def test_the_ort_target_uses_the_llm_ops_and_a_merged_state(bundles):
    _, out = bundles
    runtime = RuntimeConfig.read(out["ort"] / contract.RUNTIME_JSON)
    assert runtime.target == "ort" and runtime.opset == contract.TARGET_OPSETS["ort"]
    assert runtime.verification.passed and runtime.verification.greedy_identical
    checks = {f.name.split(":")[0] for f in runtime.verification.figures}
    assert {"step batch 1", "step batch 3", "16 chained steps", "prefill 8 + 15 steps"} <= checks
    for kind in contract.GRAPH_KINDS:
        ops = _ops(out["ort"] / f"{kind}.onnx")
        assert {"LinearAttention", "SkipSimplifiedLayerNormalization", "RotaryEmbedding"} <= ops
    # one state tensor per layer: s with z as its last column, as many bytes as s and z
    shape = runtime.state_shape
    assert runtime.graphs["step"].inputs[2:] == tuple(contract.past_name(i, "sz") for i in range(runtime.num_layers))
    assert shape.part_shape(shape.parts[0]) == (runtime.num_kv_heads, runtime.feature_dim, runtime.head_dim + 1)
    plain = RuntimeConfig.read(out["plain"] / contract.RUNTIME_JSON)
    assert runtime.state_bytes_per_sequence == plain.state_bytes_per_sequence
    assert plain.target == "plain" and plain.opset == contract.OPSET


def test_the_runtime_decodes_both_targets_alike(bundles):
    _, out = bundles
    assert _greedy(out["ort"]) == _greedy(out["plain"])


def test_the_lean_step_graph_has_fewer_nodes_and_one_rotation_matmul_per_layer(bundles):
    """The plain step graph drops the T axis and rotates q|k with the step's one rotation matrix."""
    from t2r_export.export.graph import DecoderEmitter
    from t2r_export.export.weights import extract_decoder
    from t2r_export.models import load_t2r_model

    model, out = bundles
    step = onnx.load(str(out["plain"] / "step.onnx"), load_external_data=False)
    general = DecoderEmitter(extract_decoder(load_t2r_model(model)), contract.STEP).build()
    assert len(step.graph.node) < len(general.graph.node)
    # the general emitter swaps rotate_half's blocks with one Concat per layer
    layers = len([n for n in general.graph.node if n.op_type == "Concat" and n.name.split("/")[0].endswith(".rope")])
    rotations = [n for n in step.graph.node if n.op_type == "MatMul" and n.name.split("/")[0].endswith(".rope")]
    assert layers > 0 and len(rotations) == layers and len({n.input[1] for n in rotations}) == 1
    assert not [n for n in step.graph.node if "rope" in n.name and n.op_type == "Gather"]


@pytest.mark.parametrize("argv, message", [
    (["--target", "tpu"], "unknown --target 'tpu'; expected one of plain, ort"),
    (["--target", "ort", "--precision", "int8"], "--target ort is built in fp32 or weight-only"),
    (["--target", "ort", "--precision", "fp16"], "use --target plain for fp16"),
])
def test_bad_target_options_are_refused_in_one_line(tiny_t2r_dir, tmp_path, argv, message):
    out = tmp_path / "out"
    result = runner.invoke(app, ["onnx", str(tiny_t2r_dir), "-o", str(out), *argv])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_the_ort_target_refuses_a_sliding_window_model(tmp_path, tiny_tokenizer):
    from conftest import make_tiny_model
    from t2r_export.models import T2RConfig, swap_attention

    model = swap_attention(make_tiny_model("llama"), T2RConfig(feature_map="hedgehog", window=4))
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    result = runner.invoke(app, ["onnx", str(tmp_path / "model"), "-o", str(tmp_path / "out"), "--target", "ort"])
    assert result.exit_code == 2, result.output
    assert "--target ort does not support sliding-window models" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("precision, target", [("int4", "plain"), ("int8-wo", "plain"), ("int4", "ort")])
def test_weight_only_plans_are_verified_and_share_one_weights_file(bundles, tmp_path, precision, target):
    model, _ = bundles
    out = tmp_path / precision
    result = runner.invoke(app, ["onnx", str(model), "-o", str(out), "--precision", precision, "--target", target,
                                 "--chained-steps", "8"])
    assert result.exit_code == 0, result.output
    runtime = RuntimeConfig.read(out / contract.RUNTIME_JSON)
    assert runtime.precision == precision and runtime.target == target
    record = {f.name: f for f in runtime.verification.figures}
    assert record["teacher-forced steps: top-1 agreement"].value >= MIN_AGREEMENT[precision]
    assert record["teacher-forced steps: perplexity delta"].value <= TOLERANCES[("ppl-delta", precision)]
    assert runtime.verification.passed
    assert runtime.quantization["bits"] == {"int4": 4, "int8-wo": 8}[precision]
    for kind in contract.GRAPH_KINDS:
        assert "MatMulNBits" in _ops(out / f"{kind}.onnx")
    index = json.loads((out / "weights.json").read_text())
    assert set(index["graphs"]) == {"step.onnx", "prefill.onnx"}
    shared = set(index["graphs"]["step.onnx"]) & set(index["graphs"]["prefill.onnx"])
    assert any(name.endswith("_Q4" if precision == "int4" else "_Q8") for name in shared)
    assert not list(out.glob("*.data"))
    # the runtime reads it like any bundle; TensorRT does not build it
    assert len(_greedy(out, steps=4)) == 4
    from t2r_export.trt.build import ENGINE_PRECISIONS

    assert precision not in ENGINE_PRECISIONS


def test_a_weight_only_plan_that_misses_its_goal_writes_nothing(bundles, tmp_path, monkeypatch):
    model, _ = bundles
    monkeypatch.setitem(tolerances.MIN_AGREEMENT, "int4", 1.01)
    out = tmp_path / "int4"
    result = runner.invoke(app, ["onnx", str(model), "-o", str(out), "--precision", "int4", "--chained-steps", "8"])
    assert result.exit_code == 1, result.output
    assert "verification failed, no bundle written" in result.output and "< 1.01" in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_teacher_int4_meets_the_perplexity_goal(tmp_path):
    from t2r_export.export.plans import export_plan
    from t2r_export.teacher import bundled_model_dir

    result = export_plan(bundled_model_dir("t2r"), tmp_path / "int4", precision="int4", chained_steps=16)
    figures = {f.name: f.value for f in result.runtime.verification.figures}
    assert figures["teacher-forced steps: perplexity delta"] <= TOLERANCES[("ppl-delta", "int4")]
    assert result.runtime.verification.passed


@pytest.mark.parametrize("target", contract.TARGETS)
def test_prefill_over_several_chunks_equals_the_steps(tmp_path, target):
    """Two prefill calls (70 then 131 tokens: several chunks, neither a multiple of the chunk, the
    second from a non-zero state) against one step per token, batch 2, both in ONNX Runtime."""
    from conftest import make_tiny_model
    from t2r_export.export.bundle import write_graphs
    from t2r_export.export.graph import state_shape
    from t2r_export.export.prefill_graph import CHUNK
    from t2r_export.export.weights import extract_decoder
    from t2r_export.models import T2RConfig, swap_attention
    from t2r_export.runtime.ort_backend import open_sessions
    from t2r_export.tolerances import check_close

    dec = extract_decoder(swap_attention(make_tiny_model("llama"), T2RConfig()))
    write_graphs(dec, tmp_path, "fp32", target)
    sessions = open_sessions(tmp_path, {kind: f"{kind}.onnx" for kind in contract.GRAPH_KINDS}, threads=1)
    shape = state_shape(dec, target)
    pairs = contract.state_pairs(shape.num_layers, shape.parts)
    outputs = ["logits"] + [present for _, present in pairs]
    batch, first, second = 2, CHUNK + 6, 2 * CHUNK + 3
    ids = np.random.default_rng(0).integers(0, dec.vocab_size, (batch, first + second))
    zero = {spec.name: np.zeros((batch, *spec.shape[1:]), np.float32)
            for spec in contract.graph_inputs(shape)[2:]}

    def run(kind, start, stop, state):
        positions = np.tile(np.arange(start, stop), (batch, 1))
        values = sessions[kind].run(outputs, {"input_ids": ids[:, start:stop], "position_ids": positions, **state})
        return values[0], {past: v for (past, _), v in zip(pairs, values[1:])}

    _, state = run("prefill", 0, first, zero)
    logits, state = run("prefill", first, first + second, state)
    stepped = zero
    for t in range(first + second):
        step_logits, stepped = run("step", t, t + 1, stepped)
    check_close("prefill logits", logits, step_logits, ("ort-prefill", "fp32"))
    for name, value in state.items():
        check_close(name, value, stepped[name], ("ort-state", "fp32"), relative=True)


def test_tensorrt_refuses_an_ort_target_bundle_before_looking_for_tensorrt(bundles):
    from t2r_export.trt.build import build_engines

    _, out = bundles
    with pytest.raises(ValueError, match="is a --target ort bundle .ONNX Runtime only.; TensorRT builds from the "
                                         "plain target"):
        build_engines(out["ort"])
