"""`t2r-export onnx [MODEL] -o graphs/NAME`: step + prefill graphs, tokenizer, runtime.json; verified."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import check_writable_parent, console, fail
from .verification import print_bundle


def onnx_export(
    model: Optional[Path] = typer.Argument(None, help="T2R model directory (default: the bundled T2R teacher)."),
    out: Path = typer.Option(Path("graphs/t2r-teacher"), "-o", "--out", help="Bundle directory to write."),
    precision: str = typer.Option("fp32", help="fp32 | fp16 (fp32 state island) | int8 (Q/DQ weight matmuls, "
                                               "calibrated on recorded decode states) | fp16-all (overflow demo)."),
    calibration_prompts: Optional[Path] = typer.Option(None, help="int8: prompts file (default: the packaged "
                                                                   "calibration prompts)."),
    verify_text: Optional[Path] = typer.Option(None, help="fp16/int8: UTF-8 text the bundle is checked on against "
                                                           "the fp32 model (default: the calibration prompts)."),
    verify: bool = typer.Option(True, help="Check the graphs against the fp32 torch model before writing; a "
                                           "failed check writes no bundle (exit 1)."),
    chained_steps: int = typer.Option(256, help="Greedy steps in the chained verification."),
) -> None:
    from ..contract import PRECISIONS
    from ..export.plans import export_plan
    from ..teacher import bundled_model_dir
    from ..tolerances import ToleranceError

    if precision not in PRECISIONS:
        fail(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if chained_steps < 1:
        fail(f"--chained-steps must be ≥ 1, got {chained_steps}")
    texts = _read_text(verify_text) if verify_text is not None else None
    check_writable_parent(out, "bundle directory")
    try:
        model = model or bundled_model_dir("t2r")
        with console.status(f"exporting {model} → {out}") as status:
            result = export_plan(model, out, precision=precision, verify=verify, chained_steps=chained_steps,
                                 calibration_prompts=calibration_prompts, verify_texts=texts,
                                 progress=lambda message: status.update(message))
    except ToleranceError as err:
        fail(f"verification failed, no bundle written: {err}", code=1)
    except ValueError as err:
        fail(str(err))
    print_bundle(result.out, result.runtime)


def _read_text(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        fail(f"--verify-text {path} cannot be read as UTF-8 text: {err}")
    if not text.strip():
        fail(f"--verify-text {path} is empty; give a few lines of text")
    return [text]
