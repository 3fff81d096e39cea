"""`t2r-export bench`: the softmax KV graph against HF, the floor graph, a quick run's outputs, bad input.

No timing assertions: the structure of what is measured and written, never its speed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import typer
from typer.testing import CliRunner

from conftest import make_tiny_model
from t2r_export.bench import run as bench_run
from t2r_export.bench.peers import PathUnavailable
from t2r_export.bench.softmax_graph import (FLOOR_OPS, KVCacheDecoder, build_floor_graph, build_softmax_graph,
                                            extract_softmax_decoder, kv_pairs)
from t2r_export.cli.bench_cmd import bench
from t2r_export.tolerances import check_close

runner = CliRunner()
PNGS = ("decode.png", "memory.png", "rss.png", "prefill.png")


def _app() -> typer.Typer:
    # the command on its own app, so these tests do not depend on its registration in cli/__init__.py
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.callback()(lambda: None)
    app.command("bench")(bench)
    return app


def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids)[None]).logits[0].numpy()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_softmax_kv_graph_matches_hf_over_a_growing_cache(arch):
    model = make_tiny_model(arch)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, 40)
    ref = _hf_logits(model, ids)
    decoder = KVCacheDecoder(extract_softmax_decoder(model), threads=1)
    # prefill in uneven chunks (cache grows inside the prefill graph), then single steps
    logits = decoder.prefill(ids[:13], chunk=5)
    check_close(f"{arch} prefill logits", logits[0], ref[12], ("ort", "fp32"))
    decoder.mark()
    for t in range(13, 40):
        check_close(f"{arch} step {t} logits", decoder.step(int(ids[t]))[0], ref[t], ("ort", "fp32"))
    assert decoder.position == 40
    assert decoder.cache_nbytes() == 4 * 2 * model.config.num_hidden_layers * decoder.cache_shape[1] * 40 \
        * decoder.cache_shape[3]
    # rewinding returns to the marked cache: the same step gives the same logits
    decoder.rewind()
    check_close(f"{arch} step after rewind", decoder.step(int(ids[13]))[0], ref[13], ("ort", "fp32"))


def test_softmax_graph_io_names_and_dynamic_axes():
    dec = extract_softmax_decoder(make_tiny_model("llama"))
    for kind in ("step", "prefill"):
        graph = build_softmax_graph(dec, kind)
        onnx.checker.check_model(graph, full_check=True)
        inputs = [v.name for v in graph.graph.input]
        outputs = [v.name for v in graph.graph.output]
        assert inputs == ["input_ids", "position_ids", *[past for past, _ in kv_pairs(2)]]
        assert outputs == ["logits", *[present for _, present in kv_pairs(2)]]
        assert all(node.domain in ("", "ai.onnx") for node in graph.graph.node)


def test_extracting_the_softmax_weights_leaves_the_model_alone():
    model = make_tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    extract_softmax_decoder(model)
    assert type(model).__name__ == "LlamaForCausalLM" and getattr(model.config, "t2r", None) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_floor_graph_holds_only_the_dense_matmuls(arch):
    import onnxruntime as ort

    model = make_tiny_model(arch)
    dec = extract_softmax_decoder(model)
    graph = build_floor_graph(dec)
    onnx.checker.check_model(graph, full_check=True)
    ops = [node.op_type for node in graph.graph.node]
    assert set(ops) <= FLOOR_OPS
    # q|k|v, o, MLP in, MLP out per layer, and the lm_head
    assert ops.count("MatMul") == 4 * len(dec.layers) + 1
    assert ops.count("Gather") == 1
    # its q|k|v matmul is the model's own width (no rotate_half copies)
    widths = sorted(init.dims[1] for init in graph.graph.initializer if init.name.endswith("qkv.weight"))
    assert widths[0] == (dec.num_heads + 2 * dec.num_kv_heads) * dec.head_dim
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input_ids": np.array([[3]], np.int64)})
    assert logits.shape == (1, 1, dec.vocab_size) and np.isfinite(logits).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_floors_prefill_form_runs_the_same_matmuls_over_a_prompt(arch):
    """The prefill floor: each layer's matmuls over all T tokens, lm_head on the last only; the
    floor graph is a chain of matmuls without attention, so its last token's logits equal the step
    floor's on that token alone."""
    import onnxruntime as ort

    from t2r_export.bench.softmax_graph import FloorRunner

    dec = extract_softmax_decoder(make_tiny_model(arch))
    graph = build_floor_graph(dec, "prefill")
    onnx.checker.check_model(graph, full_check=True)
    ops = [node.op_type for node in graph.graph.node]
    assert set(ops) <= FLOOR_OPS and ops.count("MatMul") == 4 * len(dec.layers) + 1
    ids = np.array([5, 9, 2, 7, 3], np.int64)
    logits = FloorRunner(dec, threads=1).prefill(ids)
    assert logits.shape == (1, 1, dec.vocab_size)
    step = ort.InferenceSession(build_floor_graph(dec).SerializeToString(), providers=["CPUExecutionProvider"])
    (alone,) = step.run(None, {"input_ids": ids[-1:][None]})
    check_close(f"{arch} floor prefill's last logits", logits[0, 0], alone[0, 0], ("ort-prefill", "fp32"))
    with pytest.raises(ValueError, match="unknown graph kind"):
        build_floor_graph(dec, "decode")


