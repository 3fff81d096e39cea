"""The int4-qdq plan: INT4 weight blocks behind a standard DequantizeLinear, the TensorRT weight-only plan.

    export_qdq_bundle("bundles/fp32", "bundles/int4-qdq", block_size=64)

Each weight matmul of an fp32 plain bundle's graphs reads its weight through
``DequantizeLinear(W_q, scales, axis=0, block_size=B)``: ``W_q`` an INT4 initializer ``[K, N]``,
``scales`` fp32 ``[K / B, N]``, one per block of B input rows and output column, no zero point
(zero, which TensorRT's IDequantizeLayer requires). Round to nearest with scale = max |w| / 7 over
the block, so every scale is positive (TensorRT's parser refuses others; ONNX Runtime's own QDQ
quantizer picks signed scales) and nothing clips. Activations, the state and everything outside
the weight matmuls stay fp32. INT4 and ``block_size`` need opset 21: the rest of the graph is
moved from opset 17 to 21 by onnx's version converter (the only change it makes to these graphs:
ReduceMean's axes become an input). TensorRT documents INT4 weight blocks of 64 or 128 rows, so
those are the block sizes. What stays unquantized, and the tied lm head, as in weight_only.py:
the state core, the feature map, RoPE, the norms and the embedding lookup stay fp32; a tied lm head
(a MatMul on the [D, V] embedding the lookup also reads) gets its own INT4 copy while the lookup keeps
the fp32 one (docs/design.md#precision-plan).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .. import contract
from .quantize import weight_matmul_nodes
from .weight_only import EXCLUDE_SCOPES, untie_lm_head, write_quantized_bundle

logger = logging.getLogger(__name__)

BLOCK_SIZES = contract.QDQ_BLOCK_SIZES
DEFAULT_BLOCK_SIZE = 64
# symmetric round to nearest: q in [-7, 7] times a positive fp32 scale
QMAX = 7
OPSET = contract.QDQ_WEIGHT_OPSET
# INT4 initializers need ONNX IR version 10
IR_VERSION = 10


def check_block_size(block_size: int) -> int:
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"unknown --block-size {block_size}; int4-qdq blocks are "
                         f"{' or '.join(map(str, BLOCK_SIZES))} input rows (what TensorRT's INT4 weight-only "
                         "quantization takes)")
    return block_size


def quantize_blocks(weight: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(q int8 in [-7, 7] shaped like ``weight`` [K, N], fp32 scales [K / block_size, N])."""
    rows, cols = weight.shape
    blocks = weight.astype(np.float32).reshape(rows // block_size, block_size, cols)
    amax = np.abs(blocks).max(axis=1)
    # an all-zero block still needs a positive scale; its values quantize to 0 whatever it is
    scales = np.where(amax > 0, amax / QMAX, 1.0).astype(np.float32)
    q = np.clip(np.rint(blocks / scales[:, None, :]), -QMAX, QMAX).astype(np.int8)
    return q.reshape(rows, cols), scales


def pack_int4(q: np.ndarray) -> bytes:
    """ONNX's INT4 layout: two values per byte, the first in the low nibble, row-major."""
    flat = q.astype(np.int8).ravel()
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    low, high = flat[0::2].astype(np.uint8) & 0x0F, flat[1::2].astype(np.uint8) & 0x0F
    return (low | (high << 4)).astype(np.uint8).tobytes()


def int4_tensor(name: str, q: np.ndarray) -> TensorProto:
    return helper.make_tensor(name, TensorProto.INT4, list(q.shape), pack_int4(q), raw=True)


def to_qdq_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph moved to opset 21 (IR 10) by onnx's version converter, metadata kept."""
    from onnx import version_converter

    metadata = {p.key: p.value for p in model.metadata_props}
    converted = version_converter.convert_version(model, OPSET)
    converted.ir_version = IR_VERSION
    helper.set_model_props(converted, metadata)
    return converted


def quantize_qdq(model: onnx.ModelProto, block_size: int) -> tuple[onnx.ModelProto, list[str]]:
    """``model`` (opset 21, weights loaded) with its weight matmuls reading INT4 blocks through
    DequantizeLinear; returns it and the quantized matmuls' names."""
    check_block_size(block_size)
    untie_lm_head(model)
    weights = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    quantized, added, dequantized = [], [], {}
    for name in weight_matmul_nodes(model, EXCLUDE_SCOPES):
        node = nodes[name]
        tensor = weights[node.input[1]]
        # 2-D weights whose input width splits into whole blocks; an even width packs into whole bytes
        if len(tensor.dims) != 2 or tensor.dims[0] % block_size or tensor.dims[1] % 2:
            continue
        source = node.input[1]
        if source not in dequantized:
            q, scales = quantize_blocks(numpy_helper.to_array(tensor), block_size)
            added += [int4_tensor(f"{source}_DQ_Q4", q), numpy_helper.from_array(scales, f"{source}_DQ_scales")]
            dequantized[source] = f"{source}_DQ"
            scope = name.rsplit("/", 1)[0] if "/" in name else name
            dq = helper.make_node("DequantizeLinear", [f"{source}_DQ_Q4", f"{source}_DQ_scales"], [dequantized[source]],
                                  name=f"{scope}/{source}_DequantizeLinear", axis=0, block_size=block_size)
            model.graph.node.insert(list(model.graph.node).index(node), dq)
        node.input[1] = dequantized[source]
        quantized.append(name)
    if not quantized:
        raise ValueError(f"no weight matmul can be quantized to int4-qdq (input widths must be multiples of "
                         f"{block_size}, output widths even)")
    used = {i for n in model.graph.node for i in n.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + added)
    metadata = {p.key: p.value for p in model.metadata_props}
    helper.set_model_props(model, {**metadata, contract.PRECISION_KEY: "int4-qdq"})
    return model, quantized


def export_qdq_bundle(fp32_bundle_dir: str | Path, out: str | Path, block_size: int = DEFAULT_BLOCK_SIZE,
                      overwrite: bool = True, progress: Callable[[str], None] | None = None,
                      check: Callable[[Path, contract.RuntimeConfig], contract.VerificationRecord] | None = None):
    """An int4-qdq bundle at ``out`` from a verified fp32 plain bundle, checked by ``check`` before it
    is moved into place (raising leaves nothing at ``out``); returns its RuntimeConfig."""
    from onnx.external_data_helper import load_external_data_for_model

    from ..runtime.bundle import load_bundle

    check_block_size(block_size)
    source = load_bundle(Path(fp32_bundle_dir))
    if source.config.precision != "fp32":
        raise ValueError(f"{fp32_bundle_dir} is a {source.config.precision} bundle; int4-qdq is quantized from an "
                         "fp32 bundle")
    if source.config.target != "plain":
        raise ValueError(f"{fp32_bundle_dir} is a --target {source.config.target} bundle; int4-qdq is the TensorRT "
                         "plan, quantized from a plain bundle (the int4 plan serves --target ort)")
    progress = progress or (lambda message: logger.info(message))
    progress(f"int4-qdq: INT4 weight blocks of {block_size} input rows")

    def quantize(path: Path):
        # the converter sees the graph without its weights (they stay external), then they are read
        model = to_qdq_opset(onnx.load(str(path), load_external_data=False))
        load_external_data_for_model(model, str(path.parent))
        return quantize_qdq(model, block_size)

    def quantization(counts: dict[str, int]) -> dict:
        return {"tool": "t2r_export.export.int4_qdq", "format": "DequantizeLinear (INT4, axis 0, block_size) -> MatMul",
                "bits": 4, "block_size": block_size, "symmetric": True, "scale": f"max |w| / {QMAX} per block, fp32",
                "algorithm": "RTN", "quantized_matmuls": counts}

    return write_quantized_bundle(source, out, "int4-qdq", quantize, quantization, opset=OPSET, overwrite=overwrite,
                                  progress=progress, check=check)


__all__ = ["BLOCK_SIZES", "DEFAULT_BLOCK_SIZE", "check_block_size", "export_qdq_bundle", "pack_int4",
           "quantize_blocks", "quantize_qdq", "to_qdq_opset"]
