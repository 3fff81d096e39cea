"""Precision plans in ONNX Runtime on the CPU: fp16 (fp32 island), fp16-all (overflow demo), int8 (Q/DQ)."""

import fnmatch

import numpy as np
import onnx
import pytest
import torch

from conftest import make_tiny_model
from t2r_export import contract
from t2r_export.bench.precision import StepChain, free_running, nll, overflow_run, teacher_forced
from t2r_export.export.bundle import export_bundle
from t2r_export.export.graph import build_graph
from t2r_export.export.quantize import (CalibrationRecipe, export_int8_bundle, load_prompts, quantize_graph,
                                        record_calibration, weight_matmul_nodes)
from t2r_export.export.weights import extract_decoder
from t2r_export.models import T2RConfig, swap_attention
from t2r_export.runtime import OrtDecoder, load_bundle
from t2r_export.tolerances import TOLERANCES, check_close
from t2r_export.trt.compat import check_bundle

SMALL_RECIPE = dict(max_prompt_tokens=24, greedy_steps_per_prompt=4, max_step_samples=96, calibration_batch=16)


def _model(seed=0, phi_bias=None):
    model = swap_attention(make_tiny_model("llama", seed), T2RConfig(feature_dim=16)).eval()
    if phi_bias is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("t2r_feature_map.bias"):
                    p.fill_(phi_bias)
    return model


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """Step graphs of one tiny model in every precision, saved."""
    dec = extract_decoder(_model())
    out = tmp_path_factory.mktemp("graphs")
    paths = {}
    for precision in ("fp32", "fp16", "fp16-all"):
        paths[precision] = out / f"step-{precision}.onnx"
        onnx.save(build_graph(dec, contract.STEP, precision), paths[precision])
    return paths


def _io_types(path):
    model = onnx.load(str(path))
    return {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}


def test_fp16_plan_keeps_state_fp32_and_all_fp16_does_not(graphs):
    plan, broken = _io_types(graphs["fp16"]), _io_types(graphs["fp16-all"])
    for name in plan:
        if "state" in name or name == "logits":
            assert plan[name] == onnx.TensorProto.FLOAT, name
    assert all(t == onnx.TensorProto.FLOAT16 for n, t in broken.items() if "state" in n)
    weights = {t.name: t.data_type for t in onnx.load(str(graphs["fp16"])).graph.initializer}
    assert weights["layers.0.attn.qkv.weight"] == onnx.TensorProto.FLOAT16
    assert weights["layers.0.norm1.weight"] == onnx.TensorProto.FLOAT


def test_fp16_plan_tracks_fp32_over_200_steps(graphs):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 300, (2, 201))
    chains = {p: StepChain(graphs[p], 2, threads=1) for p in ("fp32", "fp16")}
    report = teacher_forced(chains, tokens)
    assert report["fp16"]["nonfinite_step"] is None
    assert report["fp16"]["top1_agreement_pct"] >= 97.0
    assert report["fp16"]["max_abs_logit_err"] < TOLERANCES[("ort", "fp16")]
    assert abs(report["fp16"]["perplexity_delta_pct"]) < 1.0
    # after the same 200 steps the fp32 state of the plan matches the fp32 graph's, per tensor
    for name, value in chains["fp16"].state.items():
        assert value.dtype == np.float32
        check_close(name, value, chains["fp32"].state[name], ("ort-state", "fp16"), relative=True)
    logits = {p: c.step(tokens[:, 0], np.full(2, 201)) for p, c in chains.items()}
    check_close("logits", logits["fp16"], logits["fp32"], ("ort", "fp16"), relative=True)


def test_window_fp16_plan_keeps_state_and_softmax_in_fp32_and_tracks_fp32(tmp_path):
    model = swap_attention(make_tiny_model("llama"), T2RConfig(feature_map="hedgehog", feature_dim=16,
                                                                window=8)).eval()
    dec = extract_decoder(model)
    paths = {}
    for precision in ("fp32", "fp16"):
        paths[precision] = tmp_path / f"{precision}.onnx"
        onnx.save(build_graph(dec, contract.STEP, precision), paths[precision])
    graph = onnx.load(str(paths["fp16"]))
    types = _io_types(paths["fp16"])
    assert all(types[n] == onnx.TensorProto.FLOAT for n in types if "state" in n)
    assert {"past_state.0.wk", "past_state.0.wv", "past_state.0.wm"} <= set(types)
    island = set(dict((p.key, p.value) for p in graph.metadata_props)["t2r.fp32_island"].split(","))
    # the max, the exponentials and the division of the window run in the fp32 island
    for op in ("ReduceMax", "Exp", "Div"):
        nodes = [n.name for n in graph.graph.node if n.op_type == op and n.name.startswith("layers.0.state")]
        assert nodes and set(nodes) <= island, op
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 300, (2, 41))
    chains = {p: StepChain(paths[p], 2, threads=1) for p in ("fp32", "fp16")}
    report = teacher_forced(chains, tokens)
    assert report["fp16"]["nonfinite_step"] is None
    assert report["fp16"]["max_abs_logit_err"] < 3e-2