def test_the_floor_runs_its_matmuls_as_the_runtime_runs_a_bundles():
    from t2r_export.bench.softmax_graph import FloorRunner

    # fp32 bundles are opened without weight prepacking (the matrix-vector kernel for one token)
    runner = FloorRunner(extract_softmax_decoder(make_tiny_model("llama")), threads=1)
    assert runner.session.get_session_options().get_session_config_entry("session.disable_prepacking") == "1"
    logits = runner.step(3)
    assert logits.shape[-1] == runner.session.get_outputs()[0].shape[-1] and np.isfinite(logits).all()


def test_the_bench_graphs_load_from_external_data_not_inline_bytes(monkeypatch):
    """The floor and softmax-ort graphs reach ONNX Runtime as a file whose weights sit in a file
    beside it: a model handed over as bytes past 2 GiB does not load (a 0.5B model's floor is
    2.5 GB), so no bench graph may be opened from its serialized bytes."""
    import onnxruntime as ort

    from t2r_export.bench.softmax_graph import FloorRunner

    dec = extract_softmax_decoder(make_tiny_model("llama"))
    expected = FloorRunner(dec, threads=1).step(3).copy()
    real, given = ort.InferenceSession, []

    def recording(source, *args, **kwargs):
        given.append(source)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", recording)
    runner = FloorRunner(dec, threads=1)
    np.testing.assert_array_equal(runner.step(3), expected)
    decoder = KVCacheDecoder(dec, threads=1)
    # the floor's step and prefill forms, softmax-ort's step and prefill graphs
    assert set(decoder.sessions) == {"step", "prefill"} and len(given) == 4
    assert all(isinstance(source, str) and source.endswith(".onnx") for source in given), given


# -- the command -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A softmax Llama with head_dim 16 (onnxruntime-genai's attention needs a multiple of 16),
    its T2R swap, both with a tokenizer, and the T2R bundle."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from t2r_export.data.tokenizer import train_bpe_tokenizer
    from t2r_export.export.bundle import export_bundle
    from t2r_export.models import T2RConfig, swap_attention

    root = tmp_path_factory.mktemp("bench")
    tokenizer = train_bpe_tokenizer(["def f(x):\n    return x + 1\n", "class A:\n    pass\n"] * 30, vocab_size=300)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                         bos_token_id=0, eos_token_id=0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(root / "softmax")
    tokenizer.save_pretrained(root / "softmax")
    t2r = swap_attention(model, T2RConfig(feature_dim=16))
    t2r.save_pretrained(root / "t2r")
    tokenizer.save_pretrained(root / "t2r")
    export_bundle(root / "t2r", root / "bundle", chained_steps=8)
    return root


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["bench", str(root / "bundle"), "--softmax", str(root / "softmax"), "--t2r-model", str(root / "t2r"),
            "--out", str(out), "--quick", "--positions", "8,24", "--prefill-lengths", "16,48", "--steps", "2",
            "--repeats", "2", "--warmup", "1", "--rss-tokens", "40", "--threads", "1", *extra]


