"""The int4-qdq plan (export/int4_qdq.py): INT4 weight blocks behind DequantizeLinear for TensorRT,
verified against the fp32 model in ONNX Runtime, accepted by everything that builds or checks the
plain target, and refused in one line where it does not apply. No engine is built here (no TensorRT)."""

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from t2r_export import contract
from t2r_export.cli import app
from t2r_export.contract import RuntimeConfig
from t2r_export.tolerances import MIN_AGREEMENT, TOLERANCES

runner = CliRunner()


@pytest.fixture(scope="module")
def qdq(tmp_path_factory, tiny_tokenizer):
    """A tiny T2R Llama wide enough for blocks of 64, with a tied lm head, exported fp32 and int4-qdq (verified)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from t2r_export.models import T2RConfig, swap_attention

    root = tmp_path_factory.mktemp("qdq")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, bos_token_id=0, eos_token_id=0,
                         tie_word_embeddings=True)
    model = swap_attention(LlamaForCausalLM(config).eval(), T2RConfig())
    model.save_pretrained(root / "model")
    tiny_tokenizer.save_pretrained(root / "model")
    for precision in ("fp32", "int4-qdq"):
        result = runner.invoke(app, ["onnx", str(root / "model"), "-o", str(root / precision), "--precision",
                                     precision, "--chained-steps", "8"])
        assert result.exit_code == 0, result.output
    return root


def _dq_nodes(model):
    return [n for n in model.graph.node if n.op_type == "DequantizeLinear"]


def _loaded(path):
    return onnx.load(str(path), load_external_data=True)


def test_int4_qdq_exports_verified_standard_onnx(qdq):
    out = qdq / "int4-qdq"
    runtime = RuntimeConfig.read(out / contract.RUNTIME_JSON)
    assert runtime.precision == "int4-qdq" and runtime.target == "plain" and runtime.opset == 21
    assert RuntimeConfig.from_json(runtime.to_json()) == runtime
    assert runtime.quantization["block_size"] == 64 and runtime.quantization["bits"] == 4
    record = {f.name: f for f in runtime.verification.figures}
    assert runtime.verification.passed
    assert record["teacher-forced steps: top-1 agreement"].value >= MIN_AGREEMENT["int4-qdq"]
    assert record["teacher-forced steps: perplexity delta"].value <= TOLERANCES[("ppl-delta", "int4-qdq")]
    for kind in contract.GRAPH_KINDS:
        model = _loaded(out / f"{kind}.onnx")
        assert [(o.domain, o.version) for o in model.opset_import] == [("", 21)] and model.ir_version == 10
        assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
        weights = {t.name: t for t in model.graph.initializer}
        consumers = {i: n for n in model.graph.node for i in n.input}
        dqs = _dq_nodes(model)
        # one per quantized matmul (no weight is read twice here), the tied lm head's among them; the
        # lookup's Gather still reads the fp32 embedding
        assert len(dqs) == runtime.quantization["quantized_matmuls"][kind] >= 5
        assert any(n.input[0] == "embed_DQ_Q4" for n in dqs)
        gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] == "embed"]
        assert gathers and weights["embed"].data_type == TensorProto.FLOAT
        for node in dqs:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            assert attrs == {"axis": 0, "block_size": 64} and len(node.input) == 2
            q, scale = weights[node.input[0]], numpy_helper.to_array(weights[node.input[1]])
            assert q.data_type == TensorProto.INT4 and scale.dtype == np.float32 and (scale > 0).all()
            assert list(scale.shape) == [q.dims[0] // 64, q.dims[1]]
            assert consumers[node.output[0]].op_type == "MatMul"
        # the state core and feature map keep their fp32 weights
        assert any(t.data_type == TensorProto.FLOAT and ".phi." in t.name for t in model.graph.initializer)


def test_int4_blocks_round_trip_to_the_fp32_weights(qdq):
    """Each dequantized block is within half a step of the fp32 bundle's weight."""
    fp32 = {t.name: numpy_helper.to_array(t) for t in _loaded(qdq / "fp32" / "step.onnx").graph.initializer}
    model = _loaded(qdq / "int4-qdq" / "step.onnx")
    weights = {t.name: t for t in model.graph.initializer}
    checked = 0
    for node in _dq_nodes(model):
        q = numpy_helper.to_array(weights[node.input[0]]).astype(np.float32)
        scale = numpy_helper.to_array(weights[node.input[1]])
        source = node.input[0].removesuffix("_DQ_Q4")
        original = fp32[source]
        step = np.repeat(scale, 64, axis=0)
        assert np.all(np.abs(q * step - original) <= step / 2 + 1e-6), source
        assert np.abs(q).max() == 7
        checked += 1
    assert checked >= 5


