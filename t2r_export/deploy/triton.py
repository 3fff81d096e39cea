"""A Triton Inference Server model repository for a bundle (`t2r-export triton BUNDLE -o REPO`).

    REPO/t2r_step/config.pbtxt      the step graph behind Triton's sequence batcher, implicit state
    REPO/t2r_step/1/model.onnx      (+ weights.bin)  or  model.plan with --backend tensorrt
    REPO/t2r_prefill/...            the prefill graph as a stateless model (state in and out)
    REPO/client_example.py          a tritonclient session: sequence id, start and end flags
    REPO/README.md                  what is where, and what was not checked

The step model keeps every ``past_state.*`` / ``present_state.*`` pair of the contract as Triton
implicit state, zero at a sequence's start: a client sends one token per request with its sequence
id, Triton routes each sequence to its state slot and batches the sequences of one step together.
Triton keeps implicit state per model instance and starts it only from zeros (or a file), so the
prefill model cannot hand its state to the step model: it is a stateless model for clients that
carry the state themselves, and a prompt sent to the step model goes through one token per request.

Triton matches implicit-state tensors by name, and a name that is a prefix of another (``state``
and ``state_1``) is mishandled by some Triton releases: :func:`check_state_names` refuses such a
repository in one line. The Triton server itself is not run by the tests (they parse the written
configs with Triton's own ``model_config_pb2``); see docs/deploy.md.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .. import contract

BACKENDS = ("onnxruntime", "tensorrt")
STEP_MODEL = "t2r_step"
PREFILL_MODEL = "t2r_prefill"
_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}


class TritonError(ValueError):
    """The repository cannot be written for this bundle; one line."""


def check_state_names(names) -> None:
    """Refuse state names of which one is a prefix of another (a Triton implicit-state bug)."""
    names = sorted(names)
    for index, name in enumerate(names):
        for other in names[index + 1:]:
            if other.startswith(name):
                raise TritonError(f"state tensor {name!r} is a prefix of {other!r}; Triton's implicit state "
                                  "confuses such names, so this bundle cannot be served with implicit state")


def _dims(shape) -> str:
    return "[ " + ", ".join("-1" if not isinstance(d, int) else str(d) for d in shape) + " ]"


def _tensor(spec, drop_batch: bool = True) -> str:
    shape = spec.shape[1:] if drop_batch else spec.shape
    return f'  {{ name: "{spec.name}" data_type: {_TYPES[spec.dtype]} dims: {_dims(shape)} }}'


def step_config(config, backend: str, max_batch: int, idle_seconds: int = 600, device: str = "gpu") -> str:
    """config.pbtxt of the step model: sequence batcher, one implicit state per contract pair."""
    inputs, outputs = config.graph_specs(contract.STEP)
    plain_in = [s for s in inputs if not contract.is_state(s.name)]
    plain_out = [s for s in outputs if not contract.is_state(s.name)]
    by_name = {s.name: s for s in inputs}
    pairs = contract.state_pairs(config.num_layers, config.state_shape.parts)
    check_state_names([name for pair in pairs for name in pair])
    states = []
    for past, present in pairs:
        spec = by_name[past]
        dims, dtype = _dims(spec.shape[1:]), _TYPES[spec.dtype]
        states.append(f'    {{\n      input_name: "{past}"\n      output_name: "{present}"\n'
                      f'      data_type: {dtype}\n      dims: {dims}\n'
                      f'      initial_state: {{ name: "zero" data_type: {dtype} dims: {dims} zero_data: true }}\n'
                      "    }")
    return _model_config(STEP_MODEL, backend, max_batch, plain_in, plain_out, device, [
        "sequence_batching {",
        f"  max_sequence_idle_microseconds: {idle_seconds * 1_000_000}",
        "  oldest {",
        f"    max_candidate_sequences: {max_batch * 4}",
        f"    preferred_batch_size: [ {max_batch} ]",
        "    max_queue_delay_microseconds: 1000",
        "  }",
        "  state [", ",\n".join(states), "  ]",
        "}",
    ])


def prefill_config(config, backend: str, max_batch: int, device: str = "gpu") -> str:
    """config.pbtxt of the stateless prefill model: ids, positions and state in; logits and state out."""
    inputs, outputs = config.graph_specs(contract.PREFILL)
    return _model_config(PREFILL_MODEL, backend, max_batch, inputs, outputs, device)


def _model_config(name: str, backend: str, max_batch: int, inputs, outputs, device: str,
                  batching: list[str] = ()) -> str:
    """A config.pbtxt: name, backend, batch size, plain inputs and outputs, then ``batching``, one instance."""
    return "\n".join([
        f'name: "{name}"',
        f'backend: "{backend}"',
        f"max_batch_size: {max_batch}",
        "input [", ",\n".join(_tensor(s) for s in inputs), "]",
        "output [", ",\n".join(_tensor(s) for s in outputs), "]",
        *batching,
        f"instance_group [ {{ kind: KIND_{device.upper()} count: 1 }} ]",
        "",
    ])


def _place(source: Path, target: Path) -> None:
    """A hard link where the file system allows it (a large weight file is not copied), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def write_repository(bundle, out: Path, backend: str = "onnxruntime", max_batch: int = 64,
                     device: str = "gpu") -> list[str]:
    """Write the repository into the (empty, temporary) folder ``out``; returns notes for the user."""
    if backend not in BACKENDS:
        raise TritonError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if max_batch < 1:
        raise TritonError(f"--max-batch must be >= 1, got {max_batch}")
    if device not in ("gpu", "cpu") or (device == "cpu" and backend == "tensorrt"):
        raise TritonError(f"--device {device!r} is not possible with the {backend} backend; expected gpu"
                          f"{' or cpu' if backend == 'onnxruntime' else ''}")
    config = bundle.config
    notes = []
    step_cfg = step_config(config, backend, max_batch, device=device)
    for model, kind, text in ((STEP_MODEL, contract.STEP, step_cfg),
                              (PREFILL_MODEL, contract.PREFILL, prefill_config(config, backend, max_batch, device))):
        version = out / model / "1"
        version.mkdir(parents=True)
        (out / model / "config.pbtxt").write_text(text)
        if backend == "onnxruntime":
            _place(bundle.graph_path(kind), version / "model.onnx")
            for data in _external_files(bundle, kind):
                _place(bundle.file(data), version / data)
        else:
            engine = bundle.path / "engines" / f"{kind}.{config.precision}.plan"
            if engine.is_file():
                _place(bundle.file(f"engines/{kind}.{config.precision}.plan"), version / "model.plan")
            else:
                notes.append(f"{model}/1/model.plan is missing: build it on the serving GPU with the TensorRT of "
                             f"your Triton release (see README.md in the repository)")
    # the template is a data file: it is the user's script, not a module of this package
    template = (Path(__file__).with_name("client_example.py.in")).read_text()
    (out / "client_example.py").write_text(template.replace("@VOCAB@", str(config.vocab_size)))
    (out / "README.md").write_text(_readme(config, backend, max_batch))
    return notes


