"""`t2r-export onnx`: the graph contract, plain-op allowlist, verification against torch, the bundle."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from conftest import make_tiny_model, prefill_in_pieces
from t2r_export import contract
from t2r_export.cli import app
from t2r_export.export.bundle import export_bundle
from t2r_export.export.graph import build_graph, state_shape
from t2r_export.export.verify import VerificationReport, ort_session, verify_chained, verify_step_batches
from t2r_export.export.weights import extract_decoder
from t2r_export.models import ADAPTERS, T2RConfig, swap_attention
from t2r_export.runtime.bundle import inspect_bundle
from t2r_export.tolerances import TOLERANCES, check_close

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]

# what TensorRT's ONNX parser and every ONNX runtime handle; no contrib ops
ALLOWED_OPS = {"Add", "Cast", "Concat", "Cos", "CumSum", "Div", "Elu", "Erf", "Gather", "Gemm", "LayerNormalization",
               "MatMul", "Max", "Mul", "Neg", "Pow", "ReduceMean", "ReduceSum", "Relu", "Reshape", "Sigmoid", "Sin",
               "Slice", "Softmax", "Split", "Sqrt", "Tanh", "Unsqueeze"}
# a tied embedding, stored [D, V] for the lm head's MatMul, moves D last after its lookup
TIED_OPS = {"Transpose"}
# the sliding window adds its masked softmax (the prefill gathers each query's W keys)
WINDOW_OPS = {"Exp", "ReduceMax", "Sub", "Transpose"}
# the chunk-parallel prefill pads T to whole chunks and moves the chunk axis (all TensorRT-parsable)
CHUNK_OPS = {"Mod", "Pad", "Shape", "Sub", "Transpose"}
# a decay adds the prefill's padding to whole blocks (its length read with Shape)
DECAY_OPS = {"Pad", "Shape"}


def test_graphs_readme_is_generated_from_the_contract():
    committed = (REPO / "graphs" / "README.md").read_text()
    assert committed == contract.render_markdown() + "\n", \
        "graphs/README.md is stale: run `python -m t2r_export.contract graphs/README.md`"


def _swapped(arch, feature_map="t2r", window=0, decay=False):
    model = swap_attention(make_tiny_model(arch), T2RConfig(feature_map=feature_map, feature_dim=16,
                                                            window=window, decay=decay)).eval()
    if decay:
        # forgetting fast (gamma 0.93 to 0.97) so a wrong power of gamma shows in the logits
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("t2r_feature_map.decay"):
                    p.copy_(torch.logit(torch.linspace(0.93, 0.97, p.numel())))
    return model


@pytest.mark.parametrize("arch", sorted(ADAPTERS))
@pytest.mark.parametrize("feature_map, window, decay", [("t2r", 0, False), ("hedgehog", 0, False), ("elu", 0, False),
                                                        ("rfa", 0, False), ("hedgehog", 6, False),
                                                        ("hedgehog", 6, True)])
def test_graphs_follow_the_contract_and_use_plain_ops(arch, feature_map, window, decay):
    dec = extract_decoder(_swapped(arch, feature_map, window, decay))
    shape = state_shape(dec)
    for kind in contract.GRAPH_KINDS:
        graph = build_graph(dec, kind)
        onnx.checker.check_model(graph, full_check=True)
        assert graph.opset_import[0].version >= 17
        ops = {node.op_type for node in graph.graph.node}
        allowed = (ALLOWED_OPS | TIED_OPS | (WINDOW_OPS if window else set()) | (DECAY_OPS if decay else set())
                   | (CHUNK_OPS if kind == contract.PREFILL else set()))
        assert ops <= allowed, f"{kind}: ops outside the allowlist: {ops - allowed}"
        assert len(graph.graph.input) == 2 + len(dec.layers) * (5 if window else 2)
        assert all(node.domain in ("", "ai.onnx") for node in graph.graph.node)
        for specs, values in ((contract.graph_inputs(shape, kind), graph.graph.input),
                              (contract.graph_outputs(shape, kind), graph.graph.output)):
            assert [s.name for s in specs] == [v.name for v in values]
            for spec, value in zip(specs, values):
                dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
                assert dims == list(spec.shape), spec.name
                assert value.type.tensor_type.elem_type == (onnx.TensorProto.INT64 if spec.dtype == "int64"
                                                            else onnx.TensorProto.FLOAT)


# every architecture with the learned map; the fixed maps through the same joint q|k feature-map path
@pytest.mark.parametrize("arch, feature_map", [(arch, "t2r") for arch in sorted(ADAPTERS)] +
                         [("llama", "elu"), ("llama", "rfa"), ("gpt_neox", "rfa"), ("gpt2", "elu"),
                          ("llama", "hedgehog"), ("gpt_neox", "hedgehog"), ("gpt2", "hedgehog")] +
                         [(arch, "hedgehog+w5") for arch in sorted(ADAPTERS)] + [("llama", "t2r+w5"),
                                                                                  ("llama", "hedgehog+w12")] +
                         [(arch, "hedgehog+w5+decay") for arch in ("gpt2", "gpt_neox", "qwen2")])
def test_onnx_runtime_matches_torch_for_every_architecture(arch, feature_map, tmp_path):
    window = 0
    decay = feature_map.endswith("+decay")
    feature_map = feature_map.removesuffix("+decay")
    if "+w" in feature_map:
        # 5 keys: the 24 chained steps and the 8-token prefill (longer than W) both cross the window;
        # 12 keys: the prefill is shorter than W
        feature_map, window = feature_map.split("+w")[0], int(feature_map.split("+w")[1])
    model = _swapped(arch, feature_map, window, decay)
    dec = extract_decoder(model)
    paths = {}
    for kind in contract.GRAPH_KINDS:
        paths[kind] = tmp_path / f"{kind}.onnx"
        onnx.save(build_graph(dec, kind), paths[kind])
    report = VerificationReport()
    step, pre = ort_session(str(paths["step"])), ort_session(str(paths["prefill"]))
    verify_step_batches(model, step, len(dec.layers), dec.vocab_size, report, batches=(1, 3))
    verify_chained(model, step, pre, len(dec.layers), dec.vocab_size, report, steps=24)
    checks = {c for c, _, _ in report.checks}
    assert {"step batch 1", "step batch 3", "24 chained steps", "prefill 8 + 23 steps"} <= checks
    assert max(err for _, _, err in report.checks) < TOLERANCES[("ort", "fp32")]


@pytest.mark.parametrize("window", [5, 12])
def test_window_prefill_graph_continues_from_a_partly_filled_state(window, tmp_path):
    from t2r_export.export.verify import _run, _state_feeds
    from t2r_export.models import new_state

    model = _swapped("llama", "hedgehog", window)
    dec = extract_decoder(model)
    onnx.save(build_graph(dec, contract.PREFILL), tmp_path / "prefill.onnx")
    session = ort_session(str(tmp_path / "prefill.onnx"))
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(3))
    feeds = _state_feeds(new_state(model, 2), len(dec.layers))
    # 3 tokens (the window not yet full), then 14 (past it): every piece from the state before it
    for start, end in ((0, 3), (3, 17)):
        pos = np.tile(np.arange(start, end, dtype=np.int64), (2, 1))
        got, feeds = _run(session, ids[:, start:end].numpy(), pos, feeds, len(dec.layers))
    with torch.no_grad():
        expected = model(ids).logits[:, -1].numpy()
    check_close("two prefills: logits", got["logits"], expected, ("ort", "fp32"))
    assert feeds["past_state.0.wm"].sum() == 2 * window


def test_decayed_prefill_of_many_blocks_matches_torch_from_a_partly_filled_state(tmp_path):
    """Prompts of several 64-token blocks (the scan between blocks), in pieces that start mid-block,
    from the state the previous piece left: the logits and the state torch computes."""
    from t2r_export.export.window import DECAY_BLOCK

    model = _swapped("llama", "hedgehog", 5, decay=True)
    with torch.no_grad():
        # one KV head forgets fast, one barely: keys many blocks back still count (the scan's reach)
        for name, p in model.named_parameters():
            if name.endswith("t2r_feature_map.decay"):
                p.copy_(torch.logit(torch.tensor([0.93, 0.999])))
    dec = extract_decoder(model)
    onnx.save(build_graph(dec, contract.PREFILL), tmp_path / "prefill.onnx")
    session = ort_session(str(tmp_path / "prefill.onnx"))
    ids = torch.randint(0, 300, (2, 800), generator=torch.Generator().manual_seed(5))
    cuts = (0, 3, 3 + DECAY_BLOCK, 3 + 3 * DECAY_BLOCK + 7, 800)
    assert 800 - cuts[-2] > 9 * DECAY_BLOCK
    got, feeds, expected, state = prefill_in_pieces(session, model, ids, cuts, len(dec.layers))
    check_close("prefill in pieces: logits", got, expected, ("ort", "fp32"))
    check_close("prefill in pieces: s", feeds["past_state.1.s"], state.s[1].numpy(), ("ort-state", "fp32"),
                relative=True)
    check_close("prefill in pieces: z", feeds["past_state.1.z"], state.z[1].numpy(), ("ort-state", "fp32"),
                relative=True)


def test_export_bundle_writes_everything_a_runtime_needs(tiny_t2r_dir, tmp_path):
    out = tmp_path / "bundle"
    result = export_bundle(tiny_t2r_dir, out)
    assert {"prefill.onnx", "runtime.json", "step.onnx", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    raw = json.loads((out / "runtime.json").read_text())
    for key in ("architecture", "num_layers", "num_heads", "num_kv_heads", "feature_dim", "head_dim", "vocab_size",
                "bos_token_id", "eos_token_id", "max_position", "state_dtype", "graphs", "opset", "tools",
                "source_checkpoint_sha256", "verification"):
        assert key in raw, key
    rt = contract.RuntimeConfig.from_dict(raw)
    assert rt == result.runtime and contract.RuntimeConfig.from_json(rt.to_json()) == rt
    assert rt.state_dtype == "float32" and rt.max_position is None and rt.opset >= 17
    assert rt.graphs["step"].inputs[:3] == ("input_ids", "position_ids", "past_state.0.s")
    chained = {f.name: f for f in rt.verification.figures}["256 chained steps: logits"]
    assert chained.tolerance == TOLERANCES[("ort", "fp32")] and chained.value <= chained.tolerance and chained.passed
    assert rt.verification.passed and rt.verification.greedy_identical
    assert len(rt.source_checkpoint_sha256) == 64
    assert result.report is not None
    assert not list(tmp_path.glob(".bundle.*"))


def test_a_window_bundle_decodes_in_the_runtime_with_no_special_case(tmp_path, tiny_tokenizer):
    from t2r_export.runtime.ort_backend import OrtDecoder

    model = _swapped("llama", "hedgehog", window=4)
    result = export_bundle(model, tmp_path / "b", tokenizer=tiny_tokenizer, chained_steps=16)
    rt = result.runtime
    assert rt.window == 4 and rt.feature_map == "hedgehog" and rt.t2r["window"] == 4
    # per layer: s, z = H_kv·K·(d+1) with K = 2·16 (hedgehog); wk, wv, wm = W·(2·H_kv·d + 1); 2 layers, fp32
    assert rt.state_bytes_per_sequence == 4 * 2 * (2 * 32 * (8 + 1) + 4 * (2 * 2 * 8 + 1))
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(ids).logits[0].numpy()
    for io_binding in (True, False):
        with OrtDecoder(tmp_path / "b", io_binding=io_binding) as decoder:
            decoder.reset(1)
            got = [np.array(decoder.prefill(ids[:, :3].numpy(), np.arange(3)[None]))[0]]
            for t in range(3, 12):
                got.append(np.array(decoder.step(ids[:, t:t + 1].numpy(), np.array([[t]])))[0])
        check_close(f"runtime io_binding={io_binding}: logits", np.stack(got), expected[2:], ("ort", "fp32"))
    # a runtime.json whose window disagrees with the graphs is refused, naming the field
    raw = json.loads((tmp_path / "b" / "runtime.json").read_text())
    (tmp_path / "b" / "runtime.json").write_text(json.dumps({**raw, "window": 3}))
    with pytest.raises(contract.BundleError, match="field 'window' = 3 is wrong: .* so window is 4"):
        inspect_bundle(tmp_path / "b")


def test_gpt2_bundle_records_its_maximum_position(tmp_path, tiny_tokenizer):
    model = _swapped("gpt2")
    result = export_bundle(model, tmp_path / "b", tokenizer=tiny_tokenizer, chained_steps=16)
    assert result.runtime.max_position == 128


def test_cli_onnx_exports_and_prints_verification(tiny_t2r_dir, tmp_path):
    out = tmp_path / "graphs" / "tiny"
    result = runner.invoke(app, ["onnx", str(tiny_t2r_dir), "-o", str(out), "--chained-steps", "32"])
    assert result.exit_code == 0, result.output
    # compact: one row per check and output group (worst over layers), the tolerance beside it
    assert "32 chained steps: logits" in result.output and "step batch 3: state (relative)" in result.output
    assert "present_state" not in result.output and f"≤ {TOLERANCES[('ort', 'fp32')]:.3g}" in result.output
    assert "PASS: 6/6 figures within tolerance; greedy tokens identical" in result.output
    assert (out / "step.onnx").is_file()


def test_failed_verification_exits_non_zero_and_writes_no_bundle(tiny_t2r_dir, tmp_path, monkeypatch):
    import t2r_export.export.bundle as bundle

    real = bundle.extract_decoder

    def broken(model):
        dec = real(model)
        dec.layers[0].o_weight = np.asarray(dec.layers[0].o_weight) * 1.01
        return dec

    monkeypatch.setattr(bundle, "extract_decoder", broken)
    out = tmp_path / "bundle"
    result = runner.invoke(app, ["onnx", str(tiny_t2r_dir), "-o", str(out), "--chained-steps", "8"])
    assert result.exit_code == 1
    assert "verification failed" in result.output and "max |diff|" in result.output
    assert not out.exists() and not list(tmp_path.glob(".bundle.*"))


@pytest.mark.parametrize("make_args, message", [
    (lambda d, t: [str(t / "missing")], "model directory not found"),
    (lambda d, t: [str(d), "--precision", "int3"], "unknown precision"),
    (lambda d, t: [str(d), "--chained-steps", "0"], "--chained-steps must be"),
])
def test_cli_onnx_bad_input(tiny_t2r_dir, tmp_path, make_args, message):
    out = tmp_path / "bundle"
    result = runner.invoke(app, ["onnx", *make_args(tiny_t2r_dir, tmp_path), "-o", str(out)])
    assert result.exit_code == 2 and message in result.output and not out.exists()


def test_cli_onnx_refuses_a_softmax_model(tmp_path, tiny_tokenizer):
    make_tiny_model("llama").save_pretrained(tmp_path / "softmax")
    result = runner.invoke(app, ["onnx", str(tmp_path / "softmax"), "-o", str(tmp_path / "b")])
    assert result.exit_code == 2 and "softmax model, not a T2R model" in result.output


def test_cli_onnx_int8_writes_a_calibrated_int8_bundle_that_generates(tiny_t2r_dir, tmp_path):
    out = tmp_path / "int8"
    result = runner.invoke(app, ["onnx", str(tiny_t2r_dir), "-o", str(out), "--precision", "int8",
                                 "--chained-steps", "8"])
    assert result.exit_code == 0, result.output
    runtime = contract.RuntimeConfig.read(out / "runtime.json")
    assert runtime.precision == "int8" and runtime.state_dtype == "float32"
    ops = {n.op_type for n in onnx.load(str(out / "step.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    generated = runner.invoke(app, ["generate", str(out), "--prompt", "def f(", "--max-new-tokens", "4"])
    assert generated.exit_code == 0, generated.output


def test_cli_onnx_int8_missing_prompts_file(tiny_t2r_dir, tmp_path):
    result = runner.invoke(app, ["onnx", str(tiny_t2r_dir), "-o", str(tmp_path / "b"), "--precision", "int8",
                                 "--calibration-prompts", str(tmp_path / "none.txt")])
    assert result.exit_code == 2 and "calibration prompts file not found" in result.output
    assert not (tmp_path / "b").exists()


def test_generate_with_tensorrt_but_no_tensorrt_is_one_line(tiny_t2r_dir, tmp_path):
    export_bundle(tiny_t2r_dir, tmp_path / "b", chained_steps=4)
    result = runner.invoke(app, ["generate", str(tmp_path / "b"), "--prompt", "x", "--provider", "tensorrt"])
    assert result.exit_code == 2 and "TensorRT" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("arch", sorted(ADAPTERS))
def test_the_adapter_alone_tells_the_extractor_where_every_weight_lives(arch):
    from conftest import TINY_CONFIGS

    assert arch in TINY_CONFIGS, f"registered architecture {arch!r} has no tiny test model"
    model = _swapped(arch, "t2r")
    dec = extract_decoder(model)
    embed = model.get_input_embeddings().weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(dec.embed), embed)
    # HF ties these tiny models' heads: the description must say so, so the graphs store the matrix once
    assert dec.tied_lm_head == (model.get_output_embeddings().weight is model.get_input_embeddings().weight)
    np.testing.assert_array_equal(np.asarray(dec.lm_head), model.get_output_embeddings().weight.detach().numpy().T)
    assert len(dec.layers) == model.config.num_hidden_layers
