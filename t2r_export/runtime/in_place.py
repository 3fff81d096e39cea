"""Whether a step graph may write its new state over its old one (one state set per batch, not two).

A step reads ``past_state.X`` and writes ``present_state.X``. Binding both to the same buffer is
safe when nothing reads the old state after the new one starts being written:

- every node that reads ``past_state.X`` (directly, or through the ops ONNX Runtime may run as a
  view of their input: Reshape, Squeeze, Unsqueeze, Flatten, Identity) is the writer of
  ``present_state.X`` or one of the writer's ancestors, so it has run before the writer starts;
- the writer itself, when it reads the old state, is an elementwise Add/Sub/Mul/Div whose old-state
  input has the output's full shape (no broadcast of it): each element is read before it is
  written, and ONNX Runtime declares these CPU kernels safe to run in place.

The plain T2R step meets this (``S' = S + phi(k) v^T`` is one Add; with a decay, a Mul on S runs
first); graphs that update the state inside a fused op or read the old state after the update do
not, and keep two sets. ``onnx`` reads the graph (without its external data); where it is not
installed the answer is no (docs/design.md#runtime).
"""

from __future__ import annotations

from pathlib import Path

# ops ONNX Runtime's CPU provider may run as a view of input 0 (the output shares its buffer)
VIEW_OPS = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"})
# elementwise kernels that may write their output over a same-shaped input
IN_PLACE_OPS = frozenset({"Add", "Sub", "Mul", "Div"})


def bundle_updates_in_place(bundle) -> bool:
    """True when both of ``bundle``'s graphs may write every state over its old value."""
    from .. import contract

    pairs = contract.state_pairs(bundle.config.num_layers, bundle.config.state_shape.parts)
    return all(updates_in_place(bundle.graph_path(kind), pairs) for kind in contract.GRAPH_KINDS)


def resident_row_nbytes(config, in_place: bool) -> int:
    """Bytes one row holds in the IO-binding ONNX Runtime decoder: its state once per state set (one
    set in place, two otherwise) and its fp32 logits row."""
    from .. import contract

    state = contract.state_nbytes(config.state_shape, 1, config.state_dtype)
    return (1 if in_place else 2) * state + 4 * config.vocab_size


def updates_in_place(graph: Path, pairs) -> bool:
    """True when every ``(past, present)`` pair of ``graph`` may share one buffer (see the module docstring)."""
    try:
        import onnx
    except ImportError:
        return False
    try:
        model = onnx.load(str(graph), load_external_data=False)
    except Exception:  # an unreadable graph fails later, with its own message, where it is opened
        return False
    return graph_updates_in_place(model.graph, pairs)


def graph_updates_in_place(graph, pairs) -> bool:
    nodes = list(graph.node)
    producer = {name: i for i, node in enumerate(nodes) for name in node.output}
    shapes = {v.name: _shape(v) for v in (*graph.input, *graph.output, *graph.value_info)}
    for past, present in pairs:
        writer = producer.get(present)
        if writer is None or nodes[writer].domain not in ("", "ai.onnx"):
            return False
        views = _views_of(nodes, past)
        if present in views:  # the new state would be a view (or a copy onto itself) of the old
            return False
        ancestors = _ancestors(nodes, producer, writer)
        for i, node in enumerate(nodes):
            if node.op_type in VIEW_OPS or not views.intersection(node.input):
                continue
            if i == writer:
                reads = [name for name in node.input if name in views]
                if node.op_type not in IN_PLACE_OPS or reads != [past] or shapes.get(past) is None \
                        or shapes.get(past) != shapes.get(present):
                    return False
            elif i not in ancestors:
                return False
        if any(name in views for name in (o.name for o in graph.output) if name != present):
            return False
    return True


def _views_of(nodes, name: str) -> set[str]:
    """``name`` and every tensor that may share its buffer through a chain of view ops."""
    views = {name}
    for node in nodes:  # ONNX nodes are stored in topological order
        if node.op_type in VIEW_OPS and node.input and node.input[0] in views:
            views.update(node.output)
    return views


def _ancestors(nodes, producer: dict[str, int], index: int) -> set[int]:
    seen: set[int] = set()
    todo = [index]
    while todo:
        for name in nodes[todo.pop()].input:
            parent = producer.get(name)
            if parent is not None and parent not in seen:
                seen.add(parent)
                todo.append(parent)
    return seen


def _shape(value) -> tuple | None:
    dims = value.type.tensor_type.shape.dim
    return tuple(d.dim_param or d.dim_value for d in dims) if value.type.tensor_type.HasField("shape") else None
