"""Weight-only plans (int4, int8-wo): block-quantized weights, fp32 activations, ONNX Runtime only.

    export_weight_only_bundle("bundles/fp32", "bundles/int4", "int4")

The weight matmuls of an fp32 bundle's graphs become ``com.microsoft.MatMulNBits`` nodes through
ONNX Runtime's maintained quantizer (``onnxruntime.quantization.matmul_nbits_quantizer``,
round-to-nearest, symmetric, one scale per block of ``BLOCK_SIZE`` input rows): nothing is
calibrated, so the two graphs quantize to byte-identical weights and keep sharing one weights.bin.
What stays fp32 and why (docs/design.md#precision-plan): the state core, the feature map and RoPE
(the same scopes the int8 plan leaves alone), the norms and the embedding lookup. A tied lm head,
a MatMul on the [D, V] embedding that the lookup's Gather also reads, gets its own quantized copy
(the lm head is a fifth of the matmul work of a 135M model) and the lookup keeps the fp32 one;
bundles written before that layout have a Gemm reading the embedding transposed, which
``untie_lm_head`` turns into a MatMul on a transposed copy first (the quantizer takes MatMul only). MatMulNBits is an ONNX
Runtime contrib op: TensorRT cannot parse these graphs (``t2r-export trt`` refuses the plan).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .. import contract
from ..atomic import atomic_dir
from .quantize import weight_matmul_nodes
from .weight_file import repack_graphs

logger = logging.getLogger(__name__)

# precision -> bits of the stored weights
BITS = {"int4": 4, "int8-wo": 8}
BLOCK_SIZE = 32
# 4: MatMulNBits quantizes the activations of each block to int8 on the fly (the fast CPU path);
# the accuracy it costs is inside the plan's tolerances (tolerances.py)
ACCURACY_LEVEL = 4
EXCLUDE_SCOPES = ("layers.*.state", "layers.*.phi", "layers.*.rope")


def untie_lm_head(model: onnx.ModelProto) -> list[str]:
    """Gemm(x, W, transB=1) on a weight -> MatMul(x, W^T) on a transposed copy the quantizer can take."""
    weights = {t.name: t for t in model.graph.initializer}
    added: dict[str, str] = {}
    renamed = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or len(node.input) != 2 or node.input[1] not in weights
                or attrs.get("transB") != 1 or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0):
            continue
        source = node.input[1]
        if source not in added:
            added[source] = f"{source}.transposed"
            array = numpy_helper.to_array(weights[source], base_dir="")
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array.T), added[source]))
        node.op_type = "MatMul"
        node.input[1] = added[source]
        del node.attribute[:]
        renamed.append(node.name)
    return renamed


def quantize_weight_only(model: onnx.ModelProto, precision: str) -> tuple[onnx.ModelProto, list[str]]:
    """``model`` (weights loaded) with its weight matmuls as MatMulNBits; returns it and their names."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    untie_lm_head(model)
    nodes = weight_matmul_nodes(model, EXCLUDE_SCOPES)
    weights = {t.name: t for t in model.graph.initializer}
    node_by_name = {n.name: n for n in model.graph.node}
    # MatMulNBits takes 2-D weights whose input width splits into whole blocks
    nodes = [n for n in nodes if len(weights[node_by_name[n].input[1]].dims) == 2
             and weights[node_by_name[n].input[1]].dims[0] % BLOCK_SIZE == 0]
    if not nodes:
        raise ValueError(f"no weight matmul can be quantized to {precision} (input widths must be multiples of "
                         f"{BLOCK_SIZE})")
    metadata = {p.key: p.value for p in model.metadata_props}
    config = DefaultWeightOnlyQuantConfig(block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=ACCURACY_LEVEL,
                                          bits=BITS[precision], op_types_to_quantize=("MatMul",))
    # the quantizer takes every MatMul of op_types_to_quantize: the rest is named as excluded
    exclude = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in set(nodes)]
    quantizer = MatMulNBitsQuantizer(model, bits=BITS[precision], block_size=BLOCK_SIZE, is_symmetric=True,
                                     accuracy_level=ACCURACY_LEVEL, nodes_to_exclude=exclude, algo_config=config)
    # it logs every node it passes at INFO
    quiet = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        quantizer.process()
    finally:
        quiet.setLevel(level)
    out = quantizer.model.model
    out.ir_version = model.ir_version
    helper.set_model_props(out, {**metadata, contract.PRECISION_KEY: precision})
    return out, nodes


