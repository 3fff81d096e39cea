"""`t2r-export onnx [MODEL] -o DIR`: step + prefill graphs, tokenizer, runtime.json; verified.

``-o`` is required: the command writes only where it is told. Every cheap precondition (model
folder, config, architecture, tokenizer, output path) is checked before torch is imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..contract import PRECISIONS, QDQ_BLOCK_SIZES, QDQ_WEIGHT_PRECISIONS, TARGETS, WEIGHT_ONLY_PRECISIONS
from .common import FORCE_HELP, TRUST_HELP, claimed_output, console, fail
from .progress import log_to_status
from .verification import print_bundle


def onnx_export(
    model: Optional[Path] = typer.Argument(None, help="T2R model directory (default: the bundled T2R teacher)."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Bundle directory to write (required)."),
    tokenizer: Optional[Path] = typer.Option(None, help="tokenizer.json (or a folder holding it) to ship in the "
                                                        "bundle; default: the model folder's own."),
    precision: str = typer.Option("fp32", help="fp32 | fp16 (fp32 state island) | int8 (Q/DQ weight matmuls, "
                                               "calibrated on recorded decode states) | int4 / int8-wo (weight-only "
                                               "MatMulNBits, ONNX Runtime only) | int4-qdq (INT4 weight blocks "
                                               "behind DequantizeLinear, opset 21: the TensorRT weight-only plan) | "
                                               "fp16-all (overflow demo)."),
    block_size: Optional[int] = typer.Option(None, help="int4-qdq: input rows per INT4 block, 64 (default) or "
                                                        "128 (the sizes TensorRT takes)."),
    target: str = typer.Option("plain", help="plain (opset 17, standard ops: ONNX Runtime and TensorRT) | ort "
                                             "(opset 27 LinearAttention, RMSNormalization, RotaryEmbedding: ONNX "
                                             "Runtime >= 1.32 only; fp32 or weight-only)."),
    calibration_prompts: Optional[Path] = typer.Option(None, help="int8: prompts file (default: the packaged "
                                                                   "calibration prompts)."),
    verify_text: Optional[Path] = typer.Option(None, help="fp16/int8: UTF-8 text the bundle is checked on against "
                                                           "the fp32 model (default: the calibration prompts)."),
    verify: bool = typer.Option(True, help="Check the graphs against the fp32 torch model before writing; a "
                                           "failed check writes no bundle (exit 1)."),
    chained_steps: int = typer.Option(256, help="Greedy steps in the chained verification."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    trust_remote_code: bool = typer.Option(False, help=TRUST_HELP),
) -> None:
    from ..preflight import check_model_and_tokenizer
    from ..teacher import bundled_model_dir

    if out is None:
        fail("pass -o/--out DIR: the folder the bundle is written to (nothing is written anywhere by default)")
    if chained_steps < 1:
        fail(f"--chained-steps must be ≥ 1, got {chained_steps}")
    if precision not in PRECISIONS:
        fail(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if target not in TARGETS:
        fail(f"unknown --target {target!r}; expected one of {', '.join(TARGETS)}")
    if target == "ort" and precision not in ("fp32", *WEIGHT_ONLY_PRECISIONS):
        fail(f"--target ort is built in fp32 or weight-only ({', '.join(WEIGHT_ONLY_PRECISIONS)}), not {precision}; "
             f"use --target plain for {precision}")
    if block_size is not None and precision not in QDQ_WEIGHT_PRECISIONS:
        fail(f"--block-size applies to --precision {', '.join(QDQ_WEIGHT_PRECISIONS)}, not {precision}")
    if block_size is not None and block_size not in QDQ_BLOCK_SIZES:
        fail(f"unknown --block-size {block_size}; int4-qdq blocks are {' or '.join(map(str, QDQ_BLOCK_SIZES))} input "
             "rows (what TensorRT's INT4 weight-only quantization takes)")
    texts = _read_text(verify_text) if verify_text is not None else None
    model = model or bundled_model_dir("t2r")
    with claimed_output(out, force, inputs=[model, tokenizer, calibration_prompts, verify_text],
                        what="bundle directory"):
        try:
            check_model_and_tokenizer(model, tokenizer, need_t2r=True)
            shipped = _check_tokenizer(model, tokenizer, trust_remote_code)
        except ValueError as err:
            fail(str(err))

        from ..export.plans import export_plan
        from ..tolerances import ToleranceError

        try:
            with console.status(f"exporting {model} → {out}") as status, log_to_status(status, "t2r_export"):
                result = export_plan(model, out, precision=precision, verify=verify, chained_steps=chained_steps,
                                     calibration_prompts=calibration_prompts, verify_texts=texts, tokenizer=shipped,
                                     overwrite=force, trust_remote_code=trust_remote_code, progress=status.update,
                                     target=target, block_size=block_size)
        except ToleranceError as err:
            fail(f"verification failed, no bundle written: {err}", code=1)
        except ValueError as err:
            fail(str(err))
    print_bundle(result.out, result.runtime)


def _check_tokenizer(model: Path, tokenizer: Path | None, trust_remote_code: bool):
    """A bundle carries a tokenizer: a damaged or code-running one is refused before any export.

    Returns the ``--tokenizer`` to ship instead of the model's own (None: the model's files are copied).
    """
    from ..data.tokenizer import load_tokenizer
    from ..trust import check_remote_code

    check_remote_code(model, trust_remote_code)
    loaded = load_tokenizer(tokenizer or model, trust_remote_code=trust_remote_code)
    return loaded if tokenizer is not None else None


def _read_text(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        fail(f"--verify-text {path} cannot be read as UTF-8 text: {err}")
    if not text.strip():
        fail(f"--verify-text {path} is empty; give a few lines of text")
    return [text]
