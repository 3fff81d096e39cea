"""Load a bundle directory and check its runtime.json against the ONNX graphs it ships.

A bundle is what ``t2r-export onnx`` writes: ``step.onnx``, ``prefill.onnx``, ``tokenizer.json``
(+ ``tokenizer_config.json``) and ``runtime.json``. Everything here is torch-free; ``onnx`` is used
when importable, otherwise graph I/O is read from an ONNX Runtime session.

Every problem is a :class:`BundleError` whose message is one line naming the file or the
runtime.json field, what was expected and what was found.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..export import contract

BUNDLE_FORMAT = "t2r-export-bundle"
FORMAT_VERSION = 1
RUNTIME_JSON = "runtime.json"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG_JSON = "tokenizer_config.json"
PRECISIONS = ("fp32", "fp16", "int8")
STATE_DTYPE = "float32"

# runtime.json fields the runtime reads; `tools` and `source_checkpoint_sha256` are informational
REQUIRED_FIELDS = ("format", "format_version", "architecture", "num_layers", "num_heads", "num_kv_heads",
                   "head_dim", "feature_dim", "vocab_size", "max_position", "bos_token_id", "eos_token_id",
                   "pad_token_id", "state_dtype", "precision", "opset", "graphs")

_PAST_RE = re.compile(r"past_state\.(\d+)\.(s|z|wk|wv|wm)")
# which runtime.json field each static axis of a contract tensor reflects
_AXIS_FIELDS = {"s": {1: "num_kv_heads", 2: "feature_dim", 3: "head_dim"},
                "z": {1: "num_kv_heads", 2: "feature_dim"},
                "wk": {1: "num_kv_heads", 2: "window", 3: "head_dim"},
                "wv": {1: "num_kv_heads", 2: "window", 3: "head_dim"},
                "wm": {1: "window"},
                "logits": {1: "vocab_size"}}
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bfloat16)": "bfloat16"}


class BundleError(ValueError):
    """The bundle directory, its runtime.json or one of its graphs is missing, corrupt or inconsistent."""


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output as the graph declares it; dynamic axes are str or None."""

    name: str
    dtype: str
    shape: tuple


@dataclass(frozen=True)
class GraphEntry:
    file: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class RuntimeConfig:
    """The parsed, type-checked runtime.json."""

    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    feature_dim: int
    vocab_size: int
    max_position: int | None       # None: positions are not bounded by a learned table (RoPE)
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    precision: str
    opset: int
    graphs: dict[str, GraphEntry]
    format_version: int = FORMAT_VERSION
    state_dtype: str = STATE_DTYPE
    tools: dict = field(default_factory=dict)
    source_checkpoint_sha256: str | None = None
    state_bytes_per_sequence: int | None = None     # optional; checked once the graph confirmed the shape fields
    window: int = 0                                 # sliding-window keys per layer in the state (0 = none)

    @property
    def state_shape(self) -> contract.StateShape:
        return contract.StateShape(num_layers=self.num_layers, num_kv_heads=self.num_kv_heads,
                                   feature_dim=self.feature_dim, head_dim=self.head_dim,
                                   vocab_size=self.vocab_size, window=self.window)

    @property
    def filler_token_id(self) -> int:
        """The token finished rows keep feeding: pad, else the first eos, else 0."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_token_ids[0] if self.eos_token_ids else 0


@dataclass(frozen=True)
class Bundle:
    path: Path
    config: RuntimeConfig

    def graph_path(self, kind: str) -> Path:
        return self.path / self.config.graphs[kind].file

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_JSON

    def load_tokenizer(self):
        """The bundle's ``tokenizers.Tokenizer``."""
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(self.tokenizer_path))
        except Exception as err:  # tokenizers raises its own Exception type
            raise BundleError(f"{self.tokenizer_path} is not a readable tokenizer: {_first_line(err)}") from None

    def tokenizer_config(self) -> dict:
        path = self.path / TOKENIZER_CONFIG_JSON
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise BundleError(f"{path} is not valid JSON: {err}") from None

    def check_graph_io(self, kind: str, inputs: Sequence[TensorInfo], outputs: Sequence[TensorInfo]) -> None:
        """Raise BundleError when runtime.json contradicts the graph's real inputs/outputs."""
        _check_graph_io(self.config, kind, list(inputs), list(outputs))


