"""TensorRT: static parser compatibility, build plan per version, profiles, island layers, manifest, CLI.

Everything here runs without TensorRT except the tests marked ``trt`` (engine build + TrtDecoder vs
OrtDecoder), which skip unless TensorRT, cuda-python and a CUDA GPU are present.
"""

import importlib.util
import json

import numpy as np
import onnx
import pytest
import typer
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from conftest import make_tiny_model
from t2r_export import contract
from t2r_export.cli import trt_cmd
from t2r_export.export.bundle import export_bundle
from t2r_export.export.graph import PRECISIONS, build_graph, state_shape
from t2r_export.export.weights import extract_decoder
from t2r_export.models import ADAPTERS, T2RConfig, swap_attention
from t2r_export.trt import TensorRTUnavailable
from t2r_export.trt import build as trt_build
from t2r_export.trt import cuda as trt_cuda
from t2r_export.trt.build import engine_entry, island_from_metadata, island_layers, plan_build, profile_shapes
from t2r_export.trt.manifest import EngineManifestError, check_manifest, file_sha256, new_manifest, read_manifest
from t2r_export.trt.compat import check_bundle, check_model, errors
from t2r_export.tolerances import TOLERANCES

runner = CliRunner()
HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


def _cli():
    app = typer.Typer()
    app.command("check")(trt_cmd.check)
    app.command("trt")(trt_cmd.trt)
    return app


def _decoder(arch="llama", feature_map="t2r"):
    return extract_decoder(swap_attention(make_tiny_model(arch), T2RConfig(feature_map=feature_map, feature_dim=16)))


@pytest.fixture(scope="module")
def llama_step():
    return build_graph(_decoder(), contract.STEP)


# ---- compatibility check -------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(ADAPTERS))
def test_every_exported_graph_passes_the_trt_check(arch, tmp_path, tiny_tokenizer):
    model = swap_attention(make_tiny_model(arch), T2RConfig(feature_dim=16))
    for precision in PRECISIONS:
        out = export_bundle(model, tmp_path / precision, precision=precision, verify=False,
                            tokenizer=tiny_tokenizer).out
        findings = check_bundle(out)
        assert findings == [], f"{arch} {precision}: {[str(f) for f in findings]}"


@pytest.mark.parametrize("feature_map", ["elu", "rfa"])
def test_other_feature_maps_pass_the_trt_check(feature_map):
    dec = _decoder("gpt_neox", feature_map)
    for kind in contract.GRAPH_KINDS:
        assert check_model(build_graph(dec, kind, "fp16"), kind) == []


@pytest.mark.parametrize("arch, decay", [("llama", False), ("gpt2", False), ("llama", True), ("gpt2", True)])
def test_window_graphs_pass_the_trt_check_in_every_precision(arch, decay):
    model = swap_attention(make_tiny_model(arch), T2RConfig(feature_map="hedgehog", feature_dim=16, window=6,
                                                            decay=decay))
    dec = extract_decoder(model)
    for precision in PRECISIONS:
        for kind in contract.GRAPH_KINDS:
            findings = check_model(build_graph(dec, kind, precision), kind)
            assert findings == [], f"{arch} {precision} {kind}: {[str(f) for f in findings]}"


def _replace_node(model, index, node):
    nodes = list(model.graph.node)
    nodes[index] = node
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _first(model, op_type):
    return next(i for i, n in enumerate(model.graph.node) if n.op_type == op_type)


def test_contrib_domain_node_is_named(llama_step):
    model = onnx.ModelProto()
    model.CopyFrom(llama_step)
    i = _first(model, "Sigmoid")
    old = model.graph.node[i]
    _replace_node(model, i, helper.make_node("FastGelu", list(old.input), list(old.output), name="mlp/FastGelu_9",
                                            domain="com.microsoft"))
    bad = errors(check_model(model))
    assert [(f.node, f.op) for f in bad] == [("mlp/FastGelu_9", "FastGelu")]
    assert "contrib" in bad[0].message


def test_reshape_with_a_runtime_shape_is_named(llama_step):
    model = onnx.ModelProto()
    model.CopyFrom(llama_step)
    i = _first(model, "Reshape")
    old = model.graph.node[i]
    # the shape now comes from position_ids (a runtime tensor) through a Concat
    shape = helper.make_node("Concat", ["position_ids"], ["runtime_shape"], axis=0, name="shape/Concat_0")
    new = helper.make_node("Reshape", [old.input[0], "runtime_shape"], list(old.output), name=old.name)
    nodes = list(model.graph.node)
    nodes[i:i + 1] = [shape, new]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    bad = errors(check_model(model))
    assert [(f.node, f.op) for f in bad] == [(old.name, "Reshape")]
    assert "runtime tensor 'runtime_shape'" in bad[0].message


