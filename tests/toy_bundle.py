"""A tiny contract-conforming bundle built in code (seeded): step.onnx, prefill.onnx, a BPE
tokenizer trained on a few lines, tokenizer_config.json and runtime.json.

The model is a real linear-attention recurrence, so prefill-vs-step and batched-vs-alone checks
mean something: per layer and KV head, phi(x) = relu(W x),
    S += phi(k) v^T,  z += phi(k),  out = phi(q)^T S / max(phi(q)^T z, eps)
with a residual stream, a learned position table (so max_position is real) and an unembedding.
The prefill graph is the same graph with T dynamic (CumSum over T, then the last position).

    bundle = build_toy_bundle(tmp_path / "bundle")
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from t2r_export import contract

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")     # ids 0, 1, 2
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
EPS = 1e-2
TRAINING_TEXT = [
    "def main():\n    return 0\n",
    "import os\nimport sys\nprint('hello world')\n",
    "for i in range(10):\n    print(i * i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n",
    "héllo wörld — naïve café ✓ 日本語 ünïcödé",
    "the quick brown fox jumps over the lazy dog\n" * 3,
]


def build_toy_bundle(out: Path, *, num_layers: int = 2, num_kv_heads: int = 2, feature_dim: int = 4,
                     head_dim: int = 3, max_position: int | None = 128, model_vocab: int | None = None,
                     tokenizer_vocab: int = 300, seed: int = 0) -> Path:
    """Write a toy bundle to ``out`` and return it. ``model_vocab`` < the tokenizer's makes some ids invalid."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_toy_tokenizer(tokenizer_vocab)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "add_bos_token": False}, indent=2))
    vocab = model_vocab or tokenizer.get_vocab_size()
    shape = contract.StateShape(num_layers, num_kv_heads, feature_dim, head_dim, vocab)
    weights = toy_weights(shape, max_position or 1024, seed)
    for kind in contract.GRAPH_KINDS:
        model = toy_graph(shape, weights, kind)
        (out / f"{kind}.onnx").write_bytes(model.SerializeToString())
    (out / "runtime.json").write_text(json.dumps(toy_runtime_json(shape, max_position), indent=2))
    return out


def train_toy_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer)
    # the tokenizer adds BOS itself, as Llama tokenizers do
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS_ID)])
    return tokenizer


def toy_runtime_json(shape: contract.StateShape, max_position: int | None) -> dict:
    graphs = {kind: {"file": f"{kind}.onnx",
                     "inputs": [s.name for s in contract.graph_inputs(shape, kind)],
                     "outputs": [s.name for s in contract.graph_outputs(shape, kind)]}
              for kind in contract.GRAPH_KINDS}
    return {
        "format": contract.FORMAT, "format_version": contract.FORMAT_VERSION, "architecture": "llama",
        "num_layers": shape.num_layers, "num_heads": 2 * shape.num_kv_heads, "num_kv_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim, "feature_dim": shape.feature_dim, "vocab_size": shape.vocab_size,
        "max_position": max_position, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
        "state_dtype": "float32", "precision": "fp32", "opset": contract.OPSET, "graphs": graphs,
        "tools": {"toy_bundle": "1"}, "source_checkpoint_sha256": "0" * 64,
    }


