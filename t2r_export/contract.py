"""The bundle format, owned here and nowhere else: graph I/O, precisions, runtime.json.

Everything a bundle's writer (``t2r-export onnx``) and its readers (the ONNX Runtime and TensorRT
runtimes, ``check``, ``trt``, the quantizer, the bench, ``info``) must agree on lives in this
module: the names, dtypes and shapes of the step and prefill graphs' inputs and outputs, the
precision plans and the state dtype each one has, the graph metadata keys, the tokenizer files, the
format name and version, and :class:`RuntimeConfig`, the typed runtime.json. It imports nothing
of the package and no torch, so the decode runtime uses it on devices without torch. See
docs/design.md#graph-contract.

Step graph:    input_ids int64 [B, 1], position_ids int64 [B, 1], past_state.{i}.{part}
Prefill graph: input_ids int64 [B, T], position_ids int64 [B, T], past_state.{i}.{part}
Both return:   logits float32 [B, V] (last position only), present_state.{i}.{part}
State parts:   s [B, H_kv, K, Dv], z [B, H_kv, K] per layer, no sequence axis; with a sliding
               window W > 0 (runtime.json ``window``) also wk, wv [B, H_kv, W, Dv] and wm [B, W].

``python -m t2r_export.contract OUT.md`` writes the graph-contract page (graphs/README.md).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

FORMAT = "t2r-export-bundle"
# 2: typed verification record, precision-dependent state_dtype
FORMAT_VERSION = 2
RUNTIME_JSON = "runtime.json"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG_JSON = "tokenizer_config.json"
# what a bundle copies from the model folder beside its graphs; tokenizer.json is required
TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG_JSON, "special_tokens_map.json", "generation_config.json")

STEP = "step"
PREFILL = "prefill"
GRAPH_KINDS = (STEP, PREFILL)
BATCH = "batch"
SEQUENCE = "sequence"
OPSET = 17
# graph targets (docs/design.md#targets): "plain" is opset 17 with standard ops only, the TensorRT
# target and the default; "ort" uses ONNX's LLM ops (RMSNormalization and RotaryEmbedding from
# opset 23, LinearAttention from opset 27) that ONNX Runtime runs as single kernels
TARGETS = ("plain", "ort")
TARGET_OPSETS = {"plain": OPSET, "ort": 27}

# precision plans (docs/design.md#precision-plan); the state stays fp32 except in fp16-all, the
# deliberately unsafe plan kept to show why the state must not be fp16
PRECISIONS = ("fp32", "fp16", "fp16-all", "int8", "int4", "int8-wo", "int4-qdq")
STATE_DTYPES = {"fp32": "float32", "fp16": "float32", "fp16-all": "float16", "int8": "float32", "int4": "float32",
                "int8-wo": "float32", "int4-qdq": "float32"}
# weight-only plans: ONNX Runtime's MatMulNBits (a contrib op), so no TensorRT engine is built from them
WEIGHT_ONLY_PRECISIONS = ("int4", "int8-wo")
# weight-only for TensorRT: INT4 weight blocks behind a standard DequantizeLinear, plain target only;
# INT4 and the DequantizeLinear block_size attribute need opset 21 (docs/design.md#precision-plan)
QDQ_WEIGHT_PRECISIONS = ("int4-qdq",)
QDQ_WEIGHT_OPSET = 21
# input rows per INT4 block: TensorRT's INT4 weight-only quantization takes 64 or 128
QDQ_BLOCK_SIZES = (64, 128)
# graph metadata: the plan a graph was built for, and the nodes that must run in fp32 whatever the plan
PRECISION_KEY = "t2r.precision"
ISLAND_KEY = "t2r.fp32_island"
_ITEMSIZE = {"float32": 4, "float16": 2}
# the feature maps a graph may be built with (docs/design.md#feature-maps)
FEATURE_MAPS = ("t2r", "hedgehog", "elu", "rfa")


class BundleError(ValueError):
    """The bundle directory, its runtime.json or one of its graphs is missing, corrupt or inconsistent."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                     # numpy dtype name
    shape: tuple                   # ints, or a str naming a dynamic axis
    doc: str