def export_weight_only_bundle(fp32_bundle_dir: str | Path, out: str | Path, precision: str, overwrite: bool = True,
                              progress: Callable[[str], None] | None = None,
                              check: Callable[[Path, contract.RuntimeConfig], contract.VerificationRecord] | None
                              = None):
    """A ``precision`` bundle at ``out`` from a verified fp32 bundle, checked by ``check`` before it
    is moved into place (raising leaves nothing at ``out``); returns its RuntimeConfig."""
    import onnxruntime

    from ..runtime.bundle import load_bundle

    if precision not in BITS:
        raise ValueError(f"unknown weight-only precision {precision!r}; expected one of {', '.join(BITS)}")
    source = load_bundle(Path(fp32_bundle_dir))
    if source.config.precision != "fp32":
        raise ValueError(f"{fp32_bundle_dir} is a {source.config.precision} bundle; {precision} is quantized from "
                         "an fp32 bundle")

    def quantization(counts: dict[str, int]) -> dict:
        return {"tool": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer",
                "onnxruntime": onnxruntime.__version__, "bits": BITS[precision], "block_size": BLOCK_SIZE,
                "symmetric": True, "accuracy_level": ACCURACY_LEVEL, "algorithm": "RTN", "quantized_matmuls": counts}

    return write_quantized_bundle(source, out, precision, lambda path: quantize_weight_only(onnx.load(str(path)),
                                                                                           precision),
                                  quantization, overwrite=overwrite, progress=progress, check=check)


def write_quantized_bundle(source, out: str | Path, precision: str,
                           quantize: Callable[[Path], tuple[onnx.ModelProto, list[str]]],
                           quantization: Callable[[dict[str, int]], dict], opset: int | None = None,
                           overwrite: bool = True, progress: Callable[[str], None] | None = None,
                           check: Callable[[Path, contract.RuntimeConfig], contract.VerificationRecord] | None = None):
    """What every weight-only plan does with an fp32 ``source`` bundle once ``quantize(graph path)``
    has turned each graph into ``precision`` (the model and its quantized matmuls' names): save both
    graphs over one shared weights.bin (both quantize the same weights by the same rule, so their
    blocks are byte-identical), check them, copy the tokenizer, and write runtime.json with
    ``quantization(quantized matmuls per graph)``, verified by ``check`` before the bundle is moved
    into place at ``out`` (raising leaves nothing there). Returns its RuntimeConfig."""
    progress = progress or (lambda message: logger.info(message))
    quantized = {}
    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        graphs = {}
        for kind in contract.GRAPH_KINDS:
            progress(f"quantizing {kind}.onnx to {precision} weights")
            model, quantized[kind] = quantize(source.graph_path(kind))
            graphs[kind] = dataclasses.replace(source.config.graphs[kind], file=f"{kind}.onnx")
            onnx.save_model(model, str(tmp / graphs[kind].file), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=f"{kind}.onnx.data", size_threshold=1024)
            del model
        repack_graphs(tmp, [graphs[kind].file for kind in contract.GRAPH_KINDS])
        for kind in contract.GRAPH_KINDS:
            onnx.checker.check_model(str(tmp / graphs[kind].file), full_check=True)
        for name in contract.TOKENIZER_FILES:
            if source.file(name).is_file():
                shutil.copy2(source.file(name), tmp / name)
        runtime = source.config.replace(
            precision=precision, state_dtype=contract.STATE_DTYPES[precision], graphs=graphs, verification=None,
            quantization=quantization({kind: len(names) for kind, names in quantized.items()}),
            **({"opset": opset} if opset is not None else {}))
        if check is not None:
            progress(f"verifying the {precision} bundle against the fp32 model")
            runtime = runtime.replace(verification=check(tmp, runtime))
        (tmp / contract.RUNTIME_JSON).write_text(runtime.to_json())
    logger.info("wrote %s bundle %s", precision, out)
    return runtime


__all__ = ["BITS", "BLOCK_SIZE", "export_weight_only_bundle", "quantize_weight_only", "untie_lm_head",
           "write_quantized_bundle"]