def test_free_running_and_nll_helpers(graphs):
    chains = {p: StepChain(graphs[p], 1, threads=1) for p in ("fp32", "fp16")}
    result = free_running(chains["fp16"], chains["fp32"], np.array([[5, 17, 42, 7]]), steps=24)
    assert result["tokens"] == 24 and result["top1_agreement_pct"] > 90
    logits = np.log(np.array([[0.5, 0.25, 0.25]]))
    assert np.allclose(nll(logits, np.array([1])), np.log(4))


def test_all_fp16_overflows_where_the_plan_stays_finite(tmp_path):
    # a feature-map bias of 256 makes every phi(k) ~ 256: z passes fp16's 65504 after ~256 tokens
    dec = extract_decoder(_model(phi_bias=256.0))
    paths = {}
    for precision in ("fp16", "fp16-all"):
        paths[precision] = tmp_path / f"{precision}.onnx"
        onnx.save(build_graph(dec, contract.STEP, precision), paths[precision])
    stream = np.random.default_rng(1).integers(0, 300, 97)
    result = overflow_run(StepChain(paths["fp16"], 1, 1), StepChain(paths["fp16-all"], 1, 1), stream, steps=400,
                          window=32)
    assert result["fp16_plan"]["nonfinite_step"] is None
    assert result["fp16_plan"]["max_abs_state_seen"] > 65504
    bad = result["fp16_all"]
    assert 200 < bad["nonfinite_step"] < 300
    assert 60000 < bad["max_abs_state_before_nonfinite"] <= 65504
    assert bad["plan_max_abs_state_at_that_step"] > 60000


# ---- int8 ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory, tiny_tokenizer):
    out = tmp_path_factory.mktemp("bundles") / "fp32"
    return export_bundle(_model(), out, tokenizer=tiny_tokenizer, chained_steps=16).out


def test_committed_prompts_and_recipe_load():
    prompts = load_prompts()
    assert 20 <= len(prompts) <= 50
    assert all(p.strip() and "=====" not in p for p in prompts)
    recipe = CalibrationRecipe.load()
    assert recipe.activation_symmetric and recipe.per_channel and "layers.*.state" in recipe.exclude_scopes


def test_calibration_records_real_nonzero_states(fp32_bundle):
    recipe = CalibrationRecipe(**SMALL_RECIPE)
    data = record_calibration(fp32_bundle, load_prompts()[:6], recipe)
    assert 0 < data.step_samples <= recipe.max_step_samples
    positions = np.concatenate([feed["position_ids"] for feed in data.step])
    assert positions.max() > 10
    for name in ("past_state.0.s", "past_state.1.z"):
        states = np.concatenate([feed[name] for feed in data.step])
        nonzero_rows = np.abs(states.reshape(len(states), -1)).max(-1) > 0
        # only a prompt's very first step starts from the zero state
        assert nonzero_rows.mean() > 0.8, name
    assert len(data.prefill) == 12
    assert any(np.abs(feed["past_state.0.z"]).max() > 0 for feed in data.prefill)


def test_int8_qdq_only_around_weight_matmuls_and_runs_in_ort(fp32_bundle, tmp_path):
    recipe = CalibrationRecipe(**SMALL_RECIPE)
    result = export_int8_bundle(fp32_bundle, tmp_path / "int8", prompts=load_prompts()[:6], recipe=recipe,
                                cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").glob("calib-*.npz"))
    for kind in contract.GRAPH_KINDS:
        model = onnx.load(str(result.out / f"{kind}.onnx"))
        nodes = {n.name: n for n in model.graph.node}
        consumers = {}
        for node in model.graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        weights = {t.name for t in model.graph.initializer}
        quantized = set(result.quantized[kind])
        assert quantized and all(nodes[name].op_type == "MatMul" for name in quantized)
        qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
        assert len(qdq) == 3 * len(quantized)          # x: Q + DQ, w: DQ of an int8 initializer
        for node in qdq:
            assert not fnmatch.fnmatchcase(node.name.split("/")[0], "layers.*.state")
            assert not fnmatch.fnmatchcase(node.name.split("/")[0], "layers.*.phi")
            if node.op_type == "DequantizeLinear":
                (user,) = consumers[node.output[0]]
                assert user.op_type == "MatMul" and user.name in quantized
                if node.input[0] in weights:
                    assert user.input[1] == node.output[0]
            else:
                assert [u.op_type for u in consumers[node.output[0]]] == ["DequantizeLinear"]
        state_matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and ".state/" in n.name]
        assert state_matmuls and not set(n.name for n in state_matmuls) & quantized
        assert {p.key: p.value for p in model.metadata_props}["t2r.precision"] == "int8"
    assert load_bundle(result.out).config.precision == "int8"
    assert check_bundle(result.out) == []

    # the int8 bundle runs in the runtime and stays near fp32
    prompt = np.array([[5, 17, 42, 7, 99, 3]])
    with OrtDecoder(fp32_bundle) as ref, OrtDecoder(result.out) as q:
        for dec in (ref, q):
            dec.reset(1)
        a = ref.prefill_row(0, prompt, np.arange(6)[None]).copy()
        b = q.prefill_row(0, prompt, np.arange(6)[None]).copy()
        check_close("prefill logits", b, a, ("ort", "int8"), relative=True)
        for t in range(6, 30):
            ids = np.array([[int(a.argmax())]])
            a, b = ref.step(ids, np.array([[t]])).copy(), q.step(ids, np.array([[t]])).copy()
            assert np.isfinite(b).all()
            check_close(f"step {t} logits", b, a, ("ort", "int8"), relative=True)