def load_bundle(path: str | Path) -> Bundle:
    """Read and type-check ``runtime.json``; check the files it names exist.

    The graphs' I/O is checked by the backend against the session it creates (or by
    :func:`inspect_bundle`), so a large graph is not parsed twice.
    """
    path = Path(path)
    if not path.exists():
        raise BundleError(f"bundle directory {path} does not exist")
    if not path.is_dir():
        raise BundleError(f"bundle {path} is not a directory (expected the directory `t2r-export onnx` wrote)")
    runtime_json = path / RUNTIME_JSON
    if not runtime_json.is_file():
        raise BundleError(f"{runtime_json} is missing; is {path} a bundle written by `t2r-export onnx`?")
    try:
        raw = json.loads(runtime_json.read_text())
    except json.JSONDecodeError as err:
        raise BundleError(f"{runtime_json} is not valid JSON: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise BundleError(f"{runtime_json} cannot be read: {err}") from None
    config = parse_runtime_config(raw)
    for kind, entry in config.graphs.items():
        if not (path / entry.file).is_file():
            raise BundleError(f"runtime.json field 'graphs.{kind}.file' names {entry.file}, "
                              f"which is missing from {path}")
    if not (path / TOKENIZER_JSON).is_file():
        raise BundleError(f"{path / TOKENIZER_JSON} is missing; the bundle needs its tokenizer")
    return Bundle(path=path, config=config)


def inspect_bundle(path: str | Path) -> Bundle:
    """:func:`load_bundle`, then check runtime.json against both graphs (with ``onnx`` when importable)."""
    bundle = load_bundle(path)
    for kind in contract.GRAPH_KINDS:
        inputs, outputs, opset = read_graph_io(bundle.graph_path(kind))
        bundle.check_graph_io(kind, inputs, outputs)
        if opset is not None and opset != bundle.config.opset:
            raise _field_error("opset", bundle.config.opset, f"{bundle.config.graphs[kind].file} imports opset {opset}")
    return bundle


def read_graph_io(graph: Path) -> tuple[list[TensorInfo], list[TensorInfo], int | None]:
    """(inputs, outputs, default-domain opset or None) of an ONNX file, without its external data."""
    try:
        import onnx
    except ImportError:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises several unrelated exception types
            raise BundleError(f"{graph.name} is not a loadable ONNX model: {_first_line(err)}") from None
        inputs, outputs = session_io(session)
        return inputs, outputs, None
    try:
        model = onnx.load(str(graph), load_external_data=False)
    except Exception as err:  # protobuf DecodeError and friends
        raise BundleError(f"{graph.name} is not a readable ONNX model: {_first_line(err)}") from None
    if not model.graph.output:
        raise BundleError(f"{graph.name} is not a readable ONNX model: it has no graph outputs")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return ([_onnx_value_info(v) for v in model.graph.input if v.name not in _initializer_names(model)],
            [_onnx_value_info(v) for v in model.graph.output], opset)


def session_io(session) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """Inputs and outputs of an ``onnxruntime.InferenceSession`` as TensorInfo."""
    def convert(args):
        return [TensorInfo(a.name, _ORT_TYPES.get(a.type, a.type), tuple(a.shape)) for a in args]

    return convert(session.get_inputs()), convert(session.get_outputs())


def parse_runtime_config(raw: Any) -> RuntimeConfig:
    """Type-check a runtime.json document; every problem names its field."""
    if not isinstance(raw, dict):
        raise BundleError(f"runtime.json must hold a JSON object, found {type(raw).__name__}")
    for key in REQUIRED_FIELDS:
        if key not in raw:
            raise BundleError(f"runtime.json is missing field '{key}'")
    if raw["format"] != BUNDLE_FORMAT:
        raise _field_error("format", raw["format"], f"expected {BUNDLE_FORMAT!r}")
    version = _int(raw, "format_version", minimum=1)
    if version != FORMAT_VERSION:
        raise _field_error("format_version", version, f"this runtime reads version {FORMAT_VERSION}; "
                           "re-export the bundle or upgrade t2r-export")
    if not isinstance(raw["architecture"], str) or not raw["architecture"]:
        raise _field_error("architecture", raw["architecture"], "expected a non-empty string")
    num_heads, num_kv_heads = _int(raw, "num_heads", 1), _int(raw, "num_kv_heads", 1)
    if num_heads % num_kv_heads:
        raise _field_error("num_heads", num_heads, f"expected a multiple of num_kv_heads ({num_kv_heads})")
    vocab_size = _int(raw, "vocab_size", 1)
    max_position = None if raw["max_position"] is None else _int(raw, "max_position", 1)
    eos = raw["eos_token_id"]
    eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
    for token in eos_ids:
        _check_token("eos_token_id", token, vocab_size)
    if raw["state_dtype"] != STATE_DTYPE:
        raise _field_error("state_dtype", raw["state_dtype"], f"expected {STATE_DTYPE!r}: the state stays fp32 "
                           "in every precision")
    if raw["precision"] not in PRECISIONS:
        raise _field_error("precision", raw["precision"], f"expected one of {', '.join(PRECISIONS)}")
    tools = raw.get("tools", {})
    if not isinstance(tools, dict):
        raise _field_error("tools", tools, "expected an object of tool versions")
    state_bytes = raw.get("state_bytes_per_sequence")
    if state_bytes is not None:
        state_bytes = _int(raw, "state_bytes_per_sequence", 1)
    window = _int(raw, "window", 0) if "window" in raw else 0
    sha = raw.get("source_checkpoint_sha256")
    if sha is not None and not isinstance(sha, str):
        raise _field_error("source_checkpoint_sha256", sha, "expected a hex string")
    return RuntimeConfig(
        architecture=raw["architecture"], num_layers=_int(raw, "num_layers", 1), num_heads=num_heads,
        num_kv_heads=num_kv_heads, head_dim=_int(raw, "head_dim", 1), feature_dim=_int(raw, "feature_dim", 1),
        vocab_size=vocab_size, max_position=max_position,
        bos_token_id=_check_token("bos_token_id", raw["bos_token_id"], vocab_size, nullable=True),
        eos_token_ids=eos_ids,
        pad_token_id=_check_token("pad_token_id", raw["pad_token_id"], vocab_size, nullable=True),
        precision=raw["precision"], opset=_int(raw, "opset", 1), graphs=_parse_graphs(raw["graphs"]),
        format_version=version, state_dtype=raw["state_dtype"], tools=tools, source_checkpoint_sha256=sha,
        state_bytes_per_sequence=state_bytes, window=window)


def _parse_graphs(graphs: Any) -> dict[str, GraphEntry]:
    if not isinstance(graphs, dict):
        raise _field_error("graphs", graphs, "expected an object with 'step' and 'prefill'")
    parsed = {}
    for kind in contract.GRAPH_KINDS:
        entry = graphs.get(kind)
        if not isinstance(entry, dict):
            raise BundleError(f"runtime.json is missing field 'graphs.{kind}'")
        for key in ("file", "inputs", "outputs"):
            if key not in entry:
                raise BundleError(f"runtime.json is missing field 'graphs.{kind}.{key}'")
        if not isinstance(entry["file"], str) or not entry["file"] or Path(entry["file"]).is_absolute():
            raise _field_error(f"graphs.{kind}.file", entry["file"], "expected a file name inside the bundle")
        for key in ("inputs", "outputs"):
            names = entry[key]
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise _field_error(f"graphs.{kind}.{key}", names, "expected a list of tensor names")
        parsed[kind] = GraphEntry(entry["file"], tuple(entry["inputs"]), tuple(entry["outputs"]))
    return parsed


def _check_graph_io(config: RuntimeConfig, kind: str, inputs: list[TensorInfo], outputs: list[TensorInfo]) -> None:
    entry = config.graphs[kind]
    layers = {int(m.group(1)) for t in inputs if (m := _PAST_RE.fullmatch(t.name))}
    graph_layers = max(layers) + 1 if layers else 0
    if graph_layers != config.num_layers:
        raise _field_error("num_layers", config.num_layers,
                           f"{entry.file} has state inputs for {graph_layers} layers")
    for direction, listed, real in (("inputs", entry.inputs, inputs), ("outputs", entry.outputs, outputs)):
        real_names = {t.name for t in real}
        if set(listed) != real_names:
            raise BundleError(f"runtime.json field 'graphs.{kind}.{direction}' does not match {entry.file}: it lists "
                              f"{sorted(set(listed) - real_names)} that the graph lacks and omits "
                              f"{sorted(real_names - set(listed))} that the graph has")
    shape = config.state_shape
    for direction, specs, real in (("input", contract.graph_inputs(shape, kind), inputs),
                                   ("output", contract.graph_outputs(shape, kind), outputs)):
        by_name = {t.name: t for t in real}
        missing = [s.name for s in specs if s.name not in by_name]
        extra = sorted(set(by_name) - {s.name for s in specs})
        if missing or extra:
            raise BundleError(f"{entry.file} does not follow the graph contract: missing {direction}s {missing}, "
                              f"unexpected {direction}s {extra}")
        for spec in specs:
            _check_tensor(config, entry.file, direction, spec, by_name[spec.name])
    expected_bytes = contract.state_nbytes(shape)
    if config.state_bytes_per_sequence is not None and config.state_bytes_per_sequence != expected_bytes:
        raise _field_error("state_bytes_per_sequence", config.state_bytes_per_sequence,
                           f"{entry.file}'s state tensors hold {expected_bytes} bytes per sequence")


def _check_tensor(config: RuntimeConfig, file: str, direction: str, spec: contract.TensorSpec,
                  found: TensorInfo) -> None:
    part = "logits" if spec.name == "logits" else spec.name.rsplit(".", 1)[-1]
    if found.dtype != spec.dtype:
        if "state" in spec.name:
            raise _field_error("state_dtype", config.state_dtype, f"{file} {direction} '{spec.name}' is {found.dtype}")
        raise BundleError(f"{file} {direction} '{spec.name}' is {found.dtype}, expected {spec.dtype}")
    if len(found.shape) != len(spec.shape):
        raise BundleError(f"{file} {direction} '{spec.name}' has shape {_fmt(found.shape)}, "
                          f"expected {_fmt(spec.shape)}")
    for axis, (want, got) in enumerate(zip(spec.shape, found.shape)):
        if isinstance(want, int) and isinstance(got, int) and want != got:
            name = _AXIS_FIELDS.get(part, {}).get(axis)
            if name is None:
                raise BundleError(f"{file} {direction} '{spec.name}' has shape {_fmt(found.shape)}, "
                                  f"expected {_fmt(spec.shape)}")
            raise _field_error(name, getattr(config, name), f"{file} {direction} '{spec.name}' has shape "
                               f"{_fmt(found.shape)}, so {name} is {got}")


def _int(raw: dict, key: str, minimum: int) -> int:
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _field_error(key, value, f"expected an integer >= {minimum}")
    return value


def _check_token(key: str, value: Any, vocab_size: int, nullable: bool = False) -> int | None:
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        raise _field_error(key, value, f"expected a token id in [0, {vocab_size}) (vocab_size {vocab_size})")
    return value


def _field_error(key: str, value: Any, why: str) -> BundleError:
    return BundleError(f"runtime.json field '{key}' = {json.dumps(value)} is wrong: {why}")


def _fmt(shape: Sequence) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]


def _initializer_names(model) -> set[str]:
    return {init.name for init in model.graph.initializer}


def _onnx_value_info(value) -> TensorInfo:
    from onnx import helper

    tensor = value.type.tensor_type
    try:
        dtype = str(helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    except (KeyError, ValueError):
        dtype = f"onnx-type-{tensor.elem_type}"
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)
    return TensorInfo(value.name, dtype, dims)
