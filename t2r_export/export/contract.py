"""The graph contract: names, dtypes and shapes of the exported step and prefill graphs.

This is the one place that owns them (DESIGN §4). The exporter, the verifier, the ONNX Runtime and
TensorRT runtimes and ``graphs/README.md`` all read them from here. No torch import: the runtime
uses this module on devices without torch.

Step graph:    input_ids int64 [B, 1], position_ids int64 [B, 1], past_state.{i}.s / .z
Prefill graph: input_ids int64 [B, T], position_ids int64 [B, T], past_state.{i}.s / .z
Both return:   logits float32 [B, V] (last position only), present_state.{i}.s / .z
State:         s float32 [B, H_kv, K, Dv], z float32 [B, H_kv, K] — no sequence axis.
Sliding window W > 0 (runtime.json ``window``): each layer also carries the last W keys and values,
               wk float32 [B, H_kv, W, Dv], wv float32 [B, H_kv, W, Dv], oldest first, and
               wm float32 [B, W], 1.0 where a slot holds a key — still fixed in size.
"""

from __future__ import annotations

from dataclasses import dataclass

STEP = "step"
PREFILL = "prefill"
GRAPH_KINDS = (STEP, PREFILL)
BATCH = "batch"
SEQUENCE = "sequence"
OPSET = 17


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                     # numpy dtype name
    shape: tuple                   # ints, or a str naming a dynamic axis
    doc: str


@dataclass(frozen=True)
class StateShape:
    num_layers: int
    num_kv_heads: int
    feature_dim: int
    head_dim: int
    vocab_size: int
    # sliding-window hybrid: W keys/values per layer in the state (0 = off, the paper's T2R)
    window: int = 0


# -- state-spec generalisation: the window's tensors are more state parts of the same kind -----
LINEAR_PARTS = ("s", "z")
WINDOW_PARTS = ("wk", "wv", "wm")


def state_parts(window: int = 0) -> tuple[str, ...]:
    """The state tensors of one layer, in graph order."""
    return LINEAR_PARTS + WINDOW_PARTS if window else LINEAR_PARTS


def _part_spec(shape: StateShape, part: str) -> tuple[tuple, str]:
    """(shape, meaning) of one layer's state part."""
    h, k, d, w = shape.num_kv_heads, shape.feature_dim, shape.head_dim, shape.window
    return {
        "s": ((BATCH, h, k, d), "sum of phi(k) v^T over the keys that left the window"
              if w else "sum of phi(k) v^T"),
        "z": ((BATCH, h, k), "sum of phi(k) over the keys that left the window" if w else "sum of phi(k)"),
        "wk": ((BATCH, h, w, d), "the last W keys after RoPE, oldest first"),
        "wv": ((BATCH, h, w, d), "the last W values, oldest first"),
        "wm": ((BATCH, w), "1.0 where a window slot holds a key, 0.0 while empty"),
    }[part]


def past_name(layer: int, part: str) -> str:
    return f"past_state.{layer}.{part}"


def present_name(layer: int, part: str) -> str:
    return f"present_state.{layer}.{part}"


def _state_specs(shape: StateShape, name_fn, verb: str) -> list[TensorSpec]:
    specs = []
    for i in range(shape.num_layers):
        for part in state_parts(shape.window):
            dims, meaning = _part_spec(shape, part)
            specs.append(TensorSpec(name_fn(i, part), "float32", dims, f"layer {i} {verb} {meaning}"))
    return specs


def graph_inputs(shape: StateShape, kind: str = STEP) -> list[TensorSpec]:
    if kind not in GRAPH_KINDS:
        raise ValueError(f"unknown graph kind {kind!r}; expected one of {GRAPH_KINDS}")
    t = 1 if kind == STEP else SEQUENCE
    return [
        TensorSpec("input_ids", "int64", (BATCH, t), "token ids"),
        TensorSpec("position_ids", "int64", (BATCH, t), "absolute positions of those tokens"),
        *_state_specs(shape, past_name, "state before these tokens:"),
    ]


def graph_outputs(shape: StateShape, kind: str = STEP) -> list[TensorSpec]:
    if kind not in GRAPH_KINDS:
        raise ValueError(f"unknown graph kind {kind!r}; expected one of {GRAPH_KINDS}")
    return [
        TensorSpec("logits", "float32", (BATCH, shape.vocab_size), "next-token logits after the last input token"),
        *_state_specs(shape, present_name, "state after these tokens:"),
    ]


def state_pairs(num_layers: int, window: int = 0) -> list[tuple[str, str]]:
    """(past name, present name) for every state tensor, in graph order."""
    return [(past_name(i, p), present_name(i, p)) for i in range(num_layers) for p in state_parts(window)]


def state_nbytes(shape: StateShape, batch: int = 1) -> int:
    per_layer = shape.num_kv_heads * shape.feature_dim * (shape.head_dim + 1)
    if shape.window:
        per_layer += shape.window * (2 * shape.num_kv_heads * shape.head_dim + 1)
    return 4 * batch * shape.num_layers * per_layer


def render_markdown(example: StateShape | None = None) -> str:
    """The text of graphs/README.md (a test fails when the committed file differs)."""
    example = example or StateShape(num_layers=2, num_kv_heads="H_kv", feature_dim="K", head_dim="Dv",
                                    vocab_size="V")
    lines = [
        "# The exported graph contract",
        "",
        "<!-- generated by `python -m t2r_export.export.contract` from t2r_export/export/contract.py; do not edit -->",
        "",
        "A bundle holds two ONNX graphs with the same state tensors. The prompt goes through",
        "`prefill.onnx` in one call; decoding continues one token at a time with `step.onnx`,",
        "feeding each `present_state.*` back as the next `past_state.*`. The state has no sequence",
        "axis: memory is the same at token 10 and token 100,000. State tensors are float32 in every",
        f"precision plan. Opset {OPSET}; plain ONNX ops only (no ONNX Runtime contrib ops), so the same",
        "files parse in TensorRT. `input_ids`/`position_ids` are int64 (TensorRT 10 accepts int64 inputs).",
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
    for spec in _state_specs(windowed, past_name, "state before these tokens:")[2:]:
        shape = "[" + ", ".join(str(d) for d in spec.shape) + "]"
        lines.append(f"| `{spec.name}` | {spec.dtype} | {shape} | {spec.doc} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    from pathlib import Path

    target = Path(__file__).resolve().parents[2] / "graphs" / "README.md"
    target.write_text(render_markdown() + "\n")
    print(f"wrote {target}")