def test_int4_qdq_shares_one_packed_weights_file(qdq):
    out = qdq / "int4-qdq"
    index = json.loads((out / "weights.json").read_text())
    int4 = {name: e for name, e in index["tensors"].items() if e["dtype"] == "int4"}
    shared = set(index["graphs"]["step.onnx"]) & set(index["graphs"]["prefill.onnx"])
    assert int4 and set(int4) <= shared and not list(out.glob("*.data"))
    for entry in int4.values():
        assert entry["length"] == (int(np.prod(entry["shape"])) + 1) // 2
    # a quarter of the fp32 bytes at most: the int4 blocks are an eighth of the weights they replace
    fp32_bytes = (qdq / "fp32" / "weights.bin").stat().st_size
    assert (out / "weights.bin").stat().st_size < 0.6 * fp32_bytes


def test_int4_qdq_is_accepted_by_the_runtime_check_and_trt(qdq):
    from t2r_export.runtime import OrtDecoder, inspect_bundle, load_bundle
    from t2r_export.trt.build import ENGINE_PRECISIONS, plan_build

    out = qdq / "int4-qdq"
    inspect_bundle(out)
    decoder = OrtDecoder(load_bundle(out), provider="cpu", threads=1)
    decoder.reset(1)
    logits = decoder.prefill(np.array([[5, 17, 42, 9]], np.int64), np.arange(4, dtype=np.int64)[None])
    assert np.isfinite(np.asarray(logits)).all()
    decoder.close()
    check = runner.invoke(app, ["check", str(out), "--trt"])
    assert check.exit_code == 0, check.output
    assert "opset 21" in check.output
    assert "int4-qdq" in ENGINE_PRECISIONS
    for version in ("10.3.0", "11.0.0"):
        plan = plan_build(version, fp16=False, int8=False, bundle_precision="int4-qdq")
        assert plan.strongly_typed and plan.builder_flags == () and plan.precision == "int4-qdq"
    with pytest.raises(ValueError, match="drop --fp16"):
        plan_build("10.3.0", fp16=True, int8=False, bundle_precision="int4-qdq")


def _tamper(qdq, tmp_path, change):
    """A copy of the int4-qdq bundle whose step graph's first DequantizeLinear is changed by ``change``."""
    bundle = tmp_path / "tampered"
    shutil.copytree(qdq / "int4-qdq", bundle)
    model = onnx.load(str(bundle / "step.onnx"), load_external_data=False)
    change(model, _dq_nodes(model)[-1])
    onnx.save(model, str(bundle / "step.onnx"))
    return bundle


def _verify(qdq, bundle):
    from t2r_export.export.plan_check import verify_plan
    from t2r_export.export.quantize import load_prompts
    from t2r_export.models import load_t2r_model

    return verify_plan(load_t2r_model(qdq / "model"), bundle, RuntimeConfig.read(bundle / contract.RUNTIME_JSON),
                       load_prompts())


def test_a_broken_scale_or_zero_point_fails_verification(qdq, tmp_path):
    def scale_up(model, node):
        scale = next(t for t in model.graph.initializer if t.name == node.input[1])
        scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 4, scale.name))

    def zero_point(model, node):
        scale = next(t for t in model.graph.initializer if t.name == node.input[1])
        model.graph.initializer.append(helper.make_tensor(f"{node.input[0]}_zp", TensorProto.INT4, scale.dims,
                                                          [3] * int(np.prod(scale.dims))))
        node.input.append(f"{node.input[0]}_zp")

    assert _verify(qdq, qdq / "int4-qdq").passed
    for change in (scale_up, zero_point):
        record = _verify(qdq, _tamper(qdq, tmp_path / change.__name__, change))
        assert not record.passed, change.__name__
    flagged = runner.invoke(app, ["check", str(tmp_path / "zero_point" / "tampered"), "--trt"])
    assert flagged.exit_code == 1 and "non-zero zero point" in flagged.output


