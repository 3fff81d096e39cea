"""`t2r-export bench [BUNDLE]`: T2R decode/prefill speed and memory against the softmax original.

Prints rich tables and writes ``bench.json`` + PNG plots into ``--out`` (atomically: the directory
appears complete or not at all).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .common import FORCE_HELP, atomic_output_dir, check_output_early, console, err_console, fail, stderr_is_tty


def bench(
    bundle: Optional[Path] = typer.Argument(None, help="T2R bundle directory (default: the bundled T2R teacher, "
                                                       "exported into the cache on first use)."),
    positions: Optional[str] = typer.Option(None, help="Context positions to time decode at "
                                                       "(default 128,1024,4096,16384; with --quick 128,1024)."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Directory for bench.json and the PNG plots "
                                                                 "(default: print the tables, write nothing)."),
    threads: int = typer.Option(0, help="Threads for every path (ORT intra-op, torch); 0 = all CPU cores."),
    repeats: Optional[int] = typer.Option(None, help="Timed repeats per position, median kept (default 5; quick 3)."),
    steps: Optional[int] = typer.Option(None, help="Single-token steps per repeat (default 64; quick 8)."),
    warmup: Optional[int] = typer.Option(None, help="Untimed warm-up steps per position (default 8; quick 2)."),
    device: str = typer.Option("cpu", help="cpu | cuda: where the torch paths run (CUDA graphs for the T2R step)."),
    softmax: Optional[Path] = typer.Option(None, help="The softmax model the bundle came from "
                                                      "(default: the bundled softmax teacher)."),
    t2r_model: Optional[Path] = typer.Option(None, help="The T2R model the bundle was exported from, for the torch "
                                                        "path (default: the bundled T2R teacher)."),
    prefill_lengths: Optional[str] = typer.Option(None, help="Prompt lengths for the prefill comparison "
                                                             "(default 1024,8192; quick 256,1024)."),
    rss_tokens: Optional[int] = typer.Option(None, help="Tokens of the greedy decode watched for RSS growth "
                                                        "(default 10000; quick 2000; the 100k check: 100000)."),
    paths: str = typer.Option("all", help="Comma-separated subset of t2r-ort,softmax-ort,genai,transformers,"
                                          "t2r-torch,floor (all: these; t2r-ort is always run), plus the T2R "
                                          "model's weight-only bundles t2r-int4, t2r-int8-wo, t2r-int4-qdq "
                                          "(exported into the cache)."),
    quick: bool = typer.Option(False, "--quick", help="A ~1-minute run: fewer positions, steps and tokens."),
    profile: bool = typer.Option(False, "--profile", help="Also profile the T2R step graph and the floor with "
                                                          "ONNX Runtime's profiler (time and nodes by op type)."),
    config: Optional[str] = typer.Option(None, "--config", help="Time a random-init model of a public shape "
                                                                "instead (smollm2-135m, qwen2.5-0.5b, llama-3.2-1b, "
                                                                "...): built, swapped and exported once into the "
                                                                "cache."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    import os

    from ..bench.child import ChildProcessFailed
    from ..bench.run import DEFAULT_PATHS, BenchConfig, default_bundle, parse_int_list
    from ..teacher import bundled_model_dir

    if out is not None:
        check_output_early(out, force, inputs=[bundle, softmax, t2r_model])
    try:
        overrides = {"threads": threads or os.cpu_count() or 1, "device": device, "profile": profile}
        if positions is not None:
            overrides["positions"] = parse_int_list(positions, "--positions")
        if prefill_lengths is not None:
            overrides["prefill_lengths"] = parse_int_list(prefill_lengths, "--prefill-lengths")
        for name, value in (("repeats", repeats), ("steps", steps), ("warmup", warmup), ("rss_tokens", rss_tokens)):
            if value is not None:
                overrides[name] = value
        wanted = DEFAULT_PATHS if paths.strip() == "all" else tuple(
            dict.fromkeys(["t2r-ort", *(p.strip() for p in paths.split(",") if p.strip())]))
        overrides["paths"] = wanted
        softmax_dir = softmax or bundled_model_dir("softmax")
        t2r_dir = t2r_model or bundled_model_dir("t2r")
        if threads < 0:
            raise ValueError(f"--threads must be >= 0, got {threads}")
        make = BenchConfig.quick if quick else BenchConfig
        if config is not None:
            cfg = _config_run(make, config, bundle, softmax, t2r_model, overrides)
        else:
            cfg = make(bundle=bundle or Path("."), softmax_model=Path(softmax_dir), t2r_model=Path(t2r_dir),
                       **overrides)
            _check_early(cfg, bundle)
        if bundle is None and config is None:
            with console.status(f"exporting the bundled T2R teacher ({t2r_dir}) to a bundle"):
                cfg.bundle = default_bundle(cfg.t2r_model)
            _check_early(cfg, cfg.bundle)
    except ValueError as err:
        fail(str(err))
    except ChildProcessFailed as err:
        fail(str(err), code=1)
    result = run_with_progress(cfg)
    if out is None:
        print_result(result)
        return
    with atomic_output_dir(out, force, inputs=[bundle, softmax, t2r_model]) as tmp:
        from ..bench.plots import write_report

        (tmp / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
        written = write_report(result, tmp)
    print_result(result)
    console.print(f"[bold green]wrote[/] {out}/: bench.json, {', '.join(p.name for p in written)}", highlight=False)


def _config_run(make, name: str, bundle, softmax, t2r_model, overrides: dict):
    """The BenchConfig of a public shape's random-init models (built into the cache on first use)."""
    from ..bench.shapes import check_config, prepare_config
    from ..cache import cache_root

    check_config(name)
    if bundle is not None or softmax is not None or t2r_model is not None:
        raise ValueError("--config builds its own models; drop BUNDLE, --softmax and --t2r-model")
    cfg = make(bundle=Path("."), softmax_model=Path("."), t2r_model=Path("."), shape=name, **overrides)
    cfg.validate(None)
    with console.status(f"building {name} (random init), its T2R swap and bundle (cached)") as status:
        made = prepare_config(name, cache_root(), progress=lambda message: status.update(message))
    cfg.bundle, cfg.softmax_model, cfg.t2r_model = made["bundle"], made["softmax"], made["t2r"]
    _check_early(cfg, cfg.bundle)
    return cfg


