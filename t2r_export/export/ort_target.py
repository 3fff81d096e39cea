"""The ``ort`` target: step and prefill graphs built from LLM ops ONNX Runtime runs as single kernels.

Per layer: one q/k/v matmul, ``RotaryEmbedding`` (opset 23) on the queries and keys, the feature
map, ``LinearAttention`` (update rule "linear", scale 1; the com.microsoft op, see below) for both
running sums, the query products and the recurrence over T in the prefill, and each residual Add
fused with the RMSNorm after it (com.microsoft ``SkipSimplifiedLayerNormalization``; the first
norm is ``RMSNormalization``, opset 23; models with LayerNorm or parallel residuals keep plain
norms and Adds).
T2R divides phi(q)·S by phi(q)·z; LinearAttention has no denominator, so v gets a constant-1
channel: the state [B, H_kv, K, Dv+1] then holds S with z as its last column, and the output's
last column per head is the denominator. The 1 comes out of the q/k/v matmul itself (a zero
weight column and a bias of 1 per KV head), so no Pad or Concat runs per token. The state is one
tensor per layer, ``sz`` (contract.ORT_STATE_PARTS), fp32 like the plain target's s and z
(docs/design.md#targets). The q/k/v columns are ordered [every v with its 1 | per KV head (G
queries, key)]: one Split gives LinearAttention's packed value and RotaryEmbedding's packed input.
Sliding-window models are refused: their window part exists only in the plain target.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .. import contract
from .graph import DecoderEmitter, state_shape
from .weights import DecoderWeights, LayerWeights, LazyWeight, Norm

OPSET = contract.TARGET_OPSETS["ort"]
# ONNX Runtime 1.32 has no kernel for the standard LinearAttention: it runs the op's function body
# (a Scan over tokens, ~50 nodes per layer). Its com.microsoft twin, the same inputs, attributes
# and outputs, has a CPU kernel.
MICROSOFT = "com.microsoft"
LINEAR_ATTENTION_DOMAIN = MICROSOFT


def ort_columns(num_heads: int, num_kv_heads: int, head_dim: int):
    """(column order, extra zero columns) taking the fused [per KV head (G q, k), then every v]
    layout to [per KV head (v, 1) | per KV head (G q, k)]; -1 marks the constant-1 columns."""
    d, groups = head_dim, num_heads // num_kv_heads
    qk_width = num_kv_heads * (groups + 1) * d
    order = []
    for h in range(num_kv_heads):
        order += list(range(qk_width + h * d, qk_width + (h + 1) * d)) + [-1]
    order += list(range(qk_width))
    return np.asarray(order, dtype=np.int64)


def ort_qkv(weight, bias, order: np.ndarray):
    """The fused weight and bias in ``order``: zero weight and bias 1 where ``order`` is -1."""
    ones = order < 0

    def columns(w: np.ndarray) -> np.ndarray:
        out = np.zeros((w.shape[0], len(order)), np.float32)
        out[:, ~ones] = w[:, order[~ones]]
        return out

    new_weight = LazyWeight((weight.shape[0], len(order)), lambda: columns(np.asarray(weight)))
    new_bias = np.zeros(len(order), np.float32)
    if bias is not None:
        new_bias[~ones] = np.asarray(bias)[order[~ones]]
    new_bias[ones] = 1.0
    return new_weight, new_bias


def check_ort_target(dec: DecoderWeights) -> None:
    """ValueError, one line, for what the ort target cannot express."""
    if dec.window:
        raise ValueError(f"--target ort does not support sliding-window models (this one keeps a {dec.window}-token "
                         "window); export it with --target plain")
    if dec.layers and dec.layers[0].feature_map.kind not in contract.FEATURE_MAPS:
        raise ValueError(f"--target ort cannot express feature map {dec.layers[0].feature_map.kind!r}")


class OrtEmitter(DecoderEmitter):
    """Step and prefill graphs for the ort target; same inputs and logits as the plain target."""

    def __init__(self, dec: DecoderWeights, kind: str, precision: str = "fp32", store=None):
        check_ort_target(dec)
        if precision != "fp32":
            raise ValueError(f"--target ort is built in fp32 only (got --precision {precision}); the weight-only "
                             "plans quantize an fp32 bundle")
        super().__init__(dec, kind, precision, store)
        self.ort_order = ort_columns(dec.num_heads, dec.num_kv_heads, dec.head_dim)
        self._final_normed = False

    def norm(self, x: str, n: Norm, prefix: str) -> str:
        # decoder_layers already applied the final norm when it fused the last residual into it
        if prefix == "final_norm" and self._final_normed:
            return x
        if n.kind != "rms":
            return super().norm(x, n, prefix)
        g = self.g
        with g.scope(prefix, fp32_island=True):
            return g.op("RMSNormalization", x, g.weight(prefix + ".weight", n.weight, fp32=True), axis=-1,
                        epsilon=n.eps)

    def decoder_layers(self, x: str, rope) -> str:
        """Sequential-residual RMSNorm models: each residual Add and the norm after it are one
        com.microsoft SkipSimplifiedLayerNormalization (the last one is the final norm)."""
        dec = self.dec
        norms = [n for layer in dec.layers for n in (layer.norm1, layer.norm2)] + [dec.final_norm]
        if any(layer.parallel_residual for layer in dec.layers) or any(n.kind != "rms" for n in norms):
            return super().decoder_layers(x, rope)
        h = self.norm(x, dec.layers[0].norm1, "layers.0.norm1")
        for i, layer in enumerate(dec.layers):
            h, x = self.skip_norm(self.attention(h, layer, i, rope), x, layer.norm2, f"layers.{i}.norm2")
            if i + 1 == len(dec.layers):
                after, prefix = dec.final_norm, "final_norm"
            else:
                after, prefix = dec.layers[i + 1].norm1, f"layers.{i + 1}.norm1"
            h, x = self.skip_norm(self.mlp(h, layer, i), x, after, prefix)
        self._final_normed = True
        return h

    def skip_norm(self, y: str, skip: str, n: Norm, prefix: str) -> tuple[str, str]:
        """(rmsnorm(y + skip), y + skip) in one kernel."""
        g = self.g
        with g.scope(prefix, fp32_island=True):
            out = g.op("SkipSimplifiedLayerNormalization", y, skip, g.weight(prefix + ".weight", n.weight, fp32=True),
                       outputs=[g._name("normed"), "", "", g._name("residual")], epsilon=n.eps, domain=MICROSOFT)
        return out[0], out[3]

    def rope_tables(self):
        """cos and sin [B, T, rotary/2] from position_ids (no position table: positions stay unbounded)."""
        g = self.g
        rotary = int(np.count_nonzero(self.dec.inv_freq))
        with g.scope("rope", fp32_island=True):
            pos = g.unsqueeze(g.cast("position_ids", np.float32), [-1])                    # [B, T, 1]
            half = np.ascontiguousarray(self.dec.inv_freq[: rotary // 2])
            angle = g.op("Mul", pos, g.weight("rope.inv_freq_half", half, fp32=True))
            cos, sin = g.op("Cos", angle), g.op("Sin", angle)
            if self.dec.rope_scale != 1.0:
                scale = g.const(self.dec.rope_scale, np.float32)
                cos, sin = g.op("Mul", cos, scale), g.op("Mul", sin, scale)
        return cos, sin, rotary

    def attention(self, x: str, layer: LayerWeights, i: int, rope) -> str:
        g, hkv, G, d, k = self.g, self.hkv, self.groups, self.d, self.k
        heads = self.dec.num_heads
        p = f"layers.{i}.attn"
        weight, bias = ort_qkv(layer.qkv_weight, layer.qkv_bias, self.ort_order)
        qkv = self.linear(x, weight, bias, p + ".qkv")
        v1, qk = g.op("Split", qkv, g.const([hkv * (d + 1), hkv * (G + 1) * d], np.int64), axis=-1, outputs=2)
        if rope:
            cos, sin, rotary = rope
            with g.scope(f"layers.{i}.rope"):
                qk = g.op("RotaryEmbedding", qk, cos, sin, num_heads=hkv * (G + 1),
                          **({"rotary_embedding_dim": rotary} if rotary != d else {}))
        qk = g.reshape(qk, [0, 0, hkv, G + 1, d])
        with g.scope(f"layers.{i}.phi"):
            phi = self.feature_map(qk, layer.feature_map, f"layers.{i}.phi")             # [B, T, H_kv, G+1, K]
            phi_q, phi_k = g.op("Split", phi, g.const([G, 1], np.int64), axis=3, outputs=2)
        # the running sums and the division run in fp32 (docs/design.md#precision-plan)
        with g.scope(f"layers.{i}.state", fp32_island=True):
            name = contract.ORT_STATE_PARTS[0].name
            out = g.op("LinearAttention", g.reshape(phi_q, [0, 0, heads * k]), g.reshape(phi_k, [0, 0, hkv * k]), v1,
                       contract.past_name(i, name),
                       outputs=[g._name("linearattention"), contract.present_name(i, name)],
                       q_num_heads=heads, kv_num_heads=hkv, update_rule="linear", scale=1.0,
                       domain=LINEAR_ATTENTION_DOMAIN)[0]
            num, den = g.op("Split", g.reshape(out, [0, 0, heads, d + 1]), g.const([d, 1], np.int64), axis=-1,
                            outputs=2)
            out = g.op("Div", num, g.op("Max", den, g.const(self.dec.eps, np.float32)))
            out = g.reshape(out, [0, 0, heads * d])
        return self.linear(out, layer.o_weight, layer.o_bias, p + ".o")

    def _model(self) -> onnx.ModelProto:
        shape = state_shape(self.dec, "ort")
        specs_in = contract.graph_inputs(shape, self.kind)
        specs_out = contract.graph_outputs(shape, self.kind)

        def value_info(spec):
            dtype = onnx.TensorProto.INT64 if spec.dtype == "int64" else onnx.TensorProto.FLOAT
            return helper.make_tensor_value_info(spec.name, dtype, list(spec.shape))

        graph = helper.make_graph(self.g.nodes, f"t2r_{self.kind}_ort", [value_info(s) for s in specs_in],
                                  [value_info(s) for s in specs_out], initializer=self.g.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                        helper.make_opsetid(MICROSOFT, 1)],
                                  producer_name="t2r-export")
        # the IR version opset 27 needs (ONNX Runtime 1.32 reads it)
        model.ir_version = 11
        helper.set_model_props(model, {contract.PRECISION_KEY: self.precision,
                                       contract.ISLAND_KEY: ",".join(self.g.fp32_island)})
        return model


def build_ort_graph(dec: DecoderWeights, kind: str, precision: str = "fp32", store=None) -> onnx.ModelProto:
    if kind not in contract.GRAPH_KINDS:
        raise ValueError(f"unknown graph kind {kind!r}; expected one of {contract.GRAPH_KINDS}")
    return OrtEmitter(dec, kind, precision, store).build()