@dataclass(frozen=True)
class StatePart:
    """One state tensor per layer: its name and the StateShape fields of its axes after the batch."""

    name: str
    axes: tuple[str, ...]
    doc: str


# more parts extend these tables and StateShape, nothing else
STATE_PARTS = (
    StatePart("s", ("num_kv_heads", "feature_dim", "head_dim"), "sum of phi(k) v^T"),
    StatePart("z", ("num_kv_heads", "feature_dim"), "sum of phi(k)"),
)
# the sliding-window hybrid (docs/design.md): the last W keys and values stay exact, so the state
# stays fixed in size; s and z then sum only the keys that left the window
WINDOW_PARTS = (
    StatePart("wk", ("num_kv_heads", "window", "head_dim"), "the last W keys after RoPE, oldest first"),
    StatePart("wv", ("num_kv_heads", "window", "head_dim"), "the last W values, oldest first"),
    StatePart("wm", ("window",), "1.0 where a window slot holds a key, 0.0 while empty"),
)


# the ort target: LinearAttention keeps one [d_k, d_v] state per KV head; T2R's normalised attention
# runs through it with a constant-1 channel appended to v, so the last column of that state is z
ORT_STATE_PARTS = (
    StatePart("sz", ("num_kv_heads", "feature_dim", "value_width"), "sum of phi(k) [v, 1]^T: s, with z as its last "
              "column"),
)


def state_parts(window: int | str = 0, target: str = "plain") -> tuple[StatePart, ...]:
    """One layer's state parts, in graph order: s, z, and the window's with W > 0; sz for the ort target."""
    if target == "ort":
        return ORT_STATE_PARTS
    return STATE_PARTS + WINDOW_PARTS if window else STATE_PARTS


@dataclass(frozen=True)
class StateShape:
    num_layers: int
    num_kv_heads: int
    feature_dim: int
    head_dim: int
    vocab_size: int
    # keys and values per layer in the sliding window (0 = none, the paper's T2R)
    window: int = 0
    # None: the parts of the window and the target (state_parts)
    parts: tuple[StatePart, ...] | None = None
    target: str = "plain"

    def __post_init__(self):
        if self.parts is None:
            object.__setattr__(self, "parts", state_parts(self.window, self.target))

    @property
    def value_width(self):
        """Dv + 1: v with the constant-1 channel (the ort target's state)."""
        return self.head_dim + 1 if isinstance(self.head_dim, int) else f"{self.head_dim}+1"

    def part_shape(self, part: StatePart) -> tuple:
        return tuple(getattr(self, axis) for axis in part.axes)


def past_name(layer: int, part: str) -> str:
    return f"past_state.{layer}.{part}"


def present_name(layer: int, part: str) -> str:
    return f"present_state.{layer}.{part}"


def is_state(name: str) -> bool:
    return name.startswith(("past_state.", "present_state."))


def _state_specs(shape: StateShape, name_fn, verb: str, state_dtype: str) -> list[TensorSpec]:
    return [TensorSpec(name_fn(i, part.name), state_dtype, (BATCH, *shape.part_shape(part)),
                       f"layer {i} {verb} {part.doc}")
            for i in range(shape.num_layers) for part in shape.parts]


def _check_kind(kind: str) -> None:
    if kind not in GRAPH_KINDS:
        raise ValueError(f"unknown graph kind {kind!r}; expected one of {GRAPH_KINDS}")


def graph_inputs(shape: StateShape, kind: str = STEP, state_dtype: str = "float32") -> list[TensorSpec]:
    _check_kind(kind)
    t = 1 if kind == STEP else SEQUENCE
    return [
        TensorSpec("input_ids", "int64", (BATCH, t), "token ids"),
        TensorSpec("position_ids", "int64", (BATCH, t), "absolute positions of those tokens"),
        *_state_specs(shape, past_name, "state before these tokens:", state_dtype),
    ]


def graph_outputs(shape: StateShape, kind: str = STEP, state_dtype: str = "float32") -> list[TensorSpec]:
    _check_kind(kind)
    return [
        TensorSpec("logits", "float32", (BATCH, shape.vocab_size), "next-token logits after the last input token"),
        *_state_specs(shape, present_name, "state after these tokens:", state_dtype),
    ]


