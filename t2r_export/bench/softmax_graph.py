"""The softmax teacher as an ONNX decoder with a KV cache, and the dense-matmul floor graph.

Both come out of the T2R emitter's machinery (``DecoderEmitter``: the same fused q/k/v
matmul, RoPE, norms, MLP and lm_head), so the benchmark compares attention cores and nothing else:

- ``SoftmaxKVEmitter``: causal softmax attention over ``past_key.{i}`` / ``past_value.{i}``
  ``[B, H_kv, P, d]`` concatenated with the new keys/values (returned as ``present_key.{i}`` /
  ``present_value.{i}`` ``[B, H_kv, P+T, d]``); GQA by reshaping queries to ``[B, H_kv, G, T, d]``.
  The query scale d**-0.5 is in the query columns of the fused q/k/v weight.
- ``FloorEmitter``: one token through the model's own dense matmuls only (embedding gather,
  q|k|v, o, MLP in/out of every layer, lm_head; Slice where a width must be routed): a lower
  bound on the latency of any decoder of this model with these weights on this machine. Its
  prefill form takes T tokens through the same matmuls (lm_head on the last token only, as a
  prefill graph returns the last logits), run without weight prepacking as the runtime runs a
  bundle's prefill: a lower bound on the time of the T2R prefill graph over T tokens.

``KVCacheDecoder`` runs the softmax graphs in ONNX Runtime with IO binding: the present tensors
ONNX Runtime allocates are bound as the next step's past, so no cache goes through numpy.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from .. import contract
from ..export.graph import DecoderEmitter
from ..export.weights import DecoderWeights, FeatureMapWeights

PAST_AXIS = "past_sequence"
TOTAL_AXIS = "total_sequence"
FLOOR_OPS = frozenset({"Gather", "MatMul", "Slice"})
# ONNX Runtime's weight prepacking for the softmax KV graphs: off, as the runtime opens fp32 bundles.
# On the Qwen2.5-0.5B shape (one thread) prepacking held a packed copy of every matmul weight per
# session (the bench's peak RSS 12.8 vs 9.2 GiB) and its single-token steps were no faster (9.0
# tokens/s at 128 vs 11.2 and 10.0 in two runs without), prefill about even (docs/bench.md)
PREPACK_KV = False


def kv_name(direction: str, layer: int, part: str) -> str:
    """``past_key.{i}`` / ``present_value.{i}`` ...: direction "past" | "present", part "key" | "value"."""
    return f"{direction}_{part}.{layer}"


def kv_pairs(num_layers: int) -> list[tuple[str, str]]:
    """(past name, present name) for every cache tensor, in graph order."""
    return [(kv_name("past", i, p), kv_name("present", i, p)) for i in range(num_layers) for p in ("key", "value")]


def kv_cache_nbytes(dec: DecoderWeights, positions: int, batch: int = 1) -> int:
    """fp32 bytes of the keys and values of ``positions`` tokens, all layers."""
    return 4 * 2 * batch * len(dec.layers) * dec.num_kv_heads * positions * dec.head_dim


# -- weights -------------------------------------------------------------------------------------

def extract_softmax_decoder(model, in_place: bool = False) -> DecoderWeights:
    """``DecoderWeights`` of a softmax causal LM, through the T2R extractors.

    The extractors read feature maps, which a softmax model lacks, so a copy is swapped with the
    parameter-free "elu" map first: the swap keeps every weight bit-identical. The extractor folds
    the query scale into the q columns of the fused q/k/v weight, as softmax attention needs.
    ``in_place``: swap ``model`` itself instead of a copy (one copy of the weights fewer; the
    caller gives the model up, its attention is T2R afterwards).
    """
    from ..models import T2RConfig, swap_attention
    from ..export.weights import extract_decoder

    source = model if in_place else copy.deepcopy(model)
    dec = extract_decoder(swap_attention(source.eval(), T2RConfig(feature_map="elu")))
    for layer in dec.layers:
        layer.feature_map = FeatureMapWeights("softmax")
    dec.feature_dim = dec.head_dim
    return dec


# -- graphs --------------------------------------------------------------------------------------

class SoftmaxKVEmitter(DecoderEmitter):
    """The T2R emitter with a softmax KV-cache attention core instead of the recurrent state."""

    def __init__(self, dec: DecoderWeights, kind: str, store=None):
        super().__init__(dec, kind, "fp32", store)
        self._mask = None

    def feature_map(self, x, fm, prefix):
        # softmax attention uses q and k as they are (the query scale is in the weights)
        return x

    def attention_core_step(self, q, k, v, i: int):
        """One token: q [B, 1, H_kv, G, d], k/v [B, 1, H_kv, 1, d] -> [B, 1, H*d]."""
        g, hkv, d = self.g, self.hkv, self.d
        key = g.op("Concat", kv_name("past", i, "key"), g.reshape(k, [-1, hkv, 1, d]), axis=2,
                   outputs=[kv_name("present", i, "key")])
        value = g.op("Concat", kv_name("past", i, "value"), g.reshape(v, [-1, hkv, 1, d]), axis=2,
                     outputs=[kv_name("present", i, "value")])
        q4 = g.reshape(q, [-1, hkv, self.groups, d])                                   # [B, H_kv, G, d]
        scores = g.op("MatMul", q4, g.op("Transpose", key, perm=[0, 1, 3, 2]))        # [B, H_kv, G, P+1]
        out = g.op("MatMul", g.op("Softmax", scores, axis=-1), value)                 # [B, H_kv, G, d]
        return g.reshape(out, [-1, 1, self.dec.num_heads * d])

    def attention_core_prefill(self, q, k, v, i: int):
        """T tokens after P cached ones: q [B, T, H_kv, G, d], k/v [B, T, H_kv, 1, d] -> [B, T, H*d]."""
        g, hkv, d = self.g, self.hkv, self.d
        k4 = g.op("Transpose", g.reshape(k, [0, 0, hkv, d]), perm=[0, 2, 1, 3])       # [B, H_kv, T, d]
        v4 = g.op("Transpose", g.reshape(v, [0, 0, hkv, d]), perm=[0, 2, 1, 3])
        key = g.op("Concat", kv_name("past", i, "key"), k4, axis=2, outputs=[kv_name("present", i, "key")])
        value = g.op("Concat", kv_name("past", i, "value"), v4, axis=2, outputs=[kv_name("present", i, "value")])
        q5 = g.op("Transpose", q, perm=[0, 2, 3, 1, 4])                                # [B, H_kv, G, T, d]
        kt = g.unsqueeze(g.op("Transpose", key, perm=[0, 1, 3, 2]), [2])              # [B, H_kv, 1, d, P+T]
        scores = g.op("MatMul", q5, kt)                                                # [B, H_kv, G, T, P+T]
        scores = g.op("Where", self._causal_mask(key), scores, g.const(-np.inf, np.float32))
        out = g.op("MatMul", g.op("Softmax", scores, axis=-1), g.unsqueeze(value, [2]))  # [B, H_kv, G, T, d]
        out = g.op("Transpose", out, perm=[0, 3, 1, 2, 4])                            # [B, T, H_kv, G, d]
        return g.reshape(out, [0, 0, self.dec.num_heads * d])

    def _causal_mask(self, key: str) -> str:
        """bool [T, P+T]: query t (absolute P+t) sees keys 0..P+t. Built once from the shapes."""
        if self._mask is None:
            g = self.g
            squeeze = lambda x: g.op("Squeeze", x, g.const([0], np.int64))  # noqa: E731
            total = squeeze(g.op("Shape", key, start=2, end=3))
            t = squeeze(g.op("Shape", "input_ids", start=1, end=2))
            one = g.const(1, np.int64)
            key_pos = g.unsqueeze(g.op("Range", g.const(0, np.int64), total, one), [0])              # [1, P+T]
            query_pos = g.unsqueeze(g.op("Range", g.op("Sub", total, t), total, one), [1])          # [T, 1]
            self._mask = g.op("LessOrEqual", key_pos, query_pos)
        return self._mask

    def _model(self) -> onnx.ModelProto:
        dec, hkv, d = self.dec, self.hkv, self.d
        t = 1 if self.kind == contract.STEP else contract.SEQUENCE
        batch = contract.BATCH
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [batch, t]),
                  helper.make_tensor_value_info("position_ids", TensorProto.INT64, [batch, t])]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, dec.vocab_size])]
        for past, present in kv_pairs(len(dec.layers)):
            inputs.append(helper.make_tensor_value_info(past, TensorProto.FLOAT, [batch, hkv, PAST_AXIS, d]))
            outputs.append(helper.make_tensor_value_info(present, TensorProto.FLOAT, [batch, hkv, TOTAL_AXIS, d]))
        graph = helper.make_graph(self.g.nodes, f"softmax_kv_{self.kind}", inputs, outputs,
                                  initializer=self.g.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", contract.OPSET)],
                                  producer_name="t2r-export-bench")
        model.ir_version = 8
        return model


class FloorEmitter(DecoderEmitter):
    """The dense matmuls only: the latency floor for these weights, of one token (``kind`` step)
    or of a prompt of T tokens (``kind`` prefill: lm_head on the last one)."""

    def __init__(self, dec: DecoderWeights, kind: str = contract.STEP, store=None):
        if kind not in contract.GRAPH_KINDS:
            raise ValueError(f"unknown graph kind {kind!r}; expected one of {contract.GRAPH_KINDS}")
        super().__init__(dec, contract.STEP, "fp32", store)
        self.floor_kind = kind

    def _matmul(self, x: str, w: np.ndarray, name: str) -> str:
        with self.g.scope(name):
            return self.g.op("MatMul", x, self.g.weight(name + ".weight", w))

    def _first(self, x: str, width: int) -> str:
        """x[..., :width]: routes a wider matmul output into the next matmul's input width."""
        g = self.g
        return g.op("Slice", x, g.const([0], np.int64), g.const([width], np.int64), g.const([-1], np.int64))

    def build(self) -> onnx.ModelProto:
        g, dec = self.g, self.dec
        x = g.op("Gather", g.weight("embed", dec.embed), "input_ids", axis=0)           # [B, 1, D]
        for i, layer in enumerate(dec.layers):
            qkv = self._matmul(x, layer.qkv_weight, f"layers.{i}.attn.qkv")
            attn = self._matmul(self._first(qkv, layer.o_weight.shape[0]), layer.o_weight, f"layers.{i}.attn.o")
            h = self._matmul(attn, layer.mlp_in, f"layers.{i}.mlp.in")
            x = self._matmul(self._first(h, layer.mlp_out.shape[0]), layer.mlp_out, f"layers.{i}.mlp.out")
        length = 1
        if self.floor_kind == contract.PREFILL:
            length = contract.SEQUENCE
            # the last token only, as a prefill graph's logits
            x = g.op("Slice", x, g.const([-1], np.int64), g.const([np.iinfo(np.int64).max], np.int64),
                     g.const([1], np.int64))
        with g.scope("lm_head"):
            g.op("MatMul", x, g.weight("lm_head.weight", dec.lm_head), outputs=["logits"])
        graph = helper.make_graph(g.nodes, "dense_floor",
                                  [helper.make_tensor_value_info("input_ids", TensorProto.INT64,
                                                                 [contract.BATCH, length])],
                                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                                 [contract.BATCH, 1, dec.vocab_size])],
                                  initializer=g.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", contract.OPSET)],
                                  producer_name="t2r-export-bench")
        model.ir_version = 8
        return model