def _external_files(bundle, kind: str) -> list[str]:
    from ..runtime.onnx_scan import scan_onnx

    return sorted({location for _, location in scan_onnx(bundle.graph_path(kind)).external})


def _readme(config, backend: str, max_batch: int) -> str:
    engine_note = "" if backend == "onnxruntime" else (
        "\nWith the TensorRT backend each `1/model.plan` must be an engine built on the serving GPU by the\n"
        "TensorRT release of your Triton image, e.g.\n\n"
        "    trtexec --onnx=step.onnx --saveEngine=t2r_step/1/model.plan \\\n"
        f"        --minShapes=input_ids:1x1,position_ids:1x1 --maxShapes=input_ids:{max_batch}x1,"
        f"position_ids:{max_batch}x1 (and the same batch range for every past_state.* input)\n")
    return f"""# Triton model repository written by `t2r-export triton`

    tritonserver --model-repository=$PWD
    python client_example.py --url localhost:8001

- `{STEP_MODEL}`: the step graph behind the sequence batcher, `{len(config.graph_specs('step')[0]) - 2}` implicit
  state tensors (every `past_state.*` / `present_state.*` pair), zero at a sequence's start, up to
  {max_batch} sequences per batch. Send one token per request with `sequence_id`, `sequence_start` on the
  first request and `sequence_end` on the last (that frees the state slot).
- `{PREFILL_MODEL}`: the prefill graph, stateless (state in, state out): Triton's implicit state of
  one model cannot be filled from another model's output, so prompts sent to `{STEP_MODEL}` go
  through one token per request.
{engine_note}
The configs were checked against Triton's own schema (`tritonclient`'s model_config_pb2) and the
graphs' inputs and outputs when they were written; the Triton server itself was not run.
"""