def _check_early(cfg, bundle: Path | None) -> None:
    """Everything that can be wrong with the input, before any model loads (ValueError, one line)."""
    from ..runtime import load_bundle

    max_position = load_bundle(bundle).config.max_position if bundle is not None else None
    cfg.validate(max_position)
    for what, path in (("--softmax", cfg.softmax_model), ("--t2r-model", cfg.t2r_model)):
        if not (Path(path) / "config.json").is_file():
            raise ValueError(f"{what} {path} is not a model directory (no config.json)")


def run_with_progress(cfg) -> dict:
    from ..bench.run import run_bench

    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            err_console.print("[yellow]warning:[/] --device cuda but torch sees no CUDA device: the torch paths "
                              "(transformers, t2r-torch) are skipped", highlight=False)
    try:
        if not stderr_is_tty():
            # logs and CI: one line per phase instead of a spinner nobody sees
            return run_bench(cfg, progress=lambda message: err_console.print(f"bench: {message}", highlight=False))
        with console.status("benchmarking") as status:
            return run_bench(cfg, progress=lambda message: status.update(f"bench: {message}"))
    except ValueError as err:
        fail(str(err))


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,} B"


def _fmt(value, digits: int = 1) -> str:
    if isinstance(value, str):
        return f"[yellow]{value}[/]"
    return "—" if value is None else f"{value:,.{digits}f}"