def build_softmax_graph(dec: DecoderWeights, kind: str, store=None) -> onnx.ModelProto:
    """The softmax KV-cache decoder graph: kind "step" (one token) or "prefill" (T tokens).
    ``store``: a WeightFile the weights stream into (else they are inline)."""
    if kind not in contract.GRAPH_KINDS:
        raise ValueError(f"unknown graph kind {kind!r}; expected one of {contract.GRAPH_KINDS}")
    return SoftmaxKVEmitter(dec, kind, store).build()


def build_floor_graph(dec: DecoderWeights, kind: str = contract.STEP, store=None) -> onnx.ModelProto:
    return FloorEmitter(dec, kind, store).build()


def open_shared_sessions(builders: dict, threads: int, optimization: str = "all", prepack: bool = False) -> dict:
    """ONNX Runtime sessions over graphs whose weights are written once, as a bundle's are.

    ``builders``: kind -> ``build(store)`` returning the graph with its weights streamed into
    ``store``. The weights go to one weights.bin, one tensor at a time (no graph proto ever holds
    them), and the sessions read the one memory-mapped copy (``runtime.open_sessions``): a bench
    graph costs one copy of its weights, not a proto, a copy per session and their transients.
    Returns kind -> session plus ``"weights"`` (the buffers the sessions read; keep it with them).
    ``prepack``: ONNX Runtime's weight prepacking (a re-laid-out copy per session).
    """
    from ..export.weight_file import WEIGHTS_FILE, WeightFile
    from ..runtime.ort_session import open_sessions

    # the mapped weights outlive the folder: its files are unlinked, their pages stay mapped
    with tempfile.TemporaryDirectory(prefix="t2r-bench-graph-") as tmp:
        files = {}
        with WeightFile(Path(tmp) / WEIGHTS_FILE) as store:
            for kind, build in builders.items():
                files[kind] = f"{kind}.onnx"
                store.begin_graph(files[kind])
                onnx.save_model(build(store), str(Path(tmp) / files[kind]))
            store.write_index()
        return open_sessions(tmp, files, threads, optimization, prepack=prepack)