def test_float64_tensor_and_cast_are_named(llama_step):
    model = onnx.ModelProto()
    model.CopyFrom(llama_step)
    i = _first(model, "Relu")
    relu = model.graph.node[i]
    to64 = helper.make_node("Cast", [relu.input[0]], ["as_double"], to=TensorProto.DOUBLE, name="phi/Cast_64")
    back = helper.make_node("Cast", ["as_double"], [relu.input[0] + "_back"], to=TensorProto.FLOAT, name="phi/Cast_32")
    new_relu = helper.make_node("Relu", [relu.input[0] + "_back"], list(relu.output), name=relu.name)
    nodes = list(model.graph.node)
    nodes[i:i + 1] = [to64, back, new_relu]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.float64), "unused_double"))
    named = {(f.node, f.op) for f in errors(check_model(model))}
    assert ("phi/Cast_64", "Cast") in named
    assert ("unused_double", "initializer") in named


def test_dynamic_non_batch_axis_and_runtime_axes_are_named(llama_step):
    model = onnx.ModelProto()
    model.CopyFrom(llama_step)
    model.graph.input[2].type.tensor_type.shape.dim[2].dim_param = "features"
    i = _first(model, "Unsqueeze")
    old = model.graph.node[i]
    _replace_node(model, i, helper.make_node("Unsqueeze", [old.input[0], "position_ids"], list(old.output),
                                            name=old.name))
    named = {(f.node, f.op): f.message for f in errors(check_model(model, "step"))}
    assert "axis 2 is dynamic ('features')" in named[(model.graph.input[2].name, "graph input")]
    assert "axes" in named[(old.name, "Unsqueeze")]


def test_opset_unsupported_op_and_nonzero_zero_point_are_named(llama_step):
    model = onnx.ModelProto()
    model.CopyFrom(llama_step)
    model.opset_import[0].version = 23
    i = _first(model, "Sigmoid")
    old = model.graph.node[i]
    _replace_node(model, i, helper.make_node("Hardmax", list(old.input), list(old.output), name="mlp/Hardmax_1"))
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "q_scale")
    zero = numpy_helper.from_array(np.array(3, np.int8), "q_zero")
    model.graph.initializer.extend([scale, zero])
    model.graph.node.append(helper.make_node("QuantizeLinear", ["logits", "q_scale", "q_zero"], ["q_out"], name="q/Q_1"))
    named = {(f.node, f.op) for f in errors(check_model(model))}
    assert {("<model>", "model"), ("q/Q_1", "QuantizeLinear")} <= named


def test_prefill_may_vary_the_sequence_but_step_may_not():
    prefill = build_graph(_decoder(), contract.PREFILL)
    assert check_model(prefill, "prefill") == []
    findings = errors(check_model(prefill, "step"))
    assert {f.node for f in findings} == {"input_ids", "position_ids"}


# ---- check CLI -----------------------------------------------------------------------------------------

def test_check_cli_exit_codes(tmp_path, tiny_tokenizer):
    model = swap_attention(make_tiny_model("llama"), T2RConfig(feature_dim=16))
    bundle = export_bundle(model, tmp_path / "b", verify=False, tokenizer=tiny_tokenizer).out
    app = _cli()
    ok = runner.invoke(app, ["check", str(bundle), "--trt"])
    assert ok.exit_code == 0, ok.output
    assert "compatible with TensorRT 10" in " ".join(ok.output.split())
    missing = runner.invoke(app, ["check", str(tmp_path / "nope"), "--trt"])
    assert missing.exit_code == 2 and "does not exist" in missing.output

    step = onnx.load(str(bundle / "step.onnx"))
    i = _first(step, "Sigmoid")
    old = step.graph.node[i]
    _replace_node(step, i, helper.make_node("QuickGelu", list(old.input), list(old.output),
                                           name="layers.0.mlp/QuickGelu_7", domain="com.microsoft"))
    step.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(step, str(bundle / "step.onnx"))
    bad = runner.invoke(app, ["check", str(bundle), "--trt"])
    assert bad.exit_code == 1
    assert "'layers.0.mlp/QuickGelu_7'" in bad.output and "contrib op" in " ".join(bad.output.split())