def print_result(result: dict) -> None:
    from rich.table import Table

    from ..bench.goals import PREFILL_NAMES, QUANTIZED_PATHS
    from ..bench.loading import peak_rss_line

    m = result["machine"]
    shape = result["config"].get("shape")
    if shape:
        console.print(f"[bold]{shape}[/]-shaped models (random init): {result['config']['softmax_model']}",
                      highlight=False)
    console.print(f"[bold]{m['cpu']}[/], {m['cpus']} CPUs, {m['threads']} threads for every path, batch 1, fp32; "
                  f"load average {m['loadavg_start'][0]:.1f} → {m['loadavg_end'][0]:.1f}"
                  + (f"; the timed steps got {m['cpu_share']:.0%} of the CPU time they asked for"
                     if m.get("cpu_share") else ""), highlight=False)
    positions = sorted({int(p) for e in result["paths"].values() for p in e.get("tokens_per_s", {})})
    table = Table(title="decode tokens/s (single-token steps, median of repeats)")
    table.add_column("path")
    for p in positions:
        table.add_column(f"@{p:,}", justify="right")
    for name, entry in result["paths"].items():
        if entry["status"] != "ok":
            table.add_row(name, f"[yellow]{entry['status']}[/]", *[""] * (len(positions) - 1))
            continue
        table.add_row(name, *[_fmt(entry["tokens_per_s"].get(str(p))) for p in positions])
    console.print(table)

    ratios = Table(title="T2R step graph speedup (tokens/s ratio) and latency vs the floor")
    columns = ("t2r/softmax-ort", "t2r/genai", "t2r/transformers", "t2r/fastest_softmax", "t2r_latency/floor",
               "floor/fastest_softmax")
    for col in ("position", "vs softmax-ort", "vs genai", "vs transformers", "vs fastest softmax", "latency / floor",
                "ceiling (floor vs fastest)"):
        ratios.add_column(col, justify="right")
    for p, row in result["summary"]["positions"].items():
        fastest = f" ({row['fastest_softmax']})" if row.get("fastest_softmax") else ""
        cells = [_fmt(row.get(c), 2) + ("×" if row.get(c) else "") for c in columns]
        cells[3] += fastest
        ratios.add_row(f"{int(p):,}", *cells)
    console.print(ratios)
    quantized = [name for name in QUANTIZED_PATHS if result["paths"].get(name, {}).get("status") == "ok"]
    if quantized:
        table = Table(title="weight-only plans: tokens/s over the fp32 T2R step's")
        table.add_column("position", justify="right")
        for name in quantized:
            table.add_column(name, justify="right")
        for p, row in result["summary"]["positions"].items():
            table.add_row(f"{int(p):,}", *[_fmt(row.get(f"{name}/t2r-ort"), 2) + "×" for name in quantized])
        console.print(table)

    mem = result["memory"]
    memory = Table(title="memory per sequence (fp32)")
    for col in ("position", "softmax KV cache", "T2R state"):
        memory.add_column(col, justify="right")
    for p, kv in mem["kv_cache_bytes"].items():
        memory.add_row(f"{int(p):,}", _bytes(kv), _bytes(mem["state_bytes"]))
    console.print(memory)
    rss = mem["rss"]
    console.print(f"RSS over a {rss['decode_tokens']:,}-token greedy T2R decode ({rss['tokens_per_s']:,.0f} tokens/s): "
                  f"{rss['growth_bytes'] / 2**20:+.1f} MiB after warm-up "
                  f"({rss['growth_from_start_bytes'] / 2**20:+.1f} MiB from the first sample)", highlight=False)
    peak = peak_rss_line(result)
    if peak:
        console.print(peak, highlight=False)

    prefill = Table(title="prefill: prompt tokens/s")
    names = list(PREFILL_NAMES)
    prefill.add_column("prompt", justify="right")
    for name in names + ["graph/step", "floor/step (ceiling)", "graph/fastest softmax"]:
        prefill.add_column(name, justify="right")
    for t, row in result["prefill"].items():
        prefill.add_row(f"{int(t):,}", *[_fmt(row.get(n), 0) for n in names],
                        _fmt(row.get("prefill_graph/step_feeding"), 1) + "×",
                        _fmt(row.get("prefill_floor/step_feeding"), 1) + "×",
                        _fmt(row.get("prefill_graph/fastest_softmax"), 2) + "×")
    console.print(prefill)

    goals = Table(title="goals: T2R decode speed-up over the fastest softmax peer, and the step-latency floor")
    for col in ("goal", "measured", "met"):
        goals.add_column(col)
    for goal in result["summary"]["goals"]:
        goals.add_row(goal["goal"], goal["value"], "[green]yes[/]" if goal["met"] else "[red]no[/]")
    console.print(goals)
    if "profile" in result:
        _print_profile(result["profile"])


def _print_profile(profile: dict) -> None:
    from rich.table import Table

    step, floor = profile["t2r_step"], profile["floor"]
    table = Table(title=f"ORT profile, µs per run (profiler overhead included): T2R step "
                        f"{step['optimized_nodes']} nodes, floor {floor['optimized_nodes']} nodes")
    for col in ("op type", "T2R step µs", "nodes", "floor µs", "nodes"):
        table.add_column(col, justify="right")
    for op in dict.fromkeys([*step["by_op"], *floor["by_op"]]):
        a, b = step["by_op"].get(op, {}), floor["by_op"].get(op, {})
        table.add_row(op, _fmt(a.get("us_per_run")), str(a.get("nodes", "")), _fmt(b.get("us_per_run")),
                      str(b.get("nodes", "")))
    table.add_row("all kernels", _fmt(step["kernel_us_per_run"]), str(step["optimized_nodes"]),
                  _fmt(floor["kernel_us_per_run"]), str(floor["optimized_nodes"]))
    console.print(table)
