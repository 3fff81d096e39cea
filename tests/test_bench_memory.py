"""What `bench run` holds in memory: exporters in child processes, torch models only for their paths,
the run's peak RSS in bench.json. Structure only, no timing: tiny random models."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

import bench_child_jobs
from test_bench import _app, tiny_models  # noqa: F401 (the module-scoped fixture, shared)
from t2r_export import contract
from t2r_export.bench import run as bench_run
from t2r_export.bench.child import ChildProcessFailed, run_in_child
from t2r_export.runtime import load_bundle

runner = CliRunner()


def _cfg(models, tmp_path, paths, **kw):
    return bench_run.BenchConfig.quick(bundle=models / "bundle", softmax_model=models / "softmax",
                                       t2r_model=models / "t2r", positions=(8,), prefill_lengths=(16,), steps=2,
                                       repeats=1, warmup=0, rss_tokens=10, threads=1, paths=paths,
                                       cache_dir=tmp_path / "cache", **kw)


def _no_export_here(*args, **kwargs):
    raise AssertionError("the exporter ran in the bench's own process")


def test_a_child_returns_its_result_and_raises_its_errors_here():
    pid, doubled = run_in_child(bench_child_jobs.pid_and_double, 21, what="test")
    assert doubled == 42 and pid != os.getpid()
    with pytest.raises(ValueError, match="^bad input$"):
        run_in_child(bench_child_jobs.raise_value_error, "bad input", what="test")
    # an exception that cannot travel back is one line naming its type
    with pytest.raises(ChildProcessFailed, match="^Unpicklable: holds a lock$"):
        run_in_child(bench_child_jobs.raise_unpicklable, what="test")


def test_the_weight_only_export_runs_in_another_process(tiny_models, tmp_path, monkeypatch):
    """The exporter called in this process fails the test: the int4 path still gets its bundle and
    its row, so the export ran elsewhere."""
    monkeypatch.setattr("t2r_export.export.plans.export_plan", _no_export_here)
    data = bench_run.run_bench(_cfg(tiny_models, tmp_path, ("t2r-ort", "t2r-int4")))
    assert data["paths"]["t2r-int4"]["status"] == "ok", data["paths"]["t2r-int4"]["status"]
    assert data["paths"]["t2r-int4"]["tokens_per_s"]["8"] > 0
    (runtime,) = (tmp_path / "cache" / "bench-bundle").glob(f"*/{contract.RUNTIME_JSON}")
    assert load_bundle(runtime.parent).config.precision == "int4"
    # the child's peak is recorded apart from the run's own
    assert data["memory"]["process"]["child_peak_rss_bytes"]["int4 export"] > 0


def test_a_child_failing_its_check_or_dying_leaves_the_row_unavailable(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr(bench_run, "_export_job", bench_child_jobs.export_failing_its_check)
    data = bench_run.run_bench(_cfg(tiny_models, tmp_path, ("t2r-ort", "t2r-int4", "t2r-int8-wo")))
    for name, precision in (("t2r-int4", "int4"), ("t2r-int8-wo", "int8-wo")):
        status = data["paths"][name]["status"]
        assert status.startswith(f"unavailable: the {precision} bundle failed its check against fp32: {precision} "
                                 "bundle against the fp32 model: top-1 agreement 0.39 < 0.75 (pid "), status
        assert f"(pid {os.getpid()})" not in status and "\n" not in status
        assert data["paths"][name]["tokens_per_s"] == {}
    assert data["paths"]["t2r-ort"]["status"] == "ok"

    monkeypatch.setattr(bench_run, "_export_job", bench_child_jobs.export_killed)
    data = bench_run.run_bench(_cfg(tiny_models, tmp_path, ("t2r-ort", "t2r-int4")))
    assert data["paths"]["t2r-int4"]["status"] == ("unavailable: the int4 export process ended without an answer "
                                                   "(exit code -9, killed by SIGKILL (the kernel's out-of-memory "
                                                   "killer sends SIGKILL))")
    assert not list((tmp_path / "cache" / "bench-bundle").glob(f"*/{contract.RUNTIME_JSON}"))


def _record_loads(monkeypatch) -> list:
    """Every torch model the run loads, by folder name."""
    import t2r_export.models
    import t2r_export.models.swap as swap

    real, loaded = swap.load_causal_lm, []

    def recording(path, *args, **kwargs):
        loaded.append(os.path.basename(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(swap, "load_causal_lm", recording)
    monkeypatch.setattr(t2r_export.models, "load_causal_lm", recording)
    return loaded


def test_torch_models_load_only_for_the_paths_that_run_them(tiny_models, tmp_path, monkeypatch):
    import copy

    loaded = _record_loads(monkeypatch)
    real_deepcopy = copy.deepcopy

    def no_model_copies(obj, *args, **kwargs):
        assert not hasattr(obj, "config"), "a torch model was copied"
        return real_deepcopy(obj, *args, **kwargs)

    monkeypatch.setattr("t2r_export.bench.softmax_graph.copy.deepcopy", no_model_copies)
    data = bench_run.run_bench(_cfg(tiny_models, tmp_path, ("t2r-ort", "floor", "softmax-ort")))
    assert loaded == ["softmax"]
    assert {name: e["status"] for name, e in data["paths"].items()} == {n: "ok" for n in ("t2r-ort", "floor",
                                                                                           "softmax-ort")}
    monkeypatch.setattr("t2r_export.bench.softmax_graph.copy.deepcopy", real_deepcopy)
    loaded.clear()
    data = bench_run.run_bench(_cfg(tiny_models, tmp_path, ("t2r-ort", "t2r-torch", "transformers")))
    assert sorted(loaded) == ["softmax", "t2r"]
    assert data["paths"]["t2r-torch"]["status"] == "ok" and data["paths"]["transformers"]["status"] == "ok"


def test_a_t2r_model_of_other_dimensions_is_refused_from_its_config(tiny_models, tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from t2r_export.models import T2RConfig, swap_attention

    config = LlamaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256)
    swap_attention(LlamaForCausalLM(config).eval(), T2RConfig(feature_dim=16)).save_pretrained(tmp_path / "other")
    loaded = _record_loads(monkeypatch)
    cfg = _cfg(tiny_models, tmp_path, ("t2r-ort",))
    cfg.t2r_model = tmp_path / "other"
    with pytest.raises(ValueError, match=r"^the T2R model \(3, 4, 2, 16, 300\) does not match the bundle's "
                                         r"\(2, 4, 2, 16, 300\)"):
        bench_run.run_bench(cfg)
    assert "other" not in loaded


def test_bench_json_and_the_report_carry_the_runs_peak_rss(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("T2R_EXPORT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    args = ["bench", str(tiny_models / "bundle"), "--softmax", str(tiny_models / "softmax"), "--t2r-model",
            str(tiny_models / "t2r"), "--out", str(out), "--quick", "--positions", "8", "--prefill-lengths", "16",
            "--steps", "2", "--repeats", "1", "--warmup", "0", "--rss-tokens", "20", "--threads", "1",
            "--paths", "t2r-ort,floor"]
    result = runner.invoke(_app(), args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "bench.json").read_text())
    process = data["memory"]["process"]
    assert process["peak_rss_bytes"] >= process["rss_at_start_bytes"] > 0
    # ru_maxrss is read in the right unit: the peak is at least every RSS sampled during the run
    assert process["peak_rss_bytes"] >= max(data["memory"]["rss"]["rss_bytes"])
    line = f"Peak RSS of the bench process: {process['peak_rss_bytes'] / 2**30:,.2f} GiB"
    assert line in (out / "summary.md").read_text()
    assert line in " ".join(result.output.split())


def test_the_softmax_kv_graphs_read_one_mapped_copy_of_their_weights():
    """Both softmax-ort sessions read the same weights.bin buffers; with or without prepacking the
    decoder gives the same logits."""
    import numpy as np

    from conftest import make_tiny_model
    from t2r_export.bench.softmax_graph import KVCacheDecoder, extract_softmax_decoder
    from t2r_export.tolerances import check_close

    dec = extract_softmax_decoder(make_tiny_model("llama"))
    ids = np.arange(1, 12)
    logits = {}
    for prepack in (True, False):
        decoder = KVCacheDecoder(dec, threads=1, prepack=prepack)
        qkv = [name for name in decoder.weights if name.endswith("qkv.weight")]
        assert len(qkv) == len(dec.layers), sorted(decoder.weights)
        decoder.prefill(ids[:8])
        logits[prepack] = np.array([decoder.step(int(t))[0].copy() for t in ids[8:]])
    unpacked = decoder.sessions["step"].get_session_options()
    assert unpacked.get_session_config_entry("session.disable_prepacking") == "1"
    check_close("softmax-ort logits, prepacked vs not", logits[True], logits[False], ("ort", "fp32"))