def state_pairs(num_layers: int, parts: tuple[StatePart, ...] = STATE_PARTS) -> list[tuple[str, str]]:
    """(past name, present name) for every state tensor, in graph order; pass ``StateShape.parts``."""
    return [(past_name(i, p.name), present_name(i, p.name)) for i in range(num_layers) for p in parts]


def state_nbytes(shape: StateShape, batch: int = 1, state_dtype: str = "float32") -> int:
    per_layer = sum(math.prod(shape.part_shape(part)) for part in shape.parts)
    return _ITEMSIZE[state_dtype] * batch * shape.num_layers * per_layer


# ---- runtime.json ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class GraphEntry:
    file: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Figure:
    """One verified figure: its value, the tolerance or goal it is held to, and whether it held."""

    name: str
    value: float
    tolerance: float
    passed: bool
    # "max": value must be <= tolerance; "min": value must be >= tolerance (agreement rates)
    bound: str = "max"


@dataclass(frozen=True)
class VerificationRecord:
    """What the export checked before writing the bundle, and against what reference."""

    reference: str
    passed: bool
    greedy_identical: bool | None
    figures: tuple[Figure, ...]


@dataclass(frozen=True)
class RuntimeConfig:
    """runtime.json, typed. Build it in the exporter, read it with :meth:`from_json` everywhere else."""

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
    graphs: dict[str, GraphEntry]
    opset: int = OPSET
    format_version: int = FORMAT_VERSION
    state_dtype: str | None = None           # None: the precision's (STATE_DTYPES)
    hidden_size: int | None = None
    feature_map: str | None = None
    # sliding-window keys per layer in the state (0 = none)
    window: int = 0
    tools: dict = field(default_factory=dict)
    source_checkpoint_sha256: str | None = None
    state_bytes_per_sequence: int | None = None
    t2r: dict = field(default_factory=dict)
    verification: VerificationRecord | None = None
    quantization: dict | None = None
    target: str = "plain"

    def __post_init__(self):
        if self.state_dtype is None and self.precision in STATE_DTYPES:
            object.__setattr__(self, "state_dtype", STATE_DTYPES[self.precision])

    @property
    def state_shape(self) -> StateShape:
        return StateShape(num_layers=self.num_layers, num_kv_heads=self.num_kv_heads, feature_dim=self.feature_dim,
                          head_dim=self.head_dim, vocab_size=self.vocab_size, window=self.window,
                          target=self.target)

    @property
    def filler_token_id(self) -> int:
        """The token finished rows keep feeding: pad, else the first eos, else 0."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_token_ids[0] if self.eos_token_ids else 0

    def graph_specs(self, kind: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """The (inputs, outputs) this config's graphs must have."""
        return (graph_inputs(self.state_shape, kind, self.state_dtype),
                graph_outputs(self.state_shape, kind, self.state_dtype))

    def replace(self, **changes) -> RuntimeConfig:
        from dataclasses import replace

        return replace(self, **changes)

    # -- serialisation ---------------------------------------------------------------------------

    def to_dict(self) -> dict:
        eos = list(self.eos_token_ids)
        raw = {"format": FORMAT, "format_version": self.format_version}
        for f in fields(self):
            if f.name in ("format_version", "eos_token_ids", "graphs", "verification"):
                continue
            raw[f.name] = getattr(self, f.name)
        raw["eos_token_id"] = None if not eos else eos[0] if len(eos) == 1 else eos
        raw["graphs"] = {kind: {"file": g.file, "inputs": list(g.inputs), "outputs": list(g.outputs)}
                         for kind, g in self.graphs.items()}
        if self.verification is not None:
            v = self.verification
            raw["verification"] = {"reference": v.reference, "passed": v.passed,
                                   "greedy_identical": v.greedy_identical,
                                   "figures": [vars(f) for f in v.figures]}
        return {k: v for k, v in raw.items() if v is not None or k in _NULLABLE}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> RuntimeConfig:
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BundleError(f"{RUNTIME_JSON} is not valid JSON: {err}") from None
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: Any) -> RuntimeConfig:
        """Type-check a runtime.json document; every problem is one line naming its field."""
        return _parse(raw)

    @classmethod
    def read(cls, path: str | Path) -> RuntimeConfig:
        path = Path(path)
        try:
            text = path.read_bytes()
        except OSError as err:
            raise BundleError(f"{path} cannot be read: {err.strerror or err}") from None
        return cls.from_json(text)