# ---- build plan, profiles, island ----------------------------------------------------------------------

def test_plan_build_per_tensorrt_version():
    weak = plan_build("10.3.0", fp16=True, int8=False, bundle_precision="fp32")
    assert (weak.precision, weak.strongly_typed, weak.constrain_island) == ("fp16", False, True)
    assert weak.builder_flags == ("FP16", "OBEY_PRECISION_CONSTRAINTS") and weak.network_flags == ()
    typed = plan_build("10.3.0", fp16=True, int8=False, bundle_precision="fp16")
    assert typed.strongly_typed and typed.builder_flags == () and typed.network_flags == ("STRONGLY_TYPED",)
    with pytest.raises(TensorRTUnavailable, match=r"TensorRT 8.6.1 is too old.*TensorRT >= 10 \(JetPack >= 6.1\)"):
        plan_build("8.6.1", fp16=True, int8=False, bundle_precision="fp32")
    q10 = plan_build("10.7.0", fp16=True, int8=True, bundle_precision="int8")
    assert q10.builder_flags == ("INT8", "FP16", "OBEY_PRECISION_CONSTRAINTS") and q10.precision == "int8"
    q11 = plan_build("11.0.0", fp16=False, int8=True, bundle_precision="int8")
    assert q11.strongly_typed and q11.builder_flags == ()
    fp32 = plan_build("10.3.0", False, False, "fp32")
    assert fp32.precision == "fp32" and fp32.cleared_flags == ("TF32",)
    with pytest.raises(ValueError, match="--precision fp16"):
        plan_build("11.0.0", fp16=True, int8=False, bundle_precision="fp32")
    with pytest.raises(ValueError, match="--precision int8"):
        plan_build("10.3.0", fp16=False, int8=True, bundle_precision="fp32")


@pytest.mark.parametrize("version", ["11.0.0", "11.4.1"])
def test_tensorrt_11_plans_set_no_precision_flags(version):
    # strongly typed only: the precision is the graph's, no FP16/INT8/constraint flags, no pinned layers
    for bundle_precision, fp16, int8 in [("fp32", False, False), ("fp16", False, False), ("fp16", True, False),
                                         ("int8", False, True), ("int8", True, True)]:
        plan = plan_build(version, fp16=fp16, int8=int8, bundle_precision=bundle_precision)
        assert plan.strongly_typed and not plan.constrain_island, (bundle_precision, fp16, int8)
        assert plan.builder_flags == () and plan.network_flags == (), (bundle_precision, fp16, int8)
        assert plan.precision == bundle_precision


class _FakeCudart:
    """cuda-python's runtime module as releases before 12.9 behave without a driver."""

    class cudaError_t:  # noqa: N801 - the real name
        cudaSuccess = 0

    @staticmethod
    def cudaGetDeviceCount():  # noqa: N802 - the real name
        raise RuntimeError("Failed to dlopen libcuda.so.1")


def test_gpu_info_without_a_driver_is_one_line(monkeypatch):
    import sys
    import types

    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = _FakeCudart
    cuda = types.ModuleType("cuda")
    cuda.bindings = bindings
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", _FakeCudart)
    with pytest.raises(TensorRTUnavailable) as caught:
        trt_cuda.gpu_info()
    message = str(caught.value)
    assert "no CUDA driver found (Failed to dlopen libcuda.so.1)" in message and "\n" not in message


def test_old_tensorrt_is_refused_in_one_line(monkeypatch):
    import sys
    import types

    fake = types.ModuleType("tensorrt")
    fake.__version__ = "8.6.2"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    with pytest.raises(TensorRTUnavailable, match=r"^TensorRT 8.6.2 is too old: t2r-export needs TensorRT >= 10 "
                                                  r"\(JetPack >= 6.1\)"):
        trt_cuda.import_tensorrt()


