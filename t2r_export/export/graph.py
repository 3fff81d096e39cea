"""Emit the step and prefill ONNX graphs from a ``DecoderWeights`` description.

Plain ONNX ops only (opset 17), no transposes on the decode path; per layer one fused q/k/v
matmul, one RoPE rotation and one feature-map matmul for queries and keys together
([B, T, H_kv, G+1, d]), and RMSNorm in the Pow form ONNX Runtime fuses into one kernel. Names
and shapes of the graph I/O come from ``contract``; the sliding-window hybrid's attention is emitted by
``window.py``. Given a ``WeightFile`` (``weight_file.py``), named
weights become external data in the bundle's one shared weights.bin instead of proto contents; a
tied embedding is stored once, [D, V], read by the lm head's MatMul and by a column Gather
(``DecoderEmitter.embed``). Precision plans:
- fp32: everything fp32.
- fp16: weights, matmuls and activations fp16; the fp32 island is the state (inputs, updates,
  outputs), phi(q)·z, the clamp and the division, the norms, and the logits (docs/design.md#precision-plan).
- fp16-all: the same but the state and the denominator too: the overflow demonstration.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .. import contract
from .weights import DecoderWeights, FeatureMapWeights, LayerWeights, LazyWeight, Norm, materialize
from .window import window_prefill, window_step

logger = logging.getLogger(__name__)

# what the emitter writes directly; int8 (quantize.py) and the weight-only plans (weight_only.py,
# int4_qdq.py)
# are quantized from an fp32 bundle
PRECISIONS = tuple(p for p in contract.PRECISIONS if p != "int8" and p not in contract.WEIGHT_ONLY_PRECISIONS
                   and p not in contract.QDQ_WEIGHT_PRECISIONS)
INT64_MAX = np.iinfo(np.int64).max


def per_head_columns(num_heads: int, num_kv_heads: int, head_dim: int) -> np.ndarray:
    """Column order taking the fused [per KV head (G q, k), then every v] layout to per KV head
    (G q, k, v): one Reshape and one Split then give queries and key, and the value, per KV head."""
    d, groups = head_dim, num_heads // num_kv_heads
    qk_width = num_kv_heads * (groups + 1) * d
    order = []
    for h in range(num_kv_heads):
        start = h * (groups + 1) * d
        order += list(range(start, start + (groups + 1) * d))
        order += list(range(qk_width + h * d, qk_width + (h + 1) * d))
    return np.asarray(order, dtype=np.int64)


def regroup(arr, order: np.ndarray):
    """A fused q/k/v weight [D, n] or bias [n] with its columns in ``order`` (lazily for a LazyWeight)."""
    if arr is None:
        return None
    if isinstance(arr, LazyWeight):
        return LazyWeight(arr.shape, lambda: np.ascontiguousarray(arr.numpy()[:, order]))
    return np.ascontiguousarray(np.asarray(arr)[..., order])


def rotate_half_blocks(rotate_half: np.ndarray) -> tuple[list[int], list[int], np.ndarray]:
    """(sizes, order, sign) with x @ R == sign * Concat(Split(x, sizes)[order]) along the head dims.

    rotate_half's R moves whole blocks of dims (Llama: the two halves; GPT-NeoX's partial rotary:
    the two rotary halves and the pass-through dims), so a Split and a Concat do it with block
    copies, where a Gather of the head dims runs element by element (at 1k tokens on the 135M
    shape, 6.7 ms against 0.5 ms per layer: docs/design.md#prefill). R has one non-zero (+-1) per
    column at most; a zero column (a pass-through dim) keeps its own dim with sign 0, where the sine
    is 0 anyway."""
    rotate_half = np.asarray(rotate_half, dtype=np.float32)
    index = np.abs(rotate_half).argmax(axis=0).astype(np.int64)
    sign = rotate_half[index, np.arange(rotate_half.shape[1])]
    index[sign == 0] = np.flatnonzero(sign == 0)
    # x @ R must be sign * x[..., index] exactly, with index a permutation
    if (sorted(index.tolist()) != list(range(len(index)))
            or not np.array_equal(np.eye(len(index), dtype=np.float32)[:, index] * sign, rotate_half)):
        raise ValueError("rotate_half is not a signed permutation")
    # output dims in runs of consecutive source dims; each run is one block
    starts = [0] + [j for j in range(1, len(index)) if index[j] != index[j - 1] + 1]
    runs = [(int(index[a]), b - a) for a, b in zip(starts, starts[1:] + [len(index)])]
    by_source = sorted(runs)
    return [n for _, n in by_source], [by_source.index(run) for run in runs], sign


class GraphBuilder:
    """A tiny helper over onnx.helper: unique names, initializers, nodes."""

    def __init__(self, compute_dtype=np.float32, store=None):
        # a WeightFile: named weights go there as external data instead of into the proto
        self.store = store
        self.scope_name = ""
        self.in_island = False
        # names of the nodes that must run in fp32 whatever the plan (TensorRT precision constraints)
        self.fp32_island: list[str] = []
        self.nodes: list = []
        self.initializers: list = []
        self.count = 0
        self.compute_dtype = compute_dtype
        self._consts: dict = {}
        self._weights: dict = {}

    def _name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"

    def const(self, value, dtype=None, name: str | None = None) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = None
        if arr.size <= 16 and name is None:
            key = (arr.dtype.str, arr.shape, arr.tobytes())
            if key in self._consts:
                return self._consts[key]
        name = name or self._name("const")
        self.initializers.append(numpy_helper.from_array(arr, name))
        if key is not None:
            self._consts[key] = name
        return name

    def weight(self, name: str, arr: np.ndarray, fp32: bool = False) -> str:
        """A named initializer; asking again for the same name returns the first one (shared weights)."""
        if name not in self._weights:
            dtype = np.dtype(np.float32 if fp32 else self.compute_dtype)
            if self.store is not None and self.store.wants(arr.shape, dtype):
                # the weight is computed (from a LazyWeight) only if the file does not hold it yet
                self.initializers.append(self.store.tensor(name, lambda: materialize(arr), dtype, arr.shape))
                self._weights[name] = name
            else:
                self._weights[name] = self.const(materialize(arr).astype(dtype), name=name)
        return self._weights[name]

    @contextmanager
    def scope(self, name: str, fp32_island: bool = False):
        """Nodes made inside are named ``name/Op_n``; island nodes are recorded for precision constraints."""
        saved = self.scope_name, self.in_island
        self.scope_name, self.in_island = name, fp32_island or self.in_island
        try:
            yield
        finally:
            self.scope_name, self.in_island = saved

    def op(self, op_type: str, *inputs: str, outputs: int | list[str] = 1, **attrs):
        if isinstance(outputs, int):
            names = [self._name(op_type.lower()) for _ in range(outputs)]
        else:
            names = outputs
        node_name = self._name(f"{self.scope_name}/{op_type}" if self.scope_name else op_type)
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=node_name, **attrs))
        if self.in_island:
            self.fp32_island.append(node_name)
        return names[0] if len(names) == 1 else names

    def cast(self, x: str, dtype) -> str:
        return self.op("Cast", x, to=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))

    def reshape(self, x: str, shape) -> str:
        return self.op("Reshape", x, self.const(shape, np.int64))

    def unsqueeze(self, x: str, axes) -> str:
        return self.op("Unsqueeze", x, self.const(axes, np.int64))

    def slice_last(self, x: str, axis: int) -> str:
        """x[..., -1:, ...] along axis (keeps the axis)."""
        return self.op("Slice", x, self.const([-1], np.int64), self.const([INT64_MAX], np.int64),
                       self.const([axis], np.int64))


class DecoderEmitter:
    """Walks DecoderWeights once per graph kind."""

    def __init__(self, dec: DecoderWeights, kind: str, precision: str = "fp32", store=None):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
        self.dec, self.kind, self.precision = dec, kind, precision
        self.low = np.float16 if precision != "fp32" else np.float32
        # the state dtype: fp32 except in the deliberately broken all-fp16 variant
        self.state_dtype = np.float16 if precision == "fp16-all" else np.float32
        self.g = GraphBuilder(self.low, store)
        self.hkv = dec.num_kv_heads
        self.groups = dec.num_heads // dec.num_kv_heads
        self.d = dec.head_dim
        self.k = dec.feature_dim
        # the fused q/k/v weight's columns regrouped per KV head (docs/design.md#graph-layout)
        self.order = per_head_columns(dec.num_heads, dec.num_kv_heads, dec.head_dim)

    # -- dtype boundaries --------------------------------------------------------------------
    def to_low(self, x):
        return x if self.low == np.float32 else self.g.cast(x, self.low)

    def to_fp32(self, x):
        return x if self.low == np.float32 else self.g.cast(x, np.float32)

    def to_state(self, x):
        return x if self.state_dtype == self.low else self.g.cast(x, self.state_dtype)

    # -- blocks --------------------------------------------------------------------------------
    def norm(self, x: str, n: Norm, prefix: str) -> str:
        """Norms run in fp32 in every plan (a known fp16 overflow source); returns compute dtype."""
        g = self.g
        with g.scope(prefix, fp32_island=True):
            x32 = self.to_fp32(x)
            w = g.weight(prefix + ".weight", n.weight, fp32=True)
            if n.kind == "layer":
                b = g.weight(prefix + ".bias", n.bias if n.bias is not None else np.zeros_like(n.weight), fp32=True)
                y = g.op("LayerNormalization", x32, w, b, axis=-1, epsilon=n.eps)
            else:
                # Pow(x, 2) rather than Mul(x, x): the pattern ONNX Runtime fuses into one RMSNorm kernel
                ms = g.op("ReduceMean", g.op("Pow", x32, g.const(2.0, np.float32)), axes=[-1], keepdims=1)
                y = g.op("Mul", g.op("Div", x32, g.op("Sqrt", g.op("Add", ms, g.const(n.eps, np.float32)))), w)
            return self.to_low(y)

    def linear(self, x: str, w: np.ndarray, b: np.ndarray | None, name: str) -> str:
        """A weight matmul (the ops int8 quantizes), named after the weight."""
        with self.g.scope(name):
            y = self.g.op("MatMul", x, self.g.weight(name + ".weight", w))
            return y if b is None else self.g.op("Add", y, self.g.weight(name + ".bias", b))

    def act(self, x: str, kind: str) -> str:
        g = self.g
        c = lambda v: g.const(v, self.low)  # noqa: E731
        if kind == "silu":
            return g.op("Mul", x, g.op("Sigmoid", x))
        if kind == "relu":
            return g.op("Relu", x)
        if kind in ("gelu", "gelu_python"):
            erf = g.op("Erf", g.op("Mul", x, c(1 / np.sqrt(2.0))))
            return g.op("Mul", g.op("Mul", x, c(0.5)), g.op("Add", erf, c(1.0)))
        if kind in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            inner = g.op("Mul", c(np.sqrt(2.0 / np.pi)),
                         g.op("Add", x, g.op("Mul", c(0.044715), g.op("Mul", x, g.op("Mul", x, x)))))
            return g.op("Mul", g.op("Mul", x, c(0.5)), g.op("Add", g.op("Tanh", inner), c(1.0)))
        raise ValueError(f"activation {kind!r} is not supported by the ONNX exporter")

    def feature_map(self, x: str, fm: FeatureMapWeights, prefix: str) -> str:
        """x [B, T, H_kv, G+1, d] (G scaled queries and the key of each KV head) -> phi [B, T, H_kv, G+1, K].

        One op chain for queries and keys: the query scale is already in the q columns."""
        g = self.g
        if fm.kind in ("t2r", "hedgehog"):
            w = g.weight(prefix + ".weight", fm.weight)
            b = g.weight(prefix + ".bias", fm.bias)
            y = g.op("Add", g.op("MatMul", x, w), b)
            if fm.kind == "t2r":
                return g.op("Relu", y)
            # hedgehog: softmax over [y, -y], the 2k features
            return g.op("Softmax", g.op("Concat", y, g.op("Neg", y), axis=-1), axis=-1)
        if fm.kind == "elu":
            return g.op("Add", g.op("Elu", x, alpha=1.0), g.const(1.0, self.low))
        # rfa: random Fourier features of the unit-normalised vector
        x32 = self.to_fp32(x)
        norm = g.op("Sqrt", g.op("ReduceSum", g.op("Mul", x32, x32), g.const([-1], np.int64), keepdims=1))
        xn = self.to_low(g.op("Div", x32, g.op("Max", norm, g.const(1e-6, np.float32))))
        proj = g.op("MatMul", xn, g.weight(prefix + ".omega", fm.weight))
        scale = g.const(1.0 / np.sqrt(fm.weight.shape[-1]), self.low)
        return g.op("Mul", g.op("Concat", g.op("Sin", proj), g.op("Cos", proj), axis=-1), scale)

    def attention_core_step(self, phi_q, phi_k, v, i: int):
        """One token: S += phi(k) v^T, z += phi(k); out = phi(q) S / max(phi(q) z, eps)."""
        g, hkv, k, d = self.g, self.hkv, self.k, self.d
        s_in, z_in = contract.past_name(i, "s"), contract.past_name(i, "z")
        pk = self.to_state(g.reshape(phi_k, [-1, hkv, k, 1]))
        vv = self.to_state(g.reshape(v, [-1, hkv, 1, d]))
        s_out = g.op("Add", s_in, g.op("Mul", pk, vv), outputs=[contract.present_name(i, "s")])
        z_out = g.op("Add", z_in, g.reshape(pk, [-1, hkv, k]), outputs=[contract.present_name(i, "z")])
        pq = self.to_state(g.reshape(phi_q, [-1, hkv, self.groups, k]))
        num = g.op("MatMul", pq, s_out)                                   # [B, H_kv, G, d]
        den = g.op("MatMul", pq, g.unsqueeze(z_out, [-1]))                # [B, H_kv, G, 1]
        out = g.op("Div", num, g.op("Max", den, g.const(self.dec.eps, self.state_dtype)))
        return g.reshape(self.to_low(out), [-1, 1, self.dec.num_heads * d])

    def attention_core_prefill(self, phi_q, phi_k, v, i: int):
        """T tokens in chunk-parallel form (``prefill_graph.py``); the last sums are the new state."""
        from .prefill_graph import chunked_prefill

        return chunked_prefill(self, phi_q, phi_k, v, i)

    def attention(self, x: str, layer: LayerWeights, i: int, rope) -> str:
        g, hkv, G, d = self.g, self.hkv, self.groups, self.d
        p = f"layers.{i}.attn"
        qkv = self.linear(x, regroup(layer.qkv_weight, self.order), regroup(layer.qkv_bias, self.order), p + ".qkv")
        # per KV head: G queries, its key, its value
        qk, v = g.op("Split", g.reshape(qkv, [0, 0, hkv, G + 2, d]), g.const([G + 1, 1], np.int64), axis=3,
                     outputs=2)
        if rope:
            with g.scope(f"layers.{i}.rope"):
                qk = self.rotate(qk, rope)
        if self.dec.window:
            out = self.window_attention(qk, v, layer, i)
            return self.linear(out, layer.o_weight, layer.o_bias, p + ".o")
        with g.scope(f"layers.{i}.phi"):
            phi = self.feature_map(qk, layer.feature_map, f"layers.{i}.phi")
            phi_q, phi_k = g.op("Split", phi, g.const([G, 1], np.int64), axis=3, outputs=2)
        core = self.attention_core_step if self.kind == contract.STEP else self.attention_core_prefill
        # the running sums, phi(q)·z and the division stay fp32 in every plan (docs/design.md#precision-plan)
        with g.scope(f"layers.{i}.state", fp32_island=True):
            out = core(phi_q, phi_k, v, i)
        return self.linear(out, layer.o_weight, layer.o_bias, p + ".o")

    def window_attention(self, qk: str, v: str, layer: LayerWeights, i: int) -> str:
        """LoLCATs' hybrid (see ``window.py``): qk [B, T, H_kv, G+1, d] after RoPE, v [B, T, H_kv, 1, d]."""
        emit = window_step if self.kind == contract.STEP else window_prefill
        return emit(self, qk, v, layer, i)

    def mlp(self, x: str, layer: LayerWeights, i: int) -> str:
        g = self.g
        p = f"layers.{i}.mlp"
        h = self.linear(x, layer.mlp_in, layer.mlp_in_bias, p + ".in")
        if layer.mlp_kind == "gated":
            inter = layer.mlp_out.shape[0]
            gate, up = g.op("Split", h, g.const([inter, inter], np.int64), axis=-1, outputs=2)
            h = g.op("Mul", self.act(gate, layer.act), up)
        else:
            h = self.act(h, layer.act)
        return self.linear(h, layer.mlp_out, layer.mlp_out_bias, p + ".out")

    def embed(self, ids: str, rank: int) -> str:
        """The embedding rows of ``ids`` (``rank`` dims) -> [*ids.shape, D].

        A tied embedding is stored once, as [D, V]: the layout of the lm head's plain MatMul, which
        ONNX Runtime runs as a matrix-vector product for one token (a Gemm reading [V, D]
        transposed repacks it on every call: 1.65x the time on a 49k x 576 head). The lookup
        then gathers columns and moves D last."""
        g, dec = self.g, self.dec
        if not dec.tied_lm_head:
            return g.op("Gather", g.weight("embed", dec.embed), ids, axis=0)
        columns = g.op("Gather", g.weight("embed", dec.lm_head), ids, axis=1)       # [D, *ids.shape]
        return g.op("Transpose", columns, perm=list(range(1, rank + 1)) + [0])

    def lm_head(self, x: str) -> str:
        """Logits [..., V]; a tied head reads the one [D, V] embedding (``embed``)."""
        if not self.dec.tied_lm_head:
            return self.linear(x, self.dec.lm_head, self.dec.lm_head_bias, "lm_head")
        with self.g.scope("lm_head"):
            return self.g.op("MatMul", x, self.g.weight("embed", self.dec.lm_head))

    def positions(self) -> tuple[str, list[int]]:
        """position_ids as fp32 [B, T, 1], and the axes that make the tables broadcast over [H_kv, G+1]."""
        return self.g.unsqueeze(self.g.cast("position_ids", np.float32), [-1]), [2, 3]

    def rotate(self, x: str, rope) -> str:
        """RoPE on x [..., d]: x*cos + (x @ R)*sin, with x @ R as ``rope_tables``' block swap."""
        g = self.g
        cos, sin, (sizes, order) = rope
        blocks = g.op("Split", x, sizes, axis=-1, outputs=len(order))
        blocks = [blocks] if len(order) == 1 else blocks
        rotated = g.op("Concat", *[blocks[j] for j in order], axis=-1)
        return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))

    def rope_tables(self):
        """cos and sin [B, T, 1, 1, d] from position_ids, and rotate_half as blocks of head dims to
        swap (``rotate_half_blocks``) with its signs folded into the sine. Zero frequencies leave
        pass-through dims alone (cos 1, sin 0)."""
        g = self.g
        sizes, order, sign = rotate_half_blocks(np.asarray(self.dec.rotate_half))
        # angles reach 1e4+ at long positions: fp16 would lose them, so the tables are made in fp32
        with g.scope("rope", fp32_island=True):
            pos, axes = self.positions()
            angle = g.op("Mul", pos, g.weight("rope.inv_freq", self.dec.inv_freq, fp32=True))
            scale = np.float32(self.dec.rope_scale)
            # one Mul gives the sine its rotate_half signs and the rope scale together
            sin = g.op("Mul", g.op("Sin", angle), g.weight("rope.sin_sign", sign * scale, fp32=True))
            cos = g.op("Cos", angle)
            if scale != 1.0:
                cos = g.op("Mul", cos, g.const(scale, np.float32))
            cos, sin = g.unsqueeze(self.to_low(cos), axes), g.unsqueeze(self.to_low(sin), axes)
        return cos, sin, (g.const(sizes, np.int64), order)

    def decoder_layers(self, x: str, rope) -> str:
        g = self.g
        for i, layer in enumerate(self.dec.layers):
            logger.info("building the %s graph: layer %d/%d", self.kind, i + 1, len(self.dec.layers))
            h = self.norm(x, layer.norm1, f"layers.{i}.norm1")
            attn = self.attention(h, layer, i, rope)
            if layer.parallel_residual:
                mlp = self.mlp(self.norm(x, layer.norm2, f"layers.{i}.norm2"), layer, i)
                x = g.op("Add", g.op("Add", x, attn), mlp)
            else:
                x = g.op("Add", x, attn)
                x = g.op("Add", x, self.mlp(self.norm(x, layer.norm2, f"layers.{i}.norm2"), layer, i))
        return x

    def build(self) -> onnx.ModelProto:
        g, dec = self.g, self.dec
        x = self.embed("input_ids", 2)                                            # [B, T, D]
        if dec.pos_embed is not None:
            x = g.op("Add", x, g.op("Gather", g.weight("pos_embed", dec.pos_embed), "position_ids", axis=0))
        x = self.decoder_layers(x, self.rope_tables() if dec.rope else None)
        if self.kind == contract.PREFILL:
            x = g.slice_last(x, 1)                                                  # [B, 1, D]
        x = self.norm(x, dec.final_norm, "final_norm")
        logits = self.lm_head(x)
        with g.scope("logits", fp32_island=True):
            g.op("Reshape", self.to_fp32(logits), g.const([-1, dec.vocab_size], np.int64), outputs=["logits"])
        return self._model()

    def _model(self) -> onnx.ModelProto:
        shape = state_shape(self.dec)
        state_type = helper.np_dtype_to_tensor_dtype(np.dtype(self.state_dtype))

        def value_info(spec):
            dtype = TensorProto.INT64 if spec.dtype == "int64" else (
                state_type if spec.name.startswith(("past_state", "present_state")) else TensorProto.FLOAT)
            return helper.make_tensor_value_info(spec.name, dtype, list(spec.shape))

        graph = helper.make_graph(self.g.nodes, f"t2r_{self.kind}",
                                  [value_info(s) for s in contract.graph_inputs(shape, self.kind)],
                                  [value_info(s) for s in contract.graph_outputs(shape, self.kind)],
                                  initializer=self.g.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", contract.OPSET)],
                                  producer_name="t2r-export")
        model.ir_version = 8  # readable by ONNX Runtime ≥ 1.14 and TensorRT 10's parser
        helper.set_model_props(model, {contract.PRECISION_KEY: self.precision,
                                       contract.ISLAND_KEY: ",".join(self.g.fp32_island)})
        return model


def state_shape(dec: DecoderWeights, target: str = "plain") -> contract.StateShape:
    return contract.StateShape(len(dec.layers), dec.num_kv_heads, dec.feature_dim, dec.head_dim, dec.vocab_size,
                               window=dec.window, target=target)


def build_graph(dec: DecoderWeights, kind: str, precision: str = "fp32", store=None,
                target: str = "plain") -> onnx.ModelProto:
    """The ``kind`` graph for ``target``; with a ``WeightFile`` store its weights are written there, not into
    the proto."""
    if kind not in contract.GRAPH_KINDS:
        raise ValueError(f"unknown graph kind {kind!r}; expected one of {contract.GRAPH_KINDS}")
    if target not in contract.TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {', '.join(contract.TARGETS)}")
    if target == "ort":
        from .ort_target import build_ort_graph

        return build_ort_graph(dec, kind, precision, store)
    if kind == contract.STEP and not dec.window:
        from .step_graph import StepEmitter

        return StepEmitter(dec, precision, store).build()
    if kind == contract.PREFILL and not dec.window:
        from .prefill_graph import PrefillEmitter

        return PrefillEmitter(dec, precision, store).build()
    return DecoderEmitter(dec, kind, precision, store).build()