def toy_weights(shape: contract.StateShape, positions: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, k, dv = shape.num_kv_heads, shape.feature_dim, shape.head_dim
    d = h * dv

    def normal(*dims, scale=1.0):
        return (rng.standard_normal(dims) * scale).astype(np.float32)

    weights = {"embed": normal(shape.vocab_size, d), "positions": normal(positions, d),
               "unembed": normal(d, shape.vocab_size, scale=3 / np.sqrt(d))}
    for layer in range(shape.num_layers):
        weights[f"wq.{layer}"] = normal(d, h * k, scale=1 / np.sqrt(d))
        weights[f"wk.{layer}"] = normal(d, h * k, scale=1 / np.sqrt(d))
        weights[f"wv.{layer}"] = normal(d, h * dv, scale=1 / np.sqrt(d))
        weights[f"wo.{layer}"] = normal(h * dv, d, scale=1 / np.sqrt(d))
    return weights


def toy_graph(shape: contract.StateShape, weights: dict[str, np.ndarray], kind: str):
    from onnx import TensorProto, helper, numpy_helper

    h, k, dv = shape.num_kv_heads, shape.feature_dim, shape.head_dim
    consts = {"eps": np.array(EPS, np.float32), "axis_t": np.array(1, np.int64), "last": np.array(-1, np.int64),
              "ax1": np.array([1], np.int64), "ax3": np.array([3], np.int64), "ax4": np.array([4], np.int64),
              "shape_hk": np.array([0, 0, h, k], np.int64), "shape_hv": np.array([0, 0, h, dv], np.int64),
              "shape_d": np.array([0, 0, h * dv], np.int64)}
    initializers = [numpy_helper.from_array(v, name) for name, v in {**weights, **consts}.items()]
    nodes = []

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name], **attrs))
        return name

    x = node("Add", [node("Gather", ["embed", "input_ids"], "tok_emb"),
                     node("Gather", ["positions", "position_ids"], "pos_emb")], "x.0")
    for i in range(shape.num_layers):
        def heads(weight, shape_name, relu):
            y = node("Reshape", [node("MatMul", [x, f"{weight}.{i}"], f"{weight}.{i}.mm"), shape_name],
                     f"{weight}.{i}.heads")
            return node("Relu", [y], f"{weight}.{i}.phi") if relu else y

        phi_q, phi_k, v = heads("wq", "shape_hk", True), heads("wk", "shape_hk", True), heads("wv", "shape_hv", False)
        kv = node("Mul", [node("Unsqueeze", [phi_k, "ax4"], f"k4.{i}"), node("Unsqueeze", [v, "ax3"], f"v3.{i}")],
                  f"kv.{i}")
        s = node("Add", [node("CumSum", [kv, "axis_t"], f"cs.{i}"),
                         node("Unsqueeze", [contract.past_name(i, "s"), "ax1"], f"ps.{i}")], f"S.{i}")
        z = node("Add", [node("CumSum", [phi_k, "axis_t"], f"cz.{i}"),
                         node("Unsqueeze", [contract.past_name(i, "z"), "ax1"], f"pz.{i}")], f"Z.{i}")
        num = node("ReduceSum", [node("Mul", [node("Unsqueeze", [phi_q, "ax4"], f"q4.{i}"), s], f"qs.{i}"), "ax3"],
                   f"num.{i}", keepdims=0)
        den = node("Max", [node("ReduceSum", [node("Mul", [phi_q, z], f"qz.{i}"), "ax3"], f"qzs.{i}", keepdims=1),
                           "eps"], f"den.{i}")
        att = node("Reshape", [node("Div", [num, den], f"att.{i}"), "shape_d"], f"attd.{i}")
        x = node("Add", [x, node("MatMul", [att, f"wo.{i}"], f"proj.{i}")], f"x.{i + 1}")
        node("Gather", [s, "last"], contract.present_name(i, "s"), axis=1)
        node("Gather", [z, "last"], contract.present_name(i, "z"), axis=1)
    node("MatMul", [node("Gather", [x, "last"], "x.last", axis=1), "unembed"], "logits")

    onnx_types = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64}

    def value_info(spec):
        return helper.make_tensor_value_info(spec.name, onnx_types[spec.dtype], list(spec.shape))

    graph = helper.make_graph(nodes, f"toy_{kind}", [value_info(s) for s in contract.graph_inputs(shape, kind)],
                              [value_info(s) for s in contract.graph_outputs(shape, kind)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", contract.OPSET)],
                              producer_name="t2r-export-tests")
    model.ir_version = 8
    return model
