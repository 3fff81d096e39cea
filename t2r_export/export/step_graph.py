"""The step graph without a sequence axis: fewer nodes for ONNX Runtime to dispatch per token.

A step sees one token per row, so every tensor can drop the T axis: input_ids [B, 1] become [B]
once, the hidden state is [B, D], the lm head needs no reshape and the logits leave the graph as
[B, V] without one. Per layer the q/k/v columns are regrouped per KV head (its G queries, its key,
its value), so one Reshape gives [B, H_kv, G+2, d] and one Split gives the rotated part and a
value already shaped for the outer product; RoPE is one MatMul with a per-row rotation matrix
built once per step; the feature map, both running sums and the division then work on
[B, H_kv, ...] with no further reshapes of q or v. Sliding-window models keep the
general emitter (``graph.py``), whose window part expects the T axis. The math: docs/design.md.
"""

from __future__ import annotations

import numpy as np

from .. import contract
from .graph import DecoderEmitter, regroup
from .weights import LayerWeights


class StepEmitter(DecoderEmitter):
    """The plain step graph for models without a sliding window (``build_graph`` picks it)."""

    def __init__(self, dec, precision: str = "fp32", store=None):
        if dec.window:
            raise ValueError("the lean step graph has no sliding-window part; use DecoderEmitter")
        super().__init__(dec, contract.STEP, precision, store)

    def rope_tables(self) -> str:
        """RoPE as one matrix per row, shared by every layer: x @ M == x*cos + rotate_half(x)*sin.

        M [B, 1, d, d] = diag(cos) + R diag(sin) (R: rotate_half as a matrix; pass-through dims have
        cos 1, sin 0). Each layer then rotates its queries and keys with one small MatMul instead of
        a Split and a Concat (rotate_half's block swap), two Muls and an Add: five kernels.
        """
        g, dec = self.g, self.dec
        # angles reach 1e4+ at long positions: the matrix is made in fp32 (docs/design.md#precision-plan)
        with g.scope("rope", fp32_island=True):
            pos = g.reshape(g.cast("position_ids", np.float32), [-1, 1, 1, 1])               # [B, 1, 1, 1]
            angle = g.op("Mul", pos, g.weight("rope.inv_freq", dec.inv_freq, fp32=True))   # [B, 1, 1, d]
            cos, sin = g.op("Cos", angle), g.op("Sin", angle)
            if dec.rope_scale != 1.0:
                scale = g.const(dec.rope_scale, np.float32)
                cos, sin = g.op("Mul", cos, scale), g.op("Mul", sin, scale)
            eye = g.weight("rope.identity", np.eye(self.d, dtype=np.float32), fp32=True)
            rotate = g.weight("rope.rotate_half", np.asarray(dec.rotate_half, np.float32), fp32=True)
            matrix = g.op("Add", g.op("Mul", eye, cos), g.op("Mul", rotate, sin))          # [B, 1, d, d]
            return self.to_low(matrix)

    def attention(self, x: str, layer: LayerWeights, i: int, rope) -> str:
        g, hkv, G, d, k = self.g, self.hkv, self.groups, self.d, self.k
        p = f"layers.{i}.attn"
        qkv = self.linear(x, regroup(layer.qkv_weight, self.order), regroup(layer.qkv_bias, self.order), p + ".qkv")
        qkv = g.reshape(qkv, [-1, hkv, G + 2, d])                          # per KV head: G queries, key, value
        qk, v = g.op("Split", qkv, g.const([G + 1, 1], np.int64), axis=2, outputs=2)
        if rope:
            with g.scope(f"layers.{i}.rope"):
                qk = g.op("MatMul", qk, rope)                                  # rope_tables' per-row matrix
        with g.scope(f"layers.{i}.phi"):
            phi = self.feature_map(qk, layer.feature_map, f"layers.{i}.phi")  # [B, H_kv, G+1, K]
            phi_q, phi_k = g.op("Split", phi, g.const([G, 1], np.int64), axis=2, outputs=2)
        # the running sums, phi(q)·z and the division stay fp32 in every plan (docs/design.md#precision-plan)
        with g.scope(f"layers.{i}.state", fp32_island=True):
            s_in, z_in = contract.past_name(i, "s"), contract.past_name(i, "z")
            pk = self.to_state(phi_k)                                      # [B, H_kv, 1, K]
            outer = g.op("Mul", g.reshape(pk, [-1, hkv, k, 1]), self.to_state(v))
            s_out = g.op("Add", s_in, outer, outputs=[contract.present_name(i, "s")])
            z_out = g.op("Add", z_in, g.reshape(pk, [-1, hkv, k]), outputs=[contract.present_name(i, "z")])
            pq = self.to_state(phi_q)                                      # [B, H_kv, G, K]
            num = g.op("MatMul", pq, s_out)                                # [B, H_kv, G, d]
            den = g.op("MatMul", pq, g.unsqueeze(z_out, [-1]))             # [B, H_kv, G, 1]
            out = g.op("Div", num, g.op("Max", den, g.const(self.dec.eps, self.state_dtype)))
            out = g.reshape(self.to_low(out), [-1, self.dec.num_heads * d])
        return self.linear(out, layer.o_weight, layer.o_bias, p + ".o")

    def build(self):
        g, dec = self.g, self.dec
        x = self.embed(g.reshape("input_ids", [-1]), 1)                                   # [B, D]
        if dec.pos_embed is not None:
            pos = g.reshape("position_ids", [-1])
            x = g.op("Add", x, g.op("Gather", g.weight("pos_embed", dec.pos_embed), pos, axis=0))
        x = self.decoder_layers(x, self.rope_tables() if dec.rope else None)
        x = self.norm(x, dec.final_norm, "final_norm")
        logits = self.lm_head(x)
        with g.scope("logits", fp32_island=True):
            self.name_output(self.to_fp32(logits), "logits")
        return self._model()

    def name_output(self, x: str, name: str) -> None:
        """Rename the last node's output ``x`` to the graph output ``name`` (no Identity node)."""
        node = self.g.nodes[-1]
        if list(node.output) != [x]:
            raise ValueError(f"{x} is not the last node's only output")
        node.output[0] = name
