"""One call per precision plan: ``export_plan(model, out, precision)`` writes a verified bundle.

fp32, fp16 and fp16-all come straight from the graph emitter (``export_bundle``). int4 and
int8-wo (weight-only, ``weight_only.py``) and int4-qdq (INT4 blocks behind DequantizeLinear for
TensorRT, ``int4_qdq.py``) are quantized from a verified fp32 bundle the same way. int8 is
calibrated on an fp32 bundle: a verified fp32 bundle is written to a scratch folder beside ``out``,
the int8 bundle is quantized from it and checked against the fp32 torch model, and the scratch
folder is removed whatever happens. Any failed check raises ToleranceError and leaves nothing at
``out`` (docs/design.md#precision-plan).
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path

from .. import contract
from .bundle import ExportResult, check_plan, export_bundle


def export_plan(model_or_dir, out: Path, precision: str = "fp32", verify: bool = True, chained_steps: int = 256,
                calibration_prompts: Path | None = None, verify_texts: list[str] | None = None, tokenizer=None,
                overwrite: bool = True, progress: Callable[[str], None] | None = None,
                trust_remote_code: bool = False, target: str = "plain", block_size: int | None = None) -> ExportResult:
    if precision not in contract.PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(contract.PRECISIONS)}")
    if target not in contract.TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {', '.join(contract.TARGETS)}")
    if target == "ort" and precision in contract.QDQ_WEIGHT_PRECISIONS:
        raise ValueError(f"{precision} is the TensorRT plan (--target plain); for --target ort use int4 "
                         "(MatMulNBits)")
    if target == "ort" and precision not in ("fp32", *contract.WEIGHT_ONLY_PRECISIONS):
        raise ValueError(f"--target ort is built in fp32 or quantized weight-only "
                         f"({', '.join(contract.WEIGHT_ONLY_PRECISIONS)}), not {precision}; use --target plain for "
                         f"{precision}")
    if block_size is not None and precision not in contract.QDQ_WEIGHT_PRECISIONS:
        raise ValueError(f"--block-size applies to {', '.join(contract.QDQ_WEIGHT_PRECISIONS)}, not {precision}")
    if precision in contract.QDQ_WEIGHT_PRECISIONS:
        from .int4_qdq import DEFAULT_BLOCK_SIZE, check_block_size

        block_size = check_block_size(DEFAULT_BLOCK_SIZE if block_size is None else block_size)
    if calibration_prompts is not None and not Path(calibration_prompts).is_file():
        raise ValueError(f"calibration prompts file not found: {calibration_prompts}")
    if precision in (*contract.WEIGHT_ONLY_PRECISIONS, *contract.QDQ_WEIGHT_PRECISIONS):
        return _export_weight_only(model_or_dir, Path(out), precision, verify, chained_steps, verify_texts, tokenizer,
                                   overwrite, progress, trust_remote_code, target, block_size)
    if precision != "int8":
        return export_bundle(model_or_dir, out, precision=precision, verify=verify, chained_steps=chained_steps,
                             tokenizer=tokenizer, overwrite=overwrite, verify_texts=verify_texts,
                             trust_remote_code=trust_remote_code, target=target)
    return _export_int8(model_or_dir, Path(out), verify, chained_steps, calibration_prompts, verify_texts, tokenizer,
                        overwrite, progress, trust_remote_code)


def _export_int8(model_or_dir, out: Path, verify: bool, chained_steps: int, prompts: Path | None,
                 verify_texts: list[str] | None, tokenizer, overwrite: bool, progress,
                 trust_remote_code: bool = False) -> ExportResult:
    from ..models import load_t2r_model
    from .quantize import export_int8_bundle, load_prompts

    model_dir = Path(model_or_dir) if isinstance(model_or_dir, (str, Path)) else None
    model = load_t2r_model(model_dir, trust_remote_code=trust_remote_code) if model_dir is not None else model_or_dir
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.fp32-", dir=out.resolve().parent) as scratch:
        fp32 = export_bundle(model, Path(scratch) / "fp32", verify=verify, chained_steps=chained_steps,
                             tokenizer=tokenizer, model_dir=model_dir)
        texts = verify_texts or load_prompts(prompts)

        def check(folder: Path, runtime: contract.RuntimeConfig) -> contract.VerificationRecord:
            return check_plan(model, folder, runtime, texts)

        int8 = export_int8_bundle(Path(scratch) / "fp32", out, prompts=prompts, overwrite=overwrite,
                                  progress=progress, check=check if verify else None)
    return dataclasses.replace(fp32, out=out, runtime=int8.runtime, report=None)


def _export_weight_only(model_or_dir, out: Path, precision: str, verify: bool, chained_steps: int,
                        verify_texts: list[str] | None, tokenizer, overwrite: bool, progress,
                        trust_remote_code: bool = False, target: str = "plain",
                        block_size: int | None = None) -> ExportResult:
    """int4 / int8-wo / int4-qdq: a verified fp32 bundle in a scratch folder, quantized (weight_only.py,
    int4_qdq.py) and checked against the fp32 model like int8; the scratch folder goes whatever happens."""
    from ..models import load_t2r_model
    from .int4_qdq import export_qdq_bundle
    from .quantize import load_prompts
    from .weight_only import export_weight_only_bundle

    model_dir = Path(model_or_dir) if isinstance(model_or_dir, (str, Path)) else None
    model = load_t2r_model(model_dir, trust_remote_code=trust_remote_code) if model_dir is not None else model_or_dir
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.fp32-", dir=out.resolve().parent) as scratch:
        fp32 = export_bundle(model, Path(scratch) / "fp32", verify=verify, chained_steps=chained_steps,
                             tokenizer=tokenizer, model_dir=model_dir, target=target)
        texts = verify_texts or load_prompts()

        def check(folder: Path, runtime: contract.RuntimeConfig) -> contract.VerificationRecord:
            return check_plan(model, folder, runtime, texts)

        if precision in contract.QDQ_WEIGHT_PRECISIONS:
            runtime = export_qdq_bundle(Path(scratch) / "fp32", out, block_size, overwrite=overwrite,
                                        progress=progress, check=check if verify else None)
        else:
            runtime = export_weight_only_bundle(Path(scratch) / "fp32", out, precision, overwrite=overwrite,
                                                progress=progress, check=check if verify else None)
    return dataclasses.replace(fp32, out=out, runtime=runtime, report=None)
