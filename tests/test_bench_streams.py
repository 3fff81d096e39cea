"""`bench streams` (many concurrent streams, memory budget) and `bench --config` (public shapes, random
init), at tiny sizes: what is measured and written, the budget arithmetic, the goals, bad input.

No timing assertions: the structure of what is measured, never its speed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from t2r_export.bench import goals, shapes, sizes
from t2r_export.bench.streams import StreamsConfig, check_budget, parse_bytes, summarize_streams
from t2r_export.cli.bench_cmd import bench
from t2r_export.cli.bench_tools_cmd import streams

runner = CliRunner()
# a Llama with head dim 16 (onnxruntime-genai's attention needs a multiple of 16)
TINY = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=256, bos_token_id=0, eos_token_id=0)


def _app() -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.callback()(lambda: None)
    app.command("streams")(streams)
    app.command("bench")(bench)
    return app


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny softmax Llama (with a tokenizer) and its T2R bundle."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from t2r_export.data.tokenizer import train_bpe_tokenizer
    from t2r_export.export.bundle import export_bundle
    from t2r_export.models import T2RConfig, swap_attention

    root = tmp_path_factory.mktemp("streams")
    tokenizer = train_bpe_tokenizer(["def f(x):\n    return x + 1\n"] * 30, vocab_size=300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    model.save_pretrained(root / "softmax")
    tokenizer.save_pretrained(root / "softmax")
    swap_attention(model, T2RConfig(feature_dim=16)).save_pretrained(root / "t2r")
    tokenizer.save_pretrained(root / "t2r")
    export_bundle(root / "t2r", root / "bundle", chained_steps=8)
    return root


def _genai_installed() -> bool:
    from importlib import metadata

    try:
        metadata.version("onnxruntime-genai")
    except metadata.PackageNotFoundError:
        return False
    return True


# per stream: T2R's one state set (its plain graphs update it in place; 2 layers, 2 KV heads, k = 16,
# d = 16 + 1 for z) and one logits row;
# a KV cache: keys and values of 2 layers x 2 KV heads x 16 dims per token, fp32
T2R_STREAM = 2 * 2 * 16 * 17 * 4 + 4 * 300
KV_PER_TOKEN = 2 * 2 * 2 * 16 * 4


def test_streams_measures_every_batch_and_applies_the_budget(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("T2R_EXPORT_CACHE", str(tmp_path / "cache"))
    context = 24
    weights = sum(f.stat().st_size for f in (tiny / "bundle").iterdir() if f.suffix in (".onnx", ".bin"))
    # room for softmax-ort (past + present cache) at 2 streams but not at 4; T2R fits all
    softmax_weights = 4 * sum(p.numel() for p in
                              __import__("transformers").AutoModelForCausalLM.from_pretrained(tiny / "softmax")
                              .parameters())
    # 3.5 softmax streams: still 3 whole ones, and half a stream of room for the bundle's small extras
    budget = softmax_weights + 7 * KV_PER_TOKEN * (2 * context + 1) // 2
    assert weights + 4 * T2R_STREAM <= budget
    out = tmp_path / "out"
    result = runner.invoke(_app(), ["streams", str(tiny / "bundle"), "--softmax", str(tiny / "softmax"), "--batch",
                                    "1,2,4", "--context", str(context), "--steps", "2", "--repeats", "2",
                                    "--warmup", "1", "--memory-budget", str(budget), "-o", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "streams.json").read_text())
    t2r, soft = data["paths"]["t2r-ort"], data["paths"]["softmax-ort"]
    assert set(t2r["tokens_per_s"]) == {"1", "2", "4"} and all(v > 0 for v in t2r["tokens_per_s"].values())
    assert t2r["stream_bytes"] == T2R_STREAM and t2r["weight_bytes"] == weights
    assert soft["stream_bytes"] == KV_PER_TOKEN * (2 * context + 1)
    assert set(soft["tokens_per_s"]) == {"1", "2"} and soft["skipped"] == {"4": "over the memory budget"}
    summary = data["summary"]["paths"]
    assert summary["t2r-ort"]["fits"] == (budget - weights) // T2R_STREAM
    assert summary["softmax-ort"]["fits"] == 3
    genai = data["paths"]["genai"]
    if _genai_installed():
        assert genai["status"] == "ok", genai["status"]
        assert genai["stream_bytes"] == KV_PER_TOKEN * context and genai["tokens_per_s"]
        assert {g["goal"].split(" (")[0][:20] for g in data["summary"]["goals"]} == {"≥ 100× as many strea",
                                                                                      "≥ 2× genai's best ag"}
    else:
        assert genai["status"].startswith("unavailable: ")
    assert (out / "streams.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| t2r-ort: " in (out / "streams.md").read_text()


def _fails_with_one_line(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    for needle in needles:
        assert needle in text, text


@pytest.mark.parametrize("args, needles", [
    (["--batch", "0"], ["--batch", "positive integers"]),
    (["--batch", "1,10000000"], ["--batch 10000000 at --context 24", "over --memory-budget"]),
    (["--memory-budget", "8 parsecs"], ["--memory-budget", "8GiB"]),
    (["--batch", "1", "--memory-budget", "1KiB"], ["--batch 1 at --context 24", "over --memory-budget 1.00 KiB"]),
    (["--context", "0"], ["--context must be >= 1"]),
    (["--paths", "t2r-ort,vllm"], ["paths must include t2r-ort and be among"]),
])
def test_streams_bad_input_exits_2(tiny, tmp_path, args, needles):
    out = tmp_path / "out"
    base = ["streams", str(tiny / "bundle"), "--softmax", str(tiny / "softmax"), "--context", "24", "-o", str(out)]
    _fails_with_one_line(runner.invoke(_app(), base + args), *needles)
    assert not out.exists()


@pytest.mark.parametrize("command", ["bench", "streams"])
def test_an_unknown_config_exits_2(tmp_path, command):
    _fails_with_one_line(runner.invoke(_app(), [command, "--config", "gpt-9", "-o", str(tmp_path / "o")]),
                         "unknown --config 'gpt-9'", "smollm2-135m")


def test_parse_bytes():
    assert parse_bytes("8GiB") == 8 * 2**30
    assert parse_bytes("8 GB") == 8 * 10**9
    assert parse_bytes("1.5MiB") == 3 * 2**19
    assert parse_bytes("4096") == 4096
    for bad in ("", "0GiB", "-1GiB", "8 GiBs", "GiB"):
        with pytest.raises(ValueError, match="--memory-budget"):
            parse_bytes(bad)


def test_the_budget_check_names_the_first_batch_that_cannot_fit():
    cfg = StreamsConfig(bundle=Path("."), softmax_model=Path("."), batches=(1, 8, 64), context=4096,
                        memory_budget=1000)
    check_budget(cfg, weight_bytes=200, stream_bytes=12)            # 200 + 64 x 12 = 968
    with pytest.raises(ValueError, match="--batch 64 at --context 4096"):
        check_budget(cfg, weight_bytes=300, stream_bytes=12)


def _streams_result(t2r: dict, genai: dict, genai_stream_bytes: int = 1000) -> dict:
    entry = lambda tps, w, s: {"status": "ok", "tokens_per_s": tps, "weight_bytes": w, "stream_bytes": s}  # noqa
    return {"paths": {"t2r-ort": entry(t2r, 100, 10), "genai": entry(genai, 100, genai_stream_bytes)}}


def test_streams_summary_fits_ratios_and_where_the_curve_flattens():
    result = _streams_result({"1": 10.0, "8": 60.0, "32": 64.0}, {"1": 12.0, "8": 30.0})
    summary = summarize_streams(result, budget=100_100, context=4096)
    assert summary["paths"]["t2r-ort"]["fits"] == 10_000 and summary["paths"]["genai"]["fits"] == 100
    assert summary["paths"]["t2r-ort"]["flattens_at"] == 32 and summary["paths"]["genai"]["flattens_at"] is None
    assert summary["ratios"] == {"streams t2r/genai": 100.0, "best aggregate t2r/genai": 64.0 / 30.0}
    assert [g["met"] for g in summary["goals"]] == [True, True]
    # genai's stream 50x T2R's: 9,990 vs 199 streams (50.2x); T2R's best aggregate below genai's
    worse = summarize_streams(_streams_result({"1": 10.0}, {"1": 12.0}, 500), budget=100_000, context=4096)
    assert worse["paths"]["genai"]["fits"] == 199
    assert [g["met"] for g in worse["goals"]] == [False, False]


def _run_result(t2r: dict, genai: dict, floor: dict) -> dict:
    path = lambda tps: {"tokens_per_s": tps}  # noqa: E731
    return {"paths": {"t2r-ort": path(t2r), "genai": path(genai), "floor": path(floor)}}


def test_the_run_goals_carry_the_floor_and_ceiling_ratios():
    # at 4k the ceiling is floor / genai = 4x; T2R at 3.9x is 97.5% of it; latency / floor 1.03 and 1.025
    result = _run_result({"128": 100.0, "4096": 390.0}, {"128": 90.0, "4096": 100.0}, {"128": 103.0, "4096": 400.0})
    found = {g["goal"]: g for g in goals.summarize(result)["goals"]}
    assert found["T2R step ≥ 1× the fastest softmax peer at position 128"]["met"]
    ceiling = next(g for text, g in found.items() if text.startswith("T2R step within 5% of the ceiling"))
    assert ceiling["value"] == "0.97 of it" and ceiling["met"]
    every = next(g for text, g in found.items() if "at every position" in text)
    assert every["value"] == "1.03×" and every["met"]
    slower = _run_result({"128": 80.0, "4096": 300.0}, {"128": 90.0, "4096": 100.0}, {"128": 103.0, "4096": 400.0})
    assert not any(g["met"] for g in goals.summarize(slower)["goals"])


def test_bench_config_builds_a_public_shape_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("T2R_EXPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sizes.CONFIGS, "tiny-llama", ("LlamaConfig", TINY))
    monkeypatch.setattr(shapes, "MODELS", (*sizes.MODELS, "tiny-llama"))
    args = ["bench", "--config", "tiny-llama", "--quick", "--positions", "8", "--prefill-lengths", "16", "--steps",
            "2", "--repeats", "1", "--warmup", "0", "--rss-tokens", "10", "--threads", "1", "--paths",
            "t2r-ort,floor,softmax-ort", "-o", str(tmp_path / "out")]
    result = runner.invoke(_app(), args)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert data["config"]["shape"] == "tiny-llama"
    built = Path(data["config"]["softmax_model"]).parent
    assert built.parent == tmp_path / "cache" / "bench-config"
    assert Path(data["config"]["bundle"]).parent == tmp_path / "cache" / "bench-bundle"
    assert json.loads((built / "t2r" / "config.json").read_text())["hidden_size"] == TINY["hidden_size"]
    assert data["paths"]["t2r-ort"]["status"] == "ok" and data["paths"]["floor"]["status"] == "ok"
    stamp = (built / "t2r" / "model.safetensors").stat().st_mtime_ns
    # the second run reuses the cached models and bundle
    args[-1] = str(tmp_path / "out2")
    assert runner.invoke(_app(), args).exit_code == 0
    assert (built / "t2r" / "model.safetensors").stat().st_mtime_ns == stamp
