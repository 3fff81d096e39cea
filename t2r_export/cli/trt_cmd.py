"""`t2r-export check BUNDLE [--trt]` and `t2r-export trt BUNDLE [--fp16] [--int8] ...`.

`check` validates a bundle against its runtime.json and the graph contract; with ``--trt`` it also
runs the static TensorRT 10 parser-compatibility check (no TensorRT needed). Exit 0 when everything
passes, 1 naming the first offending node, 2 on bad input (no such bundle).
`trt` builds the engines; without TensorRT or a GPU it stops with one line and exit 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from rich.markup import escape

from .common import console, fail


def check(
    bundle: Path = typer.Argument(..., help="Bundle directory (or one .onnx graph) to check."),
    trt: bool = typer.Option(False, "--trt", help="Also check compatibility with TensorRT 10's ONNX parser."),
) -> None:
    from ..runtime.bundle import BundleError, inspect_bundle, load_bundle

    if not bundle.exists():
        fail(f"{bundle} does not exist; expected a bundle directory written by `t2r-export onnx`")
    if bundle.is_file():
        if not trt:
            fail(f"{bundle} is a single graph; pass --trt to check it against TensorRT's parser")
        _check_trt([bundle], single_file=True)
        return
    try:
        load_bundle(bundle)
    except BundleError as err:
        fail(str(err))
    try:
        inspect_bundle(bundle)
    except BundleError as err:
        fail(f"bundle does not match its runtime.json: {err}", code=1)
    console.print(f"[green]ok[/] {escape(str(bundle))}: runtime.json and both graphs follow the graph contract",
                  soft_wrap=True)
    if trt:
        _check_trt([bundle], single_file=False)


def _check_trt(paths: list[Path], single_file: bool) -> None:
    try:
        from ..trt.compat import check_bundle, check_file, errors
    except ImportError as err:
        fail(f"the TensorRT compatibility check needs the onnx package ({err}); `pip install onnx`")
    try:
        findings = check_file(paths[0]) if single_file else check_bundle(paths[0])
    except ValueError as err:
        fail(str(err))
    for finding in findings:
        if finding.severity != "error":
            console.print(f"[yellow]warning[/] {escape(str(finding))}", highlight=False, soft_wrap=True)
    bad = errors(findings)
    if bad:
        for finding in bad[1:]:
            console.print(f"[red]incompatible[/] {escape(str(finding))}", highlight=False, soft_wrap=True)
        more = f" (+{len(bad) - 1} more above)" if len(bad) > 1 else ""
        fail(f"not TensorRT-compatible: {bad[0]}{more}", code=1)
    console.print(f"[green]ok[/] {escape(str(paths[0]))}: compatible with TensorRT 10's ONNX parser (ops, constants, "
                  "dtypes, dynamic dimensions)", soft_wrap=True)


def trt(
    bundle: Path = typer.Argument(..., help="Bundle directory written by `t2r-export onnx`."),
    fp16: bool = typer.Option(False, "--fp16", help="fp16 engines; the state, denominator and norms stay fp32."),
    int8: bool = typer.Option(False, "--int8", help="int8 engines from an int8 (Q/DQ) bundle."),
    max_batch: int = typer.Option(8, "--max-batch", help="Largest batch the optimization profile covers."),
    max_sequence: int = typer.Option(2048, "--max-sequence", help="Longest prompt the prefill profile covers."),
    workspace: int = typer.Option(2048, "--workspace", help="Builder workspace memory pool limit, MB."),
    timing_cache: Optional[Path] = typer.Option(None, "--timing-cache", help="Timing cache file to read and update."),
) -> None:
    from ..trt import TensorRTUnavailable
    from ..trt.build import EngineBuildError, build_engines

    if not bundle.is_dir():
        fail(f"bundle directory {bundle} does not exist; make one with `t2r-export onnx`")
    try:
        with console.status(f"building TensorRT engines for {bundle}"):
            result = build_engines(bundle, fp16=fp16, int8=int8, max_batch=max_batch, max_sequence=max_sequence,
                                   workspace_mb=workspace, timing_cache=timing_cache)
    except TensorRTUnavailable as err:
        fail(str(err))
    except EngineBuildError as err:
        fail(str(err), code=1)
    except ValueError as err:
        fail(str(err))
    for note in result.notes:
        console.print(f"[yellow]note[/] {escape(note)}")
    entry = result.manifest["engines"][result.precision]
    console.print(f"[bold green]engines[/] {result.precision} for TensorRT {result.manifest['tensorrt_version']} on "
                  f"{result.manifest['gpu']['name']} (sm {result.manifest['gpu']['compute_capability']}), "
                  f"{entry['fp32_island_layers']} layers pinned to fp32:")
    for kind, path in result.files.items():
        console.print(f"  {kind}: {path} ({path.stat().st_size:,} bytes)")