_NULLABLE = ("max_position", "bos_token_id", "eos_token_id", "pad_token_id")
# runtime.json fields a reader needs; the rest (tools, provenance, records) are informational
REQUIRED_FIELDS = ("format", "format_version", "architecture", "num_layers", "num_heads", "num_kv_heads",
                   "head_dim", "feature_dim", "vocab_size", "max_position", "bos_token_id", "eos_token_id",
                   "pad_token_id", "state_dtype", "precision", "opset", "graphs")


def field_error(key: str, value: Any, why: str) -> BundleError:
    return BundleError(f"runtime.json field '{key}' = {json.dumps(value, default=str)[:120]} is wrong: {why}")


def _parse(raw: Any) -> RuntimeConfig:
    if not isinstance(raw, dict):
        raise BundleError(f"{RUNTIME_JSON} must hold a JSON object, found {type(raw).__name__}")
    if "format" not in raw:
        raise BundleError(f"{RUNTIME_JSON} is missing field 'format'")
    if raw["format"] != FORMAT:
        raise field_error("format", raw["format"], f"expected {FORMAT!r}")
    if "format_version" not in raw:
        raise BundleError(f"{RUNTIME_JSON} is missing field 'format_version'")
    version = _int(raw, "format_version", 1)
    if version != FORMAT_VERSION:
        age = "an older" if version < FORMAT_VERSION else "a newer"
        raise BundleError(f"{RUNTIME_JSON} field 'format_version' = {json.dumps(version)} is {age} bundle format "
                          f"than this t2r-export reads ({FORMAT_VERSION}); re-export the bundle with "
                          "`t2r-export onnx`")
    for key in REQUIRED_FIELDS:
        if key not in raw:
            raise BundleError(f"{RUNTIME_JSON} is missing field '{key}'")
    if not isinstance(raw["architecture"], str) or not raw["architecture"]:
        raise field_error("architecture", raw["architecture"], "expected a non-empty string")
    num_heads, num_kv_heads = _int(raw, "num_heads", 1), _int(raw, "num_kv_heads", 1)
    if num_heads % num_kv_heads:
        raise field_error("num_heads", num_heads, f"expected a multiple of num_kv_heads ({num_kv_heads})")
    vocab_size = _int(raw, "vocab_size", 1)
    max_position = None if raw["max_position"] is None else _int(raw, "max_position", 1)
    eos = raw["eos_token_id"]
    eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
    for token in eos_ids:
        _token("eos_token_id", token, vocab_size)
    precision = raw["precision"]
    if precision not in PRECISIONS:
        raise field_error("precision", precision, f"expected one of {', '.join(PRECISIONS)}")
    if raw["state_dtype"] != STATE_DTYPES[precision]:
        raise field_error("state_dtype", raw["state_dtype"],
                          f"a {precision} bundle keeps its state in {STATE_DTYPES[precision]}")
    tools = raw.get("tools", {})
    if not isinstance(tools, dict):
        raise field_error("tools", tools, "expected an object of tool versions")
    optional = {"state_bytes_per_sequence": lambda key: _int(raw, key, 1),
                "hidden_size": lambda key: _int(raw, key, 1), "source_checkpoint_sha256": lambda key: _str(raw, key),
                "feature_map": lambda key: _choice(raw, key, FEATURE_MAPS),
                "target": lambda key: _choice(raw, key, TARGETS),
                "window": lambda key: _window(raw, key),
                "t2r": lambda key: _obj(raw, key), "quantization": lambda key: _obj(raw, key),
                "verification": lambda key: _verification(raw[key])}
    extra = {key: parse(key) for key, parse in optional.items() if raw.get(key) is not None}
    return RuntimeConfig(
        architecture=raw["architecture"], num_layers=_int(raw, "num_layers", 1), num_heads=num_heads,
        num_kv_heads=num_kv_heads, head_dim=_int(raw, "head_dim", 1), feature_dim=_int(raw, "feature_dim", 1),
        vocab_size=vocab_size, max_position=max_position,
        bos_token_id=_token("bos_token_id", raw["bos_token_id"], vocab_size, nullable=True),
        eos_token_ids=eos_ids,
        pad_token_id=_token("pad_token_id", raw["pad_token_id"], vocab_size, nullable=True),
        precision=precision, opset=_int(raw, "opset", 1), graphs=_graphs(raw["graphs"]),
        format_version=version, state_dtype=raw["state_dtype"], tools=tools, **extra)