def _imported_modules(module) -> set[str]:
    """Every module a file imports, at module level or inside functions (relative ones as written)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(module))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_the_runner_never_imports_the_builder():
    import subprocess
    import sys

    from t2r_export.trt import manifest, runner

    # no import cycle, not even a lazy one inside a function
    assert not {".build", "t2r_export.trt.build", "..trt.build"} & _imported_modules(runner)
    assert not {".build", ".runner"} & _imported_modules(manifest)
    assert not {".build", ".runner", ".manifest"} & _imported_modules(trt_cuda)

    code = ("import sys, t2r_export.trt.runner, t2r_export.trt.manifest, t2r_export.trt.cuda; "
            "print(sorted(m for m in sys.modules if m.startswith('t2r_export.trt')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(out) == ["t2r_export.trt", "t2r_export.trt.cuda", "t2r_export.trt.manifest", "t2r_export.trt.runner"]


def test_profile_shapes_cover_batch_and_prefill_sequence():
    shape = contract.StateShape(num_layers=2, num_kv_heads=2, feature_dim=16, head_dim=8, vocab_size=300)
    step = profile_shapes(shape, "step", max_batch=8, max_sequence=512)
    assert step["input_ids"] == ((1, 1), (4, 1), (8, 1))
    assert step["past_state.1.s"] == ((1, 2, 16, 8), (4, 2, 16, 8), (8, 2, 16, 8))
    assert step["past_state.0.z"] == ((1, 2, 16), (4, 2, 16), (8, 2, 16))
    prefill = profile_shapes(shape, "prefill", max_batch=1, max_sequence=512)
    assert prefill["position_ids"] == ((1, 1), (1, 256), (1, 512))
    assert set(prefill) == {s.name for s in contract.graph_inputs(shape, "prefill")}
    with pytest.raises(ValueError, match="max-batch"):
        profile_shapes(shape, "step", 0, 16)


def test_island_layers_follow_node_names_from_metadata():
    for precision in ("fp32", "fp16"):
        graph = build_graph(_decoder(), contract.STEP, precision)
        island = island_from_metadata({p.key: p.value for p in graph.metadata_props})
        names = {n.name for n in graph.graph.node}
        assert island and island <= names
        assert all(n.split("/")[0].split(".")[-1] in ("state", "norm1", "norm2", "logits") or
                   n.startswith(("rope/", "final_norm/")) for n in island)
        assert not any("/MatMul" in n and "state" not in n for n in island)
        # TensorRT names a node's first layer after it and extra layers "<name>_<n>"
        state_div = next(n for n in island if "state/Div" in n)
        weight_matmul = next(n.name for n in graph.graph.node if n.name.startswith("layers.0.attn.qkv/MatMul"))
        trt_names = [state_div, state_div + "_1", weight_matmul, weight_matmul + "_2", "Unnamed Layer* 7"]
        assert island_layers(trt_names, island) == [state_div, state_div + "_1"]


# ---- manifest and engine files -------------------------------------------------------------------------

def _entry(plan, bundle, shape):
    profiles = {k: profile_shapes(shape, k, 4, 64) for k in contract.GRAPH_KINDS}
    sources = {k: (f"{k}.onnx", file_sha256(bundle / f"{k}.onnx")) for k in contract.GRAPH_KINDS}
    return engine_entry(plan, profiles, sources, island_count=12)


def test_manifest_round_trip_and_mismatch_messages(tmp_path, tiny_tokenizer):
    model = swap_attention(make_tiny_model("llama"), T2RConfig(feature_dim=16))
    bundle = export_bundle(model, tmp_path / "b", verify=False, tokenizer=tiny_tokenizer).out
    shape = state_shape(extract_decoder(model))
    fp16 = plan_build("10.3.0", True, False, "fp32")
    built = {k: f"{k} engine bytes".encode() for k in contract.GRAPH_KINDS}
    trt_build._write_engines(bundle, "10.3.0", "Orin", "8.7", fp16, _entry(fp16, bundle, shape), built)
    manifest = read_manifest(bundle)
    assert manifest["tensorrt_version"] == "10.3.0" and manifest["gpu"] == {"name": "Orin", "compute_capability": "8.7"}
    entry = check_manifest(manifest, "fp16", "10.3.0", "Orin", "8.7", bundle_dir=bundle)
    assert entry["graphs"]["step"]["file"] == "step.fp16.plan"
    assert entry["graphs"]["prefill"]["profile"]["input_ids"] == {"min": [1, 1], "opt": [2, 32], "max": [4, 64]}
    assert (bundle / "engines" / "prefill.fp16.plan").read_bytes() == b"prefill engine bytes"

    with pytest.raises(EngineManifestError, match="TensorRT 10.3.0, this is TensorRT 10.7.0.*not portable"):
        check_manifest(manifest, "fp16", "10.7.0", "Orin", "8.7", bundle_dir=bundle)
    with pytest.raises(EngineManifestError, match=r"built for Orin \(compute capability 8.7\).*A100 \(8.0\)"):
        check_manifest(manifest, "fp16", "10.3.0", "A100", "8.0", bundle_dir=bundle)
    with pytest.raises(EngineManifestError, match="no int8 engines.*fp16.*--int8"):
        check_manifest(manifest, "int8", "10.3.0", "Orin", "8.7", bundle_dir=bundle)

    # a second precision keeps the first; another TensorRT version starts over
    fp32 = plan_build("10.3.0", False, False, "fp32")
    trt_build._write_engines(bundle, "10.3.0", "Orin", "8.7", fp32, _entry(fp32, bundle, shape), built)
    assert set(read_manifest(bundle)["engines"]) == {"fp16", "fp32"}
    assert (bundle / "engines" / "step.fp16.plan").is_file()
    trt_build._write_engines(bundle, "10.4.0", "Orin", "8.7", fp32, _entry(fp32, bundle, shape), built)
    assert set(read_manifest(bundle)["engines"]) == {"fp32"}
    assert not (bundle / "engines" / "step.fp16.plan").exists()

    # re-exporting the graph invalidates the engines built from it
    graph = onnx.load(str(bundle / "step.onnx"))
    graph.doc_string = "re-exported"
    onnx.save(graph, str(bundle / "step.onnx"))
    with pytest.raises(EngineManifestError, match="different step.onnx"):
        check_manifest(read_manifest(bundle), "fp32", "10.4.0", "Orin", "8.7", bundle_dir=bundle)
    (bundle / "engines" / "manifest.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(EngineManifestError, match="not a t2r-export engine manifest"):
        read_manifest(bundle)
    assert new_manifest("10.3.0", "x", "8.7")["engines"] == {}


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here")
def test_trt_cli_without_tensorrt_is_one_line_exit_2(tmp_path, tiny_tokenizer):
    model = swap_attention(make_tiny_model("llama"), T2RConfig(feature_dim=16))
    bundle = export_bundle(model, tmp_path / "b", verify=False, tokenizer=tiny_tokenizer).out
    result = runner.invoke(_cli(), ["trt", str(bundle), "--fp16"])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "TensorRT is not installed" in result.output
    assert "t2r-export[tensorrt]" in result.output
    assert not (bundle / "engines").exists()


# ---- on TensorRT (skipped here) --------------------------------------------------------------------------

def _gpu_visible() -> bool:
    if not HAVE_TRT:
        return False
    try:
        from t2r_export.trt.cuda import gpu_info

        gpu_info()
        return True
    except Exception:  # noqa: BLE001 - no cuda-python, no driver, no device: all mean "skip"
        return False


@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_visible(), reason="needs TensorRT, cuda-python and a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_trt_engines_match_onnx_runtime(precision, tmp_path, tiny_tokenizer):
    from t2r_export.runtime import OrtDecoder
    from t2r_export.trt.build import build_engines
    from t2r_export.trt.runner import TrtDecoder

    model = swap_attention(make_tiny_model("llama"), T2RConfig(feature_dim=16))
    bundle = export_bundle(model, tmp_path / "b", tokenizer=tiny_tokenizer, chained_steps=16).out
    build_engines(bundle, fp16=precision == "fp16", max_batch=4, max_sequence=64, workspace_mb=256)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 300, (1, 9))
    tol = TOLERANCES[("trt", "fp32" if precision == "fp32" else "fp16")]
    for cuda_graphs in (False, True):
        with OrtDecoder(bundle) as ort_dec, TrtDecoder(bundle, precision, cuda_graphs=cuda_graphs) as trt_dec:
            for dec in (ort_dec, trt_dec):
                dec.reset(2)
            for row in (0, 1):
                a = ort_dec.prefill_row(row, prompt, np.arange(9)[None]).copy()
                b = trt_dec.prefill_row(row, prompt, np.arange(9)[None]).copy()
                assert np.abs(a - b).max() < tol
            for t in range(9, 41):
                ids = rng.integers(0, 300, (2, 1))
                pos = np.full((2, 1), t)
                a, b = ort_dec.step(ids, pos).copy(), trt_dec.step(ids, pos).copy()
                assert np.abs(a - b).max() < tol, f"step {t}"
            for name, value in ort_dec.read_state().items():
                assert np.abs(value - trt_dec.read_state()[name]).max() < tol * max(1, np.abs(value).max())
