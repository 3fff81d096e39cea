"""Write a bundle: step.onnx + prefill.onnx + tokenizer + runtime.json, verified, atomically.

    bundle/
      step.onnx        one token per row, explicit fp32 state in and out
      prefill.onnx     T tokens per row, same state tensors
      weights.bin      every weight once, read by both graphs as ONNX external data (+ weights.json, its index)
      tokenizer.json   (+ tokenizer_config.json ...)
      runtime.json     everything a runtime needs, and the versions/hash that made it
"""

from __future__ import annotations

import gc
import hashlib
import logging
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx

from ..atomic import atomic_dir
from ..models import is_t2r_model, load_t2r_model
from .. import contract
from .graph import build_graph, state_shape
from .weight_file import WEIGHTS_FILE, WeightFile, WeightFileError
from .weights import extract_decoder

logger = logging.getLogger(__name__)



def check_plan(model, bundle_dir: Path, runtime: contract.RuntimeConfig,
               texts: list[str] | None = None) -> contract.VerificationRecord:
    """A reduced-precision bundle against the fp32 model; ToleranceError naming each failed figure."""
    from ..tolerances import ToleranceError
    from .plan_check import failures, verify_plan
    from .quantize import load_prompts

    record = verify_plan(model, bundle_dir, runtime, texts or load_prompts())
    if not record.passed:
        raise ToleranceError(f"{runtime.precision} bundle against the fp32 model: {failures(record)}")
    return record


@dataclass
class ExportResult:
    out: Path
    runtime: contract.RuntimeConfig
    report: object | None


def checkpoint_sha256(model_dir: Path | None, model) -> str:
    """sha256 of the safetensors files (sorted), or of the in-memory weights when there is no dir."""
    h = hashlib.sha256()
    files = sorted(Path(model_dir).glob("*.safetensors")) if model_dir else []
    if files:
        for f in files:
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    else:
        for name, tensor in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _tool_versions() -> dict:
    import onnxruntime
    import torch
    import transformers

    from .. import __version__

    return {"t2r_export": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def _save_graph(model_proto: onnx.ModelProto, path: Path) -> None:
    """Save a graph whose weights already live in the weight file: the proto itself stays small,
    so no model size runs into protobuf's 2 GB limit."""
    try:
        onnx.save_model(model_proto, str(path))
    except OSError as err:
        raise WeightFileError(f"writing {path}: {err.strerror or err}") from None
    onnx.checker.check_model(str(path), full_check=True)


def write_graphs(dec, folder: Path, precision: str, target: str = "plain") -> None:
    """step.onnx and prefill.onnx in ``folder``, their weights streamed once into weights.bin."""
    with WeightFile(folder / WEIGHTS_FILE) as store:
        for kind in contract.GRAPH_KINDS:
            store.begin_graph(f"{kind}.onnx")
            graph = build_graph(dec, kind, precision, store, target)
            logger.info("writing and checking %s.onnx", kind)
            _save_graph(graph, folder / f"{kind}.onnx")
            del graph
        store.write_index()


def _copy_tokenizer(model_dir: Path | None, tokenizer, dst: Path) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(dst)
    elif model_dir is not None and (Path(model_dir) / contract.TOKENIZER_JSON).is_file():
        for name in contract.TOKENIZER_FILES:
            if (Path(model_dir) / name).is_file():
                shutil.copy2(Path(model_dir) / name, dst / name)
    else:
        raise ValueError(f"no tokenizer.json beside the model ({model_dir}); a bundle needs a fast tokenizer")


def runtime_config(model, dec, precision: str, sha: str, target: str = "plain") -> contract.RuntimeConfig:
    """The bundle's runtime.json, typed; verification records are added once they ran."""
    cfg = model.config
    shape = state_shape(dec, target)
    state_dtype = contract.STATE_DTYPES[precision]
    graphs = {}
    for kind in contract.GRAPH_KINDS:
        graphs[kind] = contract.GraphEntry(
            file=f"{kind}.onnx",
            inputs=tuple(s.name for s in contract.graph_inputs(shape, kind, state_dtype)),
            outputs=tuple(s.name for s in contract.graph_outputs(shape, kind, state_dtype)))
    eos = cfg.eos_token_id
    return contract.RuntimeConfig(
        architecture=dec.architecture, num_layers=len(dec.layers), hidden_size=int(dec.embed.shape[1]),
        num_heads=dec.num_heads, num_kv_heads=dec.num_kv_heads, head_dim=dec.head_dim,
        feature_map=dec.layers[0].feature_map.kind, feature_dim=dec.feature_dim, vocab_size=dec.vocab_size,
        max_position=None if dec.rope else int(dec.pos_embed.shape[0]), bos_token_id=cfg.bos_token_id,
        eos_token_ids=() if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,),
        pad_token_id=cfg.pad_token_id, precision=precision, state_dtype=state_dtype,
        state_bytes_per_sequence=contract.state_nbytes(shape, state_dtype=state_dtype),
        opset=contract.TARGET_OPSETS[target], target=target, window=dec.window, graphs=graphs,
        tools=_tool_versions(), source_checkpoint_sha256=sha,
        t2r=dict(cfg.t2r))


def export_bundle(model_or_dir, out: Path, precision: str = "fp32", verify: bool = True,
                  chained_steps: int = 256, tokenizer=None, overwrite: bool = True,
                  verify_texts: list[str] | None = None, model_dir: Path | None = None,
                  trust_remote_code: bool = False, target: str = "plain") -> ExportResult:
    """Export a T2R model (object or saved directory) to a verified bundle directory ``out``.

    fp32 is checked against the torch model (batches, chained steps, prefill); fp16 and fp16-all
    against the fp32 torch model teacher-forced on ``verify_texts`` (default: the calibration
    prompts). The bundle is assembled in a temporary sibling directory and renamed into place only
    after every check passed; on failure (ToleranceError) nothing is left at ``out``. ``model_dir``
    names the directory an in-memory model was loaded from (tokenizer, checkpoint hash).
    """
    from .verify import check_bundle_graphs, torch_reference

    if isinstance(model_or_dir, (str, Path)):
        model_dir = Path(model_or_dir)
        model = load_t2r_model(model_dir, trust_remote_code=trust_remote_code)
    else:
        model = model_or_dir
        if not is_t2r_model(model):
            raise ValueError("expected a T2R model (run swap_attention first)")
    model.eval()
    dec = extract_decoder(model)
    if target == "ort":
        from .ort_target import check_ort_target

        check_ort_target(dec)
    runtime = runtime_config(model, dec, precision, checkpoint_sha256(model_dir, model), target)
    num_layers, vocab = len(dec.layers), dec.vocab_size
    report = None
    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        _copy_tokenizer(model_dir, tokenizer, tmp)
        write_graphs(dec, tmp, precision, target)
        # the description reads the weights straight from the model; nothing needs it after writing
        del dec
        if verify and precision == "fp32":
            reference = torch_reference(model, num_layers, vocab, chained_steps=chained_steps, target=target)
            # a model this function loaded is freed before ONNX Runtime maps the weights: the export
            # peaks near one copy of the weights, not two (docs/sizes.md)
            if isinstance(model_or_dir, (str, Path)):
                del model
                gc.collect()
            report = check_bundle_graphs(reference, tmp)
            runtime = runtime.replace(verification=report.record())
        elif verify:
            runtime = runtime.replace(verification=check_plan(model, tmp, runtime, verify_texts))
        (tmp / contract.RUNTIME_JSON).write_text(runtime.to_json())
    logger.info("wrote bundle %s", out)
    return ExportResult(Path(out), runtime, report)