def open_session(model: onnx.ModelProto, options):
    """An ONNX Runtime CPU session over an in-memory ``model`` of any size.

    These graphs hold their weights inline; serialized, a model past 2 GiB does not load
    (ONNX Runtime takes the bytes' length as an int: ``narrowing_error``; the Qwen2.5-0.5B shape's
    floor is 2.5 GB). So the model is written with its weights in one external-data file, as the
    bundles keep theirs in weights.bin, and opened from there. It consumes ``model``: its tensors
    point at the file afterwards.
    """
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="t2r-bench-graph-") as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="weights.bin", size_threshold=1024)
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def dense_weight_bytes(dec: DecoderWeights) -> int:
    """fp32 bytes the floor graph reads per token (its weights; the embedding contributes one row)."""
    per_layer = sum(layer.qkv_weight.size + layer.o_weight.size + layer.mlp_in.size + layer.mlp_out.size
                    for layer in dec.layers)
    return 4 * (per_layer + dec.lm_head.size + dec.embed.shape[1])


# -- running -------------------------------------------------------------------------------------

class KVCacheDecoder:
    """The softmax KV graphs in ONNX Runtime, batch 1, IO binding, cache kept as OrtValues.

    ``prefill(ids)`` / ``step(id)`` continue from the current cache; ``mark()`` remembers it and
    ``rewind()`` returns to it (the concat graph never writes into its inputs, so a kept cache
    stays valid).
    """

    def __init__(self, dec: DecoderWeights, threads: int, optimization: str = "all", prepack: bool | None = None):
        import onnxruntime as ort

        prepack = PREPACK_KV if prepack is None else prepack
        builders = {kind: (lambda store, kind=kind: build_softmax_graph(dec, kind, store)) for kind in contract.GRAPH_KINDS}
        self.sessions = open_shared_sessions(builders, threads, optimization, prepack=prepack)
        # the weights both sessions read: they live as long as this decoder
        self.weights = self.sessions.pop("weights")
        self.pairs = kv_pairs(len(dec.layers))
        self.cache_shape = (1, dec.num_kv_heads, 0, dec.head_dim)
        self.vocab = dec.vocab_size
        self._ids = np.zeros((1, 1), np.int64)
        self._pos = np.zeros((1, 1), np.int64)
        self._logits = np.zeros((1, self.vocab), np.float32)
        self._step_ids = ort.OrtValue.ortvalue_from_numpy(self._ids)
        self._step_pos = ort.OrtValue.ortvalue_from_numpy(self._pos)
        self._step_logits = ort.OrtValue.ortvalue_from_numpy(self._logits)
        self.reset()

    def reset(self) -> None:
        import onnxruntime as ort

        empty = np.zeros(self.cache_shape, np.float32)
        self.cache = {past: ort.OrtValue.ortvalue_from_numpy(empty) for past, _ in self.pairs}
        self.position = 0
        self.mark()

    def mark(self) -> None:
        self._marked = (dict(self.cache), self.position)

    def rewind(self) -> None:
        cache, self.position = self._marked
        self.cache = dict(cache)

    def cache_nbytes(self) -> int:
        return sum(4 * int(np.prod(v.shape())) for v in self.cache.values())

    def _run(self, kind: str, binding) -> np.ndarray:
        for past, present in self.pairs:
            binding.bind_ortvalue_input(past, self.cache[past])
            binding.bind_output(present, "cpu")
        self.sessions[kind].run_with_iobinding(binding)
        outputs = binding.get_outputs()
        # outputs follow the graph's order: logits, then present key/value per layer
        self.cache = {past: value for (past, _), value in zip(self.pairs, outputs[1:], strict=True)}
        return outputs[0]

    def step(self, token: int) -> np.ndarray:
        self._ids[0, 0] = token
        self._pos[0, 0] = self.position
        binding = self.sessions[contract.STEP].io_binding()
        binding.bind_ortvalue_input("input_ids", self._step_ids)
        binding.bind_ortvalue_input("position_ids", self._step_pos)
        binding.bind_ortvalue_output("logits", self._step_logits)
        self._run(contract.STEP, binding)
        self.position += 1
        return self._logits

    def prefill(self, ids: np.ndarray, chunk: int = 1024) -> np.ndarray:
        """Continue over ``ids`` [T] in chunks (scores are [T, P+T] per head: chunks bound the memory)."""
        logits = None
        for start in range(0, len(ids), chunk):
            part = np.ascontiguousarray(ids[start:start + chunk], dtype=np.int64)[None]
            positions = np.arange(self.position, self.position + part.shape[1], dtype=np.int64)[None]
            binding = self.sessions[contract.PREFILL].io_binding()
            binding.bind_cpu_input("input_ids", part)
            binding.bind_cpu_input("position_ids", positions)
            binding.bind_output("logits", "cpu")
            logits = self._run(contract.PREFILL, binding).numpy()
            self.position += part.shape[1]
        return logits


