"""`t2r-export onnx [MODEL] -o graphs/NAME`: step + prefill graphs, tokenizer, runtime.json; verified."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import FORCE_HELP, TRUST_HELP, claimed_output, console, fail


def onnx_export(
    model: Optional[Path] = typer.Argument(None, help="T2R model directory (default: the bundled T2R teacher)."),
    out: Path = typer.Option(Path("graphs/t2r-teacher"), "-o", "--out", help="Bundle directory to write."),
    precision: str = typer.Option("fp32", help="fp32 | fp16 (fp32 state island) | int8 (Q/DQ weight matmuls, "
                                               "calibrated on recorded decode states) | fp16-all (overflow demo)."),
    calibration_prompts: Optional[Path] = typer.Option(None, help="int8: prompts file (default: "
                                                                   "calibration/prompts.txt of the repository)."),
    verify: bool = typer.Option(True, help="Check ONNX Runtime against torch before writing (fp32)."),
    chained_steps: int = typer.Option(256, help="Greedy steps in the chained verification."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    trust_remote_code: bool = typer.Option(False, help=TRUST_HELP),
) -> None:
    from ..export.bundle import export_bundle
    from ..export.graph import PRECISIONS
    from ..teacher import bundled_model_dir
    from ..tolerances import ToleranceError

    if precision not in (*PRECISIONS, "int8"):
        fail(f"unknown precision {precision!r}; expected one of {', '.join((*PRECISIONS, 'int8'))}")
    if chained_steps < 1:
        fail(f"--chained-steps must be ≥ 1, got {chained_steps}")
    model = model or bundled_model_dir("t2r")
    with claimed_output(out, force, inputs=[model, calibration_prompts], what="bundle directory"):
        try:
            _check_tokenizer(model, trust_remote_code)
            with console.status(f"exporting {model} → {out}"):
                if precision == "int8":
                    result = _export_int8(model, out, verify, chained_steps, calibration_prompts, force,
                                          trust_remote_code)
                else:
                    result = export_bundle(model, out, precision=precision, verify=verify,
                                           chained_steps=chained_steps, overwrite=force,
                                           trust_remote_code=trust_remote_code)
        except ToleranceError as err:
            fail(f"verification failed, no bundle written: {err}", code=1)
        except ValueError as err:
            fail(str(err))
    _print_result(result)


def _check_tokenizer(model: Path, trust_remote_code: bool) -> None:
    """A bundle carries the model's tokenizer: a damaged or code-running one is refused before any export."""
    from ..data.tokenizer import load_tokenizer
    from ..trust import check_remote_code

    check_remote_code(model, trust_remote_code)
    if (model / "tokenizer.json").is_file():
        load_tokenizer(model, trust_remote_code)


def _export_int8(model, out: Path, verify: bool, chained_steps: int, prompts: Path | None, force: bool,
                 trust_remote_code: bool):
    """A verified fp32 bundle beside ``out`` (temporary), then the int8 bundle calibrated from it."""
    import dataclasses
    import json
    import tempfile

    from ..export.bundle import export_bundle
    from ..export.quantize import export_int8_bundle

    if prompts is not None and not prompts.is_file():
        fail(f"calibration prompts file not found: {prompts}")
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.fp32-", dir=out.resolve().parent) as scratch:
        fp32 = export_bundle(model, Path(scratch) / "fp32", verify=verify, chained_steps=chained_steps,
                             trust_remote_code=trust_remote_code)
        export_int8_bundle(Path(scratch) / "fp32", out, prompts=prompts, overwrite=force)
    runtime = json.loads((out / "runtime.json").read_text())
    return dataclasses.replace(fp32, out=out, runtime=runtime)


def _print_result(result) -> None:
    from rich.table import Table

    rt = result.runtime
    console.print(f"[bold green]bundle[/] {result.out}: {rt['architecture']}, {rt['num_layers']} layers, "
                  f"{rt['num_kv_heads']} KV heads × k={rt['feature_dim']} × d={rt['head_dim']}, "
                  f"state {rt['state_bytes_per_sequence']:,} bytes/sequence, precision {rt['precision']}")
    if result.report is not None:
        table = Table(title="verification: ONNX Runtime vs torch (max |diff| per output)")
        for col in ("check", "output", "max |diff|"):
            table.add_column(col)
        for check, name, err in result.report.checks:
            table.add_row(check, name, f"{err:.2e}")
        console.print(table)
