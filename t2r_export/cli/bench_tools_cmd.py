"""The focused benchmarks under ``t2r-export bench``: ``latency``, ``precision``, ``scaling`` and
``startup``. Each prints its table and, with ``--json``, writes the numbers (atomically)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .common import check_writable_parent, console, err_console, fail


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