class FloorRunner:
    """The floor graph in ONNX Runtime with IO binding, bound once, and its prefill form (a prompt's
    dense matmuls in one run, lm_head on the last token) over the same one copy of the weights."""

    def __init__(self, dec: DecoderWeights, threads: int, optimization: str = "all"):
        import onnxruntime as ort

        # the runtime opens fp32 bundles without weight prepacking (ort_backend.open_sessions); one
        # token's matmuls are then ONNX Runtime's matrix-vector kernel, faster than the packed one.
        # The prefill form runs as the runtime runs a bundle's prefill graph, so it bounds that graph
        sessions = open_shared_sessions({kind: lambda store, kind=kind: build_floor_graph(dec, kind, store)
                                         for kind in contract.GRAPH_KINDS}, threads, optimization, prepack=False)
        self.weights = sessions.pop("weights")
        self.session = sessions[contract.STEP]
        self.prefill_session = sessions[contract.PREFILL]
        self._ids = np.zeros((1, 1), np.int64)
        self._logits = np.zeros((1, 1, dec.vocab_size), np.float32)
        self.binding = self.session.io_binding()
        self.binding.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(self._ids))
        self.binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self._logits))

    def step(self, token: int) -> np.ndarray:
        self._ids[0, 0] = token
        self.session.run_with_iobinding(self.binding)
        return self._logits

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        """The prompt's dense matmuls → the last token's logits ``[1, 1, V]``."""
        return self.prefill_session.run(None, {"input_ids": np.asarray(ids, np.int64).reshape(1, -1)})[0]