def _graphs(graphs: Any) -> dict[str, GraphEntry]:
    if not isinstance(graphs, dict):
        raise field_error("graphs", graphs, "expected an object with 'step' and 'prefill'")
    parsed = {}
    for kind in GRAPH_KINDS:
        entry = graphs.get(kind)
        if not isinstance(entry, dict):
            raise BundleError(f"{RUNTIME_JSON} is missing field 'graphs.{kind}'")
        for key in ("file", "inputs", "outputs"):
            if key not in entry:
                raise BundleError(f"{RUNTIME_JSON} is missing field 'graphs.{kind}.{key}'")
        if not isinstance(entry["file"], str) or not entry["file"]:
            raise field_error(f"graphs.{kind}.file", entry["file"], "expected a file name inside the bundle")
        for key in ("inputs", "outputs"):
            names = entry[key]
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise field_error(f"graphs.{kind}.{key}", names, "expected a list of tensor names")
        parsed[kind] = GraphEntry(entry["file"], tuple(entry["inputs"]), tuple(entry["outputs"]))
    return parsed


def _verification(raw: Any) -> VerificationRecord:
    key = "verification"
    if not isinstance(raw, dict) or not isinstance(raw.get("figures"), list):
        raise field_error(key, raw, "expected an object with 'reference', 'passed' and a list of 'figures'")
    if not isinstance(raw.get("reference"), str) or not isinstance(raw.get("passed"), bool):
        raise field_error(key, raw, "expected 'reference' (a string) and 'passed' (true or false)")
    greedy = raw.get("greedy_identical")
    if greedy is not None and not isinstance(greedy, bool):
        raise field_error(f"{key}.greedy_identical", greedy, "expected true, false or null")
    figures = []
    for i, fig in enumerate(raw["figures"]):
        ok = (isinstance(fig, dict) and isinstance(fig.get("name"), str) and isinstance(fig.get("passed"), bool)
              and all(_is_number(fig.get(k)) for k in ("value", "tolerance")) and fig.get("bound", "max")
              in ("max", "min"))
        if not ok:
            raise field_error(f"{key}.figures[{i}]", fig, "expected name, value, tolerance, passed and bound "
                              "(max or min)")
        figures.append(Figure(fig["name"], float(fig["value"]), float(fig["tolerance"]), fig["passed"],
                              fig.get("bound", "max")))
    return VerificationRecord(raw["reference"], raw["passed"], greedy, tuple(figures))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(raw: dict, key: str, minimum: int) -> int:
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise field_error(key, value, f"expected an integer >= {minimum}")
    return value


def _choice(raw: dict, key: str, allowed: tuple[str, ...]) -> str:
    if raw[key] not in allowed:
        raise field_error(key, raw[key], f"expected one of {', '.join(allowed)}")
    return raw[key]


def _window(raw: dict, key: str) -> int:
    window = _int(raw, key, 0)
    bound = raw.get("max_position")
    if isinstance(bound, int) and window > bound:
        raise field_error(key, window, f"expected at most max_position ({bound})")
    return window


def _str(raw: dict, key: str) -> str:
    if not isinstance(raw[key], str):
        raise field_error(key, raw[key], "expected a string")
    return raw[key]


def _obj(raw: dict, key: str) -> dict:
    if not isinstance(raw[key], dict):
        raise field_error(key, raw[key], "expected a JSON object")
    return raw[key]


def _token(key: str, value: Any, vocab_size: int, nullable: bool = False) -> int | None:
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        raise field_error(key, value, f"expected a token id in [0, {vocab_size}) (vocab_size {vocab_size})")
    return value


# ---- the contract page ----------------------------------------------------------------------------