@pytest.mark.parametrize("args, message", [
    (["--precision", "int4-qdq", "--block-size", "32"], "unknown --block-size 32; int4-qdq blocks are 64 or 128"),
    (["--precision", "int4", "--block-size", "64"], "--block-size applies to --precision int4-qdq, not int4"),
    (["--precision", "int4-qdq", "--target", "ort"], "--target ort is built in fp32 or weight-only"),
])
def test_bad_int4_qdq_input_is_one_line(qdq, tmp_path, args, message):
    out = tmp_path / "out"
    result = runner.invoke(app, ["onnx", str(qdq / "model"), "-o", str(out), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_int4_qdq_is_quantized_from_fp32_plain_bundles_only(qdq, tmp_path):
    from t2r_export.export.int4_qdq import export_qdq_bundle

    with pytest.raises(ValueError, match="is a int4-qdq bundle; int4-qdq is quantized from an fp32 bundle"):
        export_qdq_bundle(qdq / "int4-qdq", tmp_path / "again")
    with pytest.raises(ValueError, match="unknown --block-size 96"):
        export_qdq_bundle(qdq / "fp32", tmp_path / "odd", block_size=96)
    assert not (tmp_path / "again").exists() and not (tmp_path / "odd").exists()


def _int4_graph(dims, scale_dims, block_size=None, zero=None):
    rows, cols = dims
    q = helper.make_tensor("w_q", TensorProto.INT4, dims, [1] * (rows * cols))
    scale = numpy_helper.from_array(np.full(scale_dims, 0.1, np.float32), "w_s")
    inputs, inits = ["w_q", "w_s"], [q, scale]
    if zero is not None:
        inits.append(helper.make_tensor("w_z", TensorProto.INT4, scale_dims, [zero] * int(np.prod(scale_dims))))
        inputs.append("w_z")
    attrs = {"axis": 0, **({"block_size": block_size} if block_size else {})}
    nodes = [helper.make_node("DequantizeLinear", inputs, ["w"], name="dq", **attrs),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("dims, scale_dims, block, zero, message", [
    ([128, 8], [2, 8], 64, None, None),
    ([128, 8], [1, 8], 128, 0, None),
    ([128, 8], [4, 8], 32, None, "blocks of 32 along axis 0"),
    ([128, 7], [2, 7], 64, None, "odd last dimension"),
    ([128, 8], [8], None, None, "without per-block scales"),
    ([128, 8], [2, 8], 64, 2, "non-zero zero point"),
])
def test_the_trt_checker_knows_int4_blocks(dims, scale_dims, block, zero, message):
    from t2r_export.trt.compat import check_model, errors

    findings = check_model(_int4_graph(dims, scale_dims, block, zero))
    assert any("opset 21" in f.message and f.severity == "warning" for f in findings)
    found = [f.message for f in errors(findings)]
    assert (found == []) if message is None else any(message in m for m in found), found


def test_eval_scores_bundles_beside_their_source_model(qdq, tmp_path):
    """`eval MODEL BUNDLE...`: the fp32 bundle reproduces the model's perplexity and argmax on the same
    blocks; the int4-qdq bundle gets its own perplexity and its agreement with the model."""
    text = tmp_path / "text.py"
    text.write_text("def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 40)
    result = runner.invoke(app, ["eval", str(qdq / "model"), str(qdq / "fp32"), str(qdq / "int4-qdq"), "--data",
                                 str(text), "--block-size", "32", "--json"])
    assert result.exit_code == 0, result.output
    model, fp32, int4 = json.loads(result.output)
    assert fp32["kind"] == "bundle fp32" and int4["kind"] == "bundle int4-qdq"
    assert model["tokens"] == fp32["tokens"] == int4["tokens"]
    assert abs(fp32["perplexity"] / model["perplexity"] - 1) <= TOLERANCES[("ppl-record", "fp32")]
    assert fp32["agreement"] >= MIN_AGREEMENT["fp16"] and fp32["agreement_with"] == str(qdq / "model")
    assert int4["agreement"] >= MIN_AGREEMENT["int4-qdq"]
    assert abs(int4["perplexity"] / model["perplexity"] - 1) <= TOLERANCES[("ppl-delta", "int4-qdq")]
    positions = runner.invoke(app, ["eval", str(qdq / "int4-qdq"), "--positions"])
    assert positions.exit_code == 2 and "--positions scores model directories" in positions.output


@pytest.mark.slow
def test_teacher_int4_qdq_meets_the_perplexity_goal(tmp_path):
    from t2r_export.export.plans import export_plan
    from t2r_export.teacher import bundled_model_dir

    for block_size in contract.QDQ_BLOCK_SIZES:
        result = export_plan(bundled_model_dir("t2r"), tmp_path / f"qdq-{block_size}", precision="int4-qdq",
                             chained_steps=16, block_size=block_size)
        figures = {f.name: f.value for f in result.runtime.verification.figures}
        assert figures["teacher-forced steps: perplexity delta"] <= TOLERANCES[("ppl-delta", "int4-qdq")]
        assert result.runtime.verification.passed and result.runtime.quantization["block_size"] == block_size