def test_weight_matmul_selection_skips_island_and_excluded_scopes():
    graph = build_graph(extract_decoder(_model()), contract.PREFILL)
    everything = weight_matmul_nodes(graph, exclude_scopes=())
    default = weight_matmul_nodes(graph, exclude_scopes=CalibrationRecipe().exclude_scopes)
    assert any("/MatMul" in n and ".phi/" in n for n in everything)
    # rope's rotate_half is a Gather, not a weight matmul
    assert not any(".rope/" in n for n in everything)
    assert not any(".phi/" in n or ".state/" in n or ".rope/" in n for n in default)
    assert {n.split("/")[0] for n in default} == {"layers.0.attn.qkv", "layers.0.attn.o", "layers.0.mlp.in",
                                                  "layers.0.mlp.out", "layers.1.attn.qkv", "layers.1.attn.o",
                                                  "layers.1.mlp.in", "layers.1.mlp.out", "lm_head"}


def test_quantize_graph_refuses_a_graph_without_weight_matmuls(tmp_path):
    graph = build_graph(extract_decoder(_model()), contract.STEP)
    for node in graph.graph.node:
        if node.op_type == "MatMul":
            node.name = "layers.0.state/" + node.name.split("/")[-1]
    onnx.save(graph, tmp_path / "g.onnx")
    with pytest.raises(ValueError, match="no weight matmul"):
        quantize_graph(tmp_path / "g.onnx", tmp_path / "q.onnx", [], CalibrationRecipe())


def test_precision_command_end_to_end(tiny_t2r_dir, tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from t2r_export.cli import app

    monkeypatch.setenv("T2R_EXPORT_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["bench", "precision", str(tiny_t2r_dir), "--steps", "24", "--rows", "2",
                                      "--greedy-steps", "8", "--long-steps", "64", "--threads", "1",
                                      "--work", str(tmp_path / "work"), "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["teacher_forced"]) == {"fp32", "fp16", "fp16-all", "int8"}
    assert report["teacher_forced"]["fp32"]["top1_agreement_pct"] == 100.0
    assert report["overflow"]["fp16_plan"]["nonfinite_step"] is None
    assert (tmp_path / "work" / "int8" / "runtime.json").is_file()
    out = result.stdout
    assert "verdict:" in out and "fp16 plan top-1 agreement" in out


def test_a_window_model_exports_and_decodes_in_every_precision(tmp_path, tiny_tokenizer):
    model = swap_attention(make_tiny_model("llama"), T2RConfig(feature_map="hedgehog", feature_dim=8,
                                                                window=6)).eval()
    out = {p: export_bundle(model, tmp_path / p, precision=p, tokenizer=tiny_tokenizer, chained_steps=8).out
           for p in ("fp32", "fp16", "fp16-all")}
    out["int8"] = export_int8_bundle(out["fp32"], tmp_path / "int8", prompts=load_prompts()[:3],
                                     recipe=CalibrationRecipe(**SMALL_RECIPE), cache_dir=tmp_path / "cache").out
    ids = np.random.default_rng(2).integers(0, 300, (1, 14))
    logits = {}
    for precision, path in out.items():
        bundle = load_bundle(path)
        assert bundle.config.window == 6 and bundle.config.precision == precision
        with OrtDecoder(path) as decoder:
            decoder.reset(1)
            # past the window: the prefill fills it, every step evicts a key into S and z
            decoder.prefill(ids[:, :9], np.arange(9)[None])
            for t in range(9, 14):
                last = np.array(decoder.step(ids[:, t:t + 1], np.array([[t]])), dtype=np.float32)
        logits[precision] = last
    for precision in ("fp16", "fp16-all", "int8"):
        check_close(f"{precision} window bundle: logits", logits[precision], logits["fp32"], ("ort", precision),
                    relative=True)