def render_markdown(example: StateShape | None = None) -> str:
    """The text of graphs/README.md (a test fails when the committed file differs)."""
    example = example or StateShape(num_layers=2, num_kv_heads="H_kv", feature_dim="K", head_dim="Dv",
                                    vocab_size="V")
    plans = ", ".join(f"{p} → {STATE_DTYPES[p]}" for p in PRECISIONS)
    lines = [
        "# The exported graph contract",
        "",
        "<!-- generated by `python -m t2r_export.contract graphs/README.md` from t2r_export/contract.py; "
        "do not edit -->",
        "",
        "A bundle holds two ONNX graphs with the same state tensors. The prompt goes through",
        "`prefill.onnx` in one call; decoding continues one token at a time with `step.onnx`,",
        "feeding each `present_state.*` back as the next `past_state.*`. The state has no sequence",
        "axis: memory is the same at token 10 and token 100,000. State tensors are float32 in every",
        "precision plan except `fp16-all`, the unsafe plan kept to show why",
        f"(precision → state dtype: {plans}). Opset {OPSET}; plain ONNX ops only (no ONNX Runtime",
        "contrib ops; the weight-only plans' MatMulNBits is ONNX Runtime only), so the same files parse",
        f"in TensorRT; `int4-qdq` moves to opset {QDQ_WEIGHT_OPSET} for its INT4 DequantizeLinear blocks. "
        "`input_ids`/`position_ids` are int64",
        "(TensorRT 10 accepts int64 inputs). Every file a bundle names (graphs, their external data,",
        f"tokenizer, engines) lies inside the bundle folder. `{RUNTIME_JSON}` (format `{FORMAT}`,",
        f"version {FORMAT_VERSION}) describes the rest.",
        "",
        "Shown for 2 layers; layer indices run 0..L-1.",
        "",
    ]
    for kind, dyn in ((STEP, "only `batch` is dynamic"), (PREFILL, "`batch` and `sequence` are dynamic")):
        lines += [f"## {kind}.onnx ({dyn})", "", "| direction | name | dtype | shape | meaning |",
                  "| --- | --- | --- | --- | --- |"]
        for direction, specs in (("input", graph_inputs(example, kind)), ("output", graph_outputs(example, kind))):
            for spec in specs:
                shape = "[" + ", ".join(str(d) for d in spec.shape) + "]"
                lines.append(f"| {direction} | `{spec.name}` | {spec.dtype} | {shape} | {spec.doc} |")
        lines.append("")
    windowed = StateShape(num_layers=1, num_kv_heads="H_kv", feature_dim="K", head_dim="Dv", vocab_size="V",
                          window="W")
    lines += ["## With a sliding window (runtime.json `window` = W > 0)", "",
              "Each layer's state also holds the window, so it stays fixed in size (layer 0 shown; the same",
              "tensors exist as `past_state.*` inputs and `present_state.*` outputs of both graphs). `s` and",
              "`z` then sum only the keys that left the window.", "",
              "| name | dtype | shape | meaning |", "| --- | --- | --- | --- |"]
    for spec in _state_specs(windowed, past_name, "state before these tokens:", "float32")[len(STATE_PARTS):]:
        shape = "[" + ", ".join(str(d) for d in spec.shape) + "]"
        lines.append(f"| `{spec.name}` | {spec.dtype} | {shape} | {spec.doc} |")
    lines.append("")
    ort = StateShape(num_layers=1, num_kv_heads="H_kv", feature_dim="K", head_dim="Dv", vocab_size="V", target="ort")
    lines += ["## The ort target (runtime.json `target` = ort)", "",
              f"Opset {TARGET_OPSETS['ort']}, for ONNX Runtime: the same ids and logits, and one state tensor per "
              "layer in", "LinearAttention's own layout instead of `s` and `z` (layer 0 shown):", "",
              "| name | dtype | shape | meaning |", "| --- | --- | --- | --- |"]
    for spec in _state_specs(ort, past_name, "state before these tokens:", "float32"):
        shape = "[" + ", ".join(str(d) for d in spec.shape) + "]"
        lines.append(f"| `{spec.name}` | {spec.dtype} | {shape} | {spec.doc} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m t2r_export.contract OUT.md  (e.g. graphs/README.md)", file=sys.stderr)
        return 2
    Path(argv[0]).write_text(render_markdown() + "\n")
    print(f"wrote {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
