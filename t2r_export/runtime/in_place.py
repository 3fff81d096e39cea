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
not, and keep two sets. The bundle loader decides it from the scan it already makes of each graph
(runtime/onnx_scan.py, no ``onnx`` package needed) and records it as ``Bundle.updates_in_place``
(docs/design.md#runtime).
"""

from __future__ import annotations

# ops ONNX Runtime's CPU provider may run as a view of input 0 (the output shares its buffer)
VIEW_OPS = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"})
# elementwise kernels that may write their output over a same-shaped input
IN_PLACE_OPS = frozenset({"Add", "Sub", "Mul", "Div"})


def resident_row_nbytes(config, in_place: bool) -> int:
    """Bytes one row holds in the IO-binding ONNX Runtime decoder: its state once per state set (one
    set in place, two otherwise) and its fp32 logits row."""
    from .. import contract

    state = contract.state_nbytes(config.state_shape, 1, config.state_dtype)
    return (1 if in_place else 2) * state + 4 * config.vocab_size


def graph_updates_in_place(scan, pairs) -> bool:
    """True when every ``(past, present)`` pair of the graph ``scan`` describes (runtime/onnx_scan.py:
    its nodes in file order and its inputs' and outputs' shapes) may share one buffer."""
    nodes = scan.nodes
    producer = {name: i for i, node in enumerate(nodes) for name in node.outputs}
    for past, present in pairs:
        writer = producer.get(present)
        if writer is None or nodes[writer].domain not in ("", "ai.onnx"):
            return False
        views = _views_of(nodes, past)
        if present in views:  # the new state would be a view (or a copy onto itself) of the old
            return False
        ancestors = _ancestors(nodes, producer, writer)
        for i, node in enumerate(nodes):
            if node.op_type in VIEW_OPS or not views.intersection(node.inputs):
                continue
            if i == writer:
                reads = [name for name in node.inputs if name in views]
                shape = scan.shapes.get(past)
                if node.op_type not in IN_PLACE_OPS or reads != [past] or shape is None \
                        or shape != scan.shapes.get(present):
                    return False
            elif i not in ancestors:
                return False
        if any(name in views for name in scan.outputs if name != present):
            return False
    return True


def _views_of(nodes, name: str) -> set[str]:
    """``name`` and every tensor that may share its buffer through a chain of view ops."""
    views = {name}
    for node in nodes:  # ONNX nodes are stored in topological order
        if node.op_type in VIEW_OPS and node.inputs and node.inputs[0] in views:
            views.update(node.outputs)
    return views


def _ancestors(nodes, producer: dict[str, int], index: int) -> set[int]:
    seen: set[int] = set()
    todo = [index]
    while todo:
        for name in nodes[todo.pop()].inputs:
            parent = producer.get(name)
            if parent is not None and parent not in seen:
                seen.add(parent)
                todo.append(parent)
    return seen
