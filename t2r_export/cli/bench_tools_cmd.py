"""The focused benchmarks under ``t2r-export bench``: ``latency``, ``precision``, ``scaling``,
``startup`` and ``streams``. Each prints its table and writes its numbers atomically (``--json``;
``streams``: ``--out DIR`` with its plot)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .common import (FORCE_HELP, atomic_output_dir, check_output_early, check_writable_parent, console,
                     err_console, fail, stderr_is_tty)


def _write_json(path: Optional[Path], result: dict) -> None:
    if path is None:
        return
    from ..atomic import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")


def _check_json_path(path: Optional[Path]) -> None:
    if path is not None:
        if path.is_dir():
            fail(f"--json {path} is a directory; expected a file path")
        check_writable_parent(path.parent, "--json's directory")


def _default_bundle() -> Path:
    """The bundled T2R teacher's bundle (exported into the cache on first use; needs the [torch] extra)."""
    from ..teacher import bundled_model_dir

    try:
        from ..bench.run import default_bundle
    except ImportError as err:
        fail(f"no BUNDLE given and the bundled model's export needs the [torch] extra ({err}); name a bundle")
    with console.status("exporting the bundled T2R teacher into the cache (first use only)"):
        return default_bundle(bundled_model_dir("t2r"))


def latency(
    bundle: Optional[Path] = typer.Argument(None, help="Bundle directory (default: the bundled T2R teacher's)."),
    positions: str = typer.Option("128,16384", help="Context positions to time the step at."),
    steps: int = typer.Option(200, help="Timed single-token steps per repeat."),
    repeats: int = typer.Option(5, help="Repeats per position (median kept)."),
    threads: int = typer.Option(2, help="ONNX Runtime intra-op threads."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the numbers here."),
) -> None:
    """Per-token decode latency: IO binding vs plain session.run, near vs far positions."""
    from ..bench.latency import latency_lines, measure_latency
    from ..bench.run import parse_int_list

    _check_json_path(json_out)
    try:
        chosen = list(parse_int_list(positions, "--positions"))
        result = measure_latency(bundle or _default_bundle(), chosen, steps, repeats, threads)
    except ValueError as err:
        fail(str(err))
    console.print("\n".join(latency_lines(result)), highlight=False)
    _write_json(json_out, result)


def precision(
    source: Optional[Path] = typer.Argument(None, help="T2R model dir or fp32 bundle (default: the bundled teacher)."),
    steps: int = typer.Option(4096, help="Chained teacher-forced steps per row."),
    rows: int = typer.Option(4, help="Batch rows, each a different stretch of text."),
    greedy_steps: int = typer.Option(1024, help="Free-running greedy steps of the fp16 plan."),
    long_steps: int = typer.Option(65536, help="Steps of the long (overflow) decode."),
    fp16: Optional[Path] = typer.Option(None, help="fp16 bundle (when SOURCE is a bundle)."),
    fp16_all: Optional[Path] = typer.Option(None, help="fp16-all bundle (when SOURCE is a bundle)."),
    work: Optional[Path] = typer.Option(None, help="Keep the exported bundles here (default: a temporary dir)."),
    threads: int = typer.Option(1, help="ONNX Runtime intra-op threads (0: all cores)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the report here."),
) -> None:
    """Evidence for the precision plans: fp16 / fp16-all / int8 against fp32, and the long-decode overflow."""
    import time

    from ..bench.precision import report_lines, run_precision

    _check_json_path(json_out)
    if source is not None and not source.exists():
        fail(f"{source} does not exist: expected a T2R model directory or an fp32 bundle")

    def progress(message: str) -> None:
        err_console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {message}", highlight=False)

    try:
        report = run_precision(source, steps, rows, greedy_steps, long_steps, fp16, fp16_all, work, threads, progress)
    except ValueError as err:
        fail(str(err))
    console.print("\n".join(report_lines(report)), highlight=False)
    _write_json(json_out, report)


def scaling(
    lengths: str = typer.Option("512,1024,2048,4096,8192", help="Sequence lengths to time."),
    threads: int = typer.Option(2, help="Torch threads in each measuring process."),
    repeats: int = typer.Option(3, help="Timed repeats per length (mean kept)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the numbers here."),
) -> None:
    """Time and peak memory of the parallel (training) form vs sequence length, softmax beside it."""
    from ..bench.run import parse_int_list
    from ..bench.scaling import measure_scaling, scaling_lines

    _check_json_path(json_out)
    try:
        chosen = list(parse_int_list(lengths, "--lengths"))
        with console.status("timing forward + backward per length"):
            result = measure_scaling(chosen, threads, repeats)
    except ValueError as err:
        fail(str(err))
    console.print("\n".join(scaling_lines(result)), highlight=False)
    _write_json(json_out, result)


def startup(
    bundle: Optional[Path] = typer.Argument(None, help="Bundle directory (default: the bundled T2R teacher's)."),
    repeats: int = typer.Option(5, help="Fresh processes timed (after one untimed warm-up run)."),
    prompt: str = typer.Option("import os", help="The prompt given to generate."),
    provider: str = typer.Option("cpu", help="generate's --provider."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the numbers here."),
) -> None:
    """`t2r-export generate` start-up to its first token, in fresh processes (imports and loading included)."""
    from ..bench.startup import measure_startup

    _check_json_path(json_out)
    try:
        chosen = bundle or _default_bundle()
        with console.status(f"timing {repeats} fresh generate processes"):
            result = measure_startup(chosen, repeats, prompt, provider)
    except ValueError as err:
        fail(str(err))
    console.print(f"generate start-up to first token on {chosen}: median {result['median_s']:.3f} s "
                  f"(min {result['min_s']:.3f}, max {result['max_s']:.3f}; {repeats} fresh processes, {provider})",
                  highlight=False)
    _write_json(json_out, result)


def streams(
    bundle: Optional[Path] = typer.Argument(None, help="T2R bundle directory (default: the bundled T2R teacher's)."),
    batch: str = typer.Option("1,8,32,64", "--batch", help="Concurrent streams (batch sizes) to time."),
    context: int = typer.Option(4096, help="Context every stream is at when timing starts."),
    memory_budget: str = typer.Option("8GiB", help="Memory for weights + per-stream state/KV cache (e.g. 8GiB, a "
                                                   "Jetson Orin's); a peer is not run at a batch over it."),
    softmax: Optional[Path] = typer.Option(None, help="The softmax model the bundle came from "
                                                      "(default: the bundled softmax teacher)."),
    config: Optional[str] = typer.Option(None, "--config", help="A random-init model of a public shape instead "
                                                                "(smollm2-135m, qwen2.5-0.5b, ...), built once."),
    steps: int = typer.Option(16, help="Timed steps per repeat (each advances every stream by one token)."),
    repeats: int = typer.Option(3, help="Timed repeats per batch size (median kept)."),
    warmup: int = typer.Option(2, help="Untimed steps per batch size."),
    threads: int = typer.Option(1, help="Threads for every path (ORT intra-op, genai, torch)."),
    paths: str = typer.Option("t2r-ort,softmax-ort,genai", help="Comma-separated subset of t2r-ort,softmax-ort,"
                                                                "genai (t2r-ort is always run)."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Directory for streams.json, streams.png and "
                                                                 "streams.md (default: print, write nothing)."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Many concurrent streams at one context: aggregate tokens/s per batch size, memory per stream, and the
    largest batch each path fits in a memory budget."""
    from ..bench.run import parse_int_list
    from ..bench.streams import StreamsConfig, check_budget, parse_bytes, t2r_footprint
    from ..runtime import load_bundle
    from ..teacher import bundled_model_dir

    if out is not None:
        check_output_early(out, force, inputs=[bundle, softmax])
    try:
        wanted = tuple(dict.fromkeys(["t2r-ort", *(p.strip() for p in paths.split(",") if p.strip())]))
        cfg = StreamsConfig(bundle=bundle or Path("."), softmax_model=Path(softmax or bundled_model_dir("softmax")),
                            batches=parse_int_list(batch, "--batch"), context=context,
                            memory_budget=parse_bytes(memory_budget), steps=steps, repeats=repeats, warmup=warmup,
                            threads=threads, paths=wanted, shape=config)
        cfg.validate(None)
        if config is not None:
            _streams_config(cfg, config, bundle, softmax)
        elif bundle is None:
            cfg.bundle = _default_bundle()
        loaded = load_bundle(cfg.bundle)
        cfg.validate(loaded.config.max_position)
        check_budget(cfg, *t2r_footprint(loaded))
        if not (cfg.softmax_model / "config.json").is_file():
            raise ValueError(f"--softmax {cfg.softmax_model} is not a model directory (no config.json)")
    except ValueError as err:
        fail(str(err))
    result = _run_streams(cfg)
    from ..bench.plots import streams_markdown

    console.print(streams_markdown(result), highlight=False, markup=False, soft_wrap=True)
    if out is not None:
        from ..bench.plots import write_streams_report

        with atomic_output_dir(out, force, inputs=[bundle, softmax]) as tmp:
            (tmp / "streams.json").write_text(json.dumps(result, indent=2) + "\n")
            written = write_streams_report(result, tmp)
        console.print(f"[bold green]wrote[/] {out}/: streams.json, {', '.join(p.name for p in written)}",
                      highlight=False)


def _streams_config(cfg, name: str, bundle, softmax) -> None:
    from ..bench.shapes import check_config, prepare_config
    from ..cache import cache_root

    check_config(name)
    if bundle is not None or softmax is not None:
        raise ValueError("--config builds its own models; drop BUNDLE and --softmax")
    with console.status(f"building {name} (random init), its T2R swap and bundle (cached)") as status:
        made = prepare_config(name, cache_root(), progress=lambda message: status.update(message))
    cfg.bundle, cfg.softmax_model = made["bundle"], made["softmax"]


def _run_streams(cfg) -> dict:
    from ..bench.streams import run_streams

    try:
        if not stderr_is_tty():
            return run_streams(cfg, progress=lambda message: err_console.print(f"streams: {message}",
                                                                                highlight=False))
        with console.status("timing many streams") as status:
            return run_streams(cfg, progress=lambda message: status.update(f"streams: {message}"))
    except ValueError as err:
        fail(str(err))