def test_quick_bench_writes_every_row_and_the_plots(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("T2R_EXPORT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    result = runner.invoke(_app(), _args(tiny_models, out))
    assert result.exit_code == 0, result.output
    data = json.loads((out / "bench.json").read_text())
    assert set(data["paths"]) == set(bench_run.DEFAULT_PATHS)
    for name, entry in data["paths"].items():
        # a row is measured or says why not: never empty, never faked
        if entry["status"] == "ok":
            assert set(entry["tokens_per_s"]) == {"8", "24"}, name
            assert all(v > 0 for v in entry["tokens_per_s"].values())
        else:
            assert entry["status"].startswith("unavailable: ") and not entry["tokens_per_s"], name
    assert data["paths"]["t2r-ort"]["status"] == "ok" and data["paths"]["floor"]["status"] == "ok"
    assert set(data["summary"]["positions"]) == {"8", "24"}
    assert {"t2r/softmax-ort", "t2r/genai", "t2r/transformers", "t2r_latency/floor"} <= \
        set(data["summary"]["positions"]["8"])
    mem = data["memory"]
    assert mem["kv_cache_bytes"]["24"] == 3 * mem["kv_cache_bytes"]["8"]
    assert mem["state_bytes"] == 2 * 2 * 16 * (16 + 1) * 4
    assert mem["rss"]["decode_tokens"] == 40 and len(mem["rss"]["rss_bytes"]) == len(mem["rss"]["tokens"])
    assert mem["rss"]["state_bytes"] == mem["rss"]["state_bytes_after"]
    assert set(data["prefill"]) == {"16", "48"}
    assert {"t2r-ort prefill graph", "t2r-ort step feeding", "prefill_graph/step_feeding"} <= set(data["prefill"]["16"])
    # the floor's prefill form: the ceiling of the prefill over step feeding, and the graph's share of it
    for row in data["prefill"].values():
        assert row["prefill_floor/step_feeding"] == pytest.approx(row["floor"] / row["t2r-ort step feeding"])
        assert row["prefill_graph/floor"] == pytest.approx(row["t2r-ort prefill graph"] / row["floor"])
    assert "floor / step feeding (ceiling)" in (out / "summary.md").read_text()
    assert data["machine"]["threads"] == 1
    for png in PNGS:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert "| t2r-ort: " in (out / "summary.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "temporary output left behind"


def test_weight_only_paths_run_their_own_cached_bundles_beside_fp32(tiny_models, tmp_path, monkeypatch):
    """--paths t2r-int4,... exports the T2R model once per plan into the cache and times it beside the
    fp32 step; the ratios and the int4 goal come from the measured tokens/s."""
    from t2r_export.bench.goals import INT4_SPEEDUP_GOAL, QUANTIZED_PATHS
    from t2r_export.runtime import load_bundle

    monkeypatch.setenv("T2R_EXPORT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    result = runner.invoke(_app(), _args(tiny_models, out, "--paths", "t2r-ort," + ",".join(QUANTIZED_PATHS)))
    assert result.exit_code == 0, result.output
    data = json.loads((out / "bench.json").read_text())
    assert set(data["paths"]) == {"t2r-ort", *QUANTIZED_PATHS}
    precisions = {load_bundle(path.parent).config.precision
                  for path in (tmp_path / "cache" / "bench-bundle").glob("*/runtime.json")}
    assert precisions == set(QUANTIZED_PATHS.values())
    fp32 = data["paths"]["t2r-ort"]["tokens_per_s"]
    for p, row in data["summary"]["positions"].items():
        for name in QUANTIZED_PATHS:
            assert data["paths"][name]["status"] == "ok"
            assert row[f"{name}/t2r-ort"] == pytest.approx(data["paths"][name]["tokens_per_s"][p] / fp32[p])
    worst = min(row["t2r-int4/t2r-ort"] for row in data["summary"]["positions"].values())
    goal = next(g for g in data["summary"]["goals"] if g["goal"].startswith("int4 step"))
    assert goal["met"] == (worst >= INT4_SPEEDUP_GOAL) and f"{worst:.2f}" in goal["value"]
    assert "Weight-only plans" in (out / "summary.md").read_text()


def test_a_peer_that_cannot_run_or_fails_is_reported_unavailable(tiny_models, tmp_path, monkeypatch):
    def no_genai(*args, **kwargs):
        raise PathUnavailable("onnxruntime-genai is not installed (test)")

    def broken_step(self, token):
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setattr("t2r_export.bench.peers.build_genai_model", no_genai)
    monkeypatch.setattr("t2r_export.bench.peers.SoftmaxOrtPath.step", broken_step)
    cfg = bench_run.BenchConfig.quick(bundle=tiny_models / "bundle", softmax_model=tiny_models / "softmax",
                                      t2r_model=tiny_models / "t2r", positions=(8,), prefill_lengths=(16,), steps=2,
                                      repeats=1, warmup=0, rss_tokens=10, threads=1, paths=("t2r-ort", "genai", "softmax-ort"),
                                      cache_dir=tmp_path)
    cfg.profile = True
    data = bench_run.run_bench(cfg)
    assert data["paths"]["genai"]["status"] == "unavailable: onnxruntime-genai is not installed (test)"
    # the profile ranks op types of the step graph beside the floor's
    assert data["profile"]["t2r_step"]["by_op"]["MatMul"]["nodes"] >= 4 * 2 + 1
    assert set(data["profile"]["floor"]["by_op"]) <= FLOOR_OPS
    assert data["summary"]["positions"]["8"]["t2r/genai"] is None
    # failing mid-run: the row says why, in one line, and holds no numbers
    assert data["paths"]["softmax-ort"]["status"] == "unavailable: RuntimeError: kernel exploded"
    assert data["paths"]["softmax-ort"]["tokens_per_s"] == {}


def test_a_peer_whose_builder_raises_is_reported_unavailable(tiny_models, tmp_path, monkeypatch):
    """onnxruntime-genai's model builder failing on a model (any exception) leaves its row unavailable
    with the reason; the run goes on."""
    def failing_builder(*args, **kwargs):
        raise RuntimeError("narrowing_error\nmore")

    monkeypatch.setattr("t2r_export.bench.peers.build_genai_model", failing_builder)
    cfg = bench_run.BenchConfig.quick(bundle=tiny_models / "bundle", softmax_model=tiny_models / "softmax",
                                      t2r_model=tiny_models / "t2r", positions=(8,), prefill_lengths=(16,), steps=2,
                                      repeats=1, warmup=0, rss_tokens=10, threads=1, paths=("t2r-ort", "genai"),
                                      cache_dir=tmp_path)
    data = bench_run.run_bench(cfg)
    assert data["paths"]["genai"]["status"] == "unavailable: RuntimeError: narrowing_error"
    assert data["paths"]["t2r-ort"]["status"] == "ok"


def test_a_weight_only_export_that_fails_its_check_is_reported_unavailable(tiny_models, tmp_path, monkeypatch):
    """A real model's quantized bundle is checked against fp32 (a public shape's random weights are
    only timed); a plan that fails the check leaves its row unavailable with the reason."""
    from t2r_export.tolerances import ToleranceError

    asked = []

    def failing(t2r_model, cache_root=None, precision="fp32", check_quality=True):
        asked.append((precision, check_quality))
        raise ToleranceError(f"{precision} bundle against the fp32 model: top-1 agreement 0.39 < 0.75")

    monkeypatch.setattr(bench_run, "default_bundle", failing)
    cfg = bench_run.BenchConfig.quick(bundle=tiny_models / "bundle", softmax_model=tiny_models / "softmax",
                                      t2r_model=tiny_models / "t2r", positions=(8,), prefill_lengths=(16,), steps=2,
                                      repeats=1, warmup=0, rss_tokens=10, threads=1, paths=("t2r-ort", "t2r-int4"),
                                      cache_dir=tmp_path)
    data = bench_run.run_bench(cfg)
    assert asked == [("int4", True)]
    assert data["paths"]["t2r-int4"]["status"] == ("unavailable: the int4 bundle failed its check against fp32: int4 "
                                                   "bundle against the fp32 model: top-1 agreement 0.39 < 0.75")
    assert data["summary"]["positions"]["8"]["t2r-int4/t2r-ort"] is None
    assert not any(g["goal"].startswith("int4 step") for g in data["summary"]["goals"])


def _fails_with_one_line(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in text, text


def test_bad_positions_exit_2(tiny_models, tmp_path):
    args = _args(tiny_models, tmp_path / "out")
    args[args.index("--positions") + 1] = "128,abc"
    _fails_with_one_line(runner.invoke(_app(), args), "--positions", "comma-separated")
    assert not (tmp_path / "out").exists()


def test_position_beyond_the_models_maximum_exits_2(tiny_models, tmp_path):
    # a learned-position model has a maximum: a bundle saying so refuses positions past it
    # a copy: a bundle of symlinks to files outside it is refused (a bundle is a closed folder)
    bundle = shutil.copytree(tiny_models / "bundle", tmp_path / "bundle")
    runtime = json.loads((tiny_models / "bundle" / "runtime.json").read_text())
    runtime["max_position"] = 20
    (bundle / "runtime.json").write_text(json.dumps(runtime))
    args = _args(tiny_models, tmp_path / "out")
    args[1] = str(bundle)
    _fails_with_one_line(runner.invoke(_app(), args), "beyond the model's maximum of 20")


def test_missing_bundle_exits_2(tiny_models, tmp_path):
    args = _args(tiny_models, tmp_path / "out")
    args[1] = str(tmp_path / "nope")
    _fails_with_one_line(runner.invoke(_app(), args), "does not exist")


def test_unwritable_out_exits_2(tiny_models, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _fails_with_one_line(runner.invoke(_app(), _args(tiny_models, blocker / "out")), "cannot be created")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_cuda_skips_the_torch_paths_with_a_reason(tiny_models, tmp_path):
    out = tmp_path / "out"
    args = _args(tiny_models, out, "--device", "cuda", "--paths", "t2r-torch,transformers")
    result = runner.invoke(_app(), args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "bench.json").read_text())
    for name in ("t2r-torch", "transformers"):
        assert data["paths"][name]["status"].startswith("unavailable: --device cuda, but torch sees no CUDA"), name


def test_the_cached_default_bundle_is_rebuilt_when_the_exporter_changes(tiny_t2r_dir, tmp_path, monkeypatch):
    first = bench_run.default_bundle(tiny_t2r_dir, tmp_path)
    stamp = (first / "runtime.json").stat().st_mtime_ns
    assert bench_run.default_bundle(tiny_t2r_dir, tmp_path) == first            # reused: same weights, same code
    assert (first / "runtime.json").stat().st_mtime_ns == stamp
    monkeypatch.setattr(bench_run, "exporter_fingerprint", lambda: "f" * 64)   # the emitter's source changed
    second = bench_run.default_bundle(tiny_t2r_dir, tmp_path)
    assert second != first and (second / "runtime.json").is_file()


def test_torch_t2r_path_rewinds_a_window_state():
    from t2r_export.bench.peers import T2RTorchPath
    from t2r_export.models import T2RConfig, swap_attention

    model = swap_attention(make_tiny_model("llama"), T2RConfig(feature_map="hedgehog", feature_dim=8, window=4))
    path = T2RTorchPath(model, prefill_chunk=5)
    path.prefill(np.arange(1, 12))
    path.mark()
    for token in (3, 4, 5):
        path.step(token)
    after = [t.clone() for t in path.state.tensors()]
    assert len(after) == 2 * 5
    path.rewind()
    assert path.position == 11
    for token in (3, 4, 5):
        path.step(token)
    for a, b in zip(path.state.tensors(), after, strict=True):
        torch.testing.assert_close(a, b)
