"""One small declarative entry per supported ``model_type``: the only description of an architecture.

An adapter says where the decoder layers and their attention modules live, whether the
architecture rotates q/k (RoPE, applied by HF before our attention function sees q/k), which HF
classes to subclass, and (``weights``) where every weight the ONNX exporter reads lives and how it
is laid out. The swap, the weight extractor and the graph builder read these entries and nothing
else: no other module knows ``model.model.layers`` or ``model.transformer``. Nothing here is guessed
by try/except: an unknown model_type is an error.
"""

from __future__ import annotations

from dataclasses import dataclass

# how an architecture stores its q/k/v projection weights
QKV_LAYOUTS = ("separate", "blocks", "per_head")


@dataclass(frozen=True)
class WeightLayout:
    """Where the exporter finds each weight; module paths are dotted, from the causal LM or a layer."""

    embed: str                     # token embedding, from the causal LM
    final_norm: str                # from the causal LM
    norm: str                      # "rms" | "layer"
    norm1: str                     # per layer: the norm before attention
    norm2: str                     # per layer: the norm before the MLP
    qkv: tuple[str, ...]           # per attention module: (q, k, v) projections, or the one fused projection
    # "separate": three nn.Linear; "blocks": one [q | k | v] projection; "per_head": one projection
    # whose rows are ordered [H, 3, d] (GPT-NeoX)
    qkv_layout: str
    o: str                         # per attention module: the output projection
    mlp: str                       # per layer: the MLP module
    mlp_in: tuple[str, ...]        # per MLP: (gate, up) for a gated MLP, (up,) for a plain one
    mlp_out: str                   # per MLP
    act_field: str                 # config field naming the activation
    pos_embed: str | None = None   # learned position table, from the causal LM
    rotary_emb: str | None = None  # module holding inv_freq, from the causal LM
    # GPT-2's Conv1D stores weights as [in, out] already (nn.Linear stores [out, in])
    conv1d: bool = False
    parallel_residual_field: str | None = None   # config field switching the parallel residual

    @property
    def gated(self) -> bool:
        return len(self.mlp_in) == 2


@dataclass(frozen=True)
class ArchitectureAdapter:
    model_type: str
    config_class: str          # transformers config class to subclass
    model_class: str           # transformers *ForCausalLM class to subclass
    layers: str                # dotted path from the causal LM to the decoder layer list
    attention: str             # attribute of a decoder layer holding the attention module
    rope: bool                 # positions enter through rotary embeddings (else learned)
    weights: WeightLayout


ADAPTERS: dict[str, ArchitectureAdapter] = {}


def register_adapter(adapter: ArchitectureAdapter) -> ArchitectureAdapter:
    if adapter.weights.qkv_layout not in QKV_LAYOUTS:
        raise ValueError(f"adapter {adapter.model_type!r}: unknown qkv_layout {adapter.weights.qkv_layout!r}; "
                         f"expected one of {', '.join(QKV_LAYOUTS)}")
    if adapter.rope != (adapter.weights.rotary_emb is not None):
        raise ValueError(f"adapter {adapter.model_type!r}: rope={adapter.rope} needs rotary_emb set exactly then")
    ADAPTERS[adapter.model_type] = adapter
    return adapter


# llama, mistral, qwen2: RMSNorm, RoPE, GQA, SwiGLU; optional q/k/v (and o) biases
_LLAMA_WEIGHTS = WeightLayout(
    embed="model.embed_tokens", final_norm="model.norm", norm="rms", norm1="input_layernorm",
    norm2="post_attention_layernorm", qkv=("q_proj", "k_proj", "v_proj"), qkv_layout="separate", o="o_proj",
    mlp="mlp", mlp_in=("gate_proj", "up_proj"), mlp_out="down_proj", act_field="hidden_act",
    rotary_emb="model.rotary_emb")

for _adapter in (
    # GPT-2: LayerNorm, learned positions, Conv1D fused c_attn, GELU MLP
    ArchitectureAdapter("gpt2", "GPT2Config", "GPT2LMHeadModel", "transformer.h", "attn", rope=False,
                        weights=WeightLayout(
                            embed="transformer.wte", pos_embed="transformer.wpe", final_norm="transformer.ln_f",
                            norm="layer", norm1="ln_1", norm2="ln_2", qkv=("c_attn",), qkv_layout="blocks",
                            o="c_proj", mlp="mlp", mlp_in=("c_fc",), mlp_out="c_proj",
                            act_field="activation_function", conv1d=True)),
    # GPT-NeoX: LayerNorm, partial rotary, per-head interleaved fused qkv, (parallel) residual
    ArchitectureAdapter("gpt_neox", "GPTNeoXConfig", "GPTNeoXForCausalLM", "gpt_neox.layers", "attention",
                        rope=True, weights=WeightLayout(
                            embed="gpt_neox.embed_in", final_norm="gpt_neox.final_layer_norm", norm="layer",
                            norm1="input_layernorm", norm2="post_attention_layernorm", qkv=("query_key_value",),
                            qkv_layout="per_head", o="dense", mlp="mlp", mlp_in=("dense_h_to_4h",),
                            mlp_out="dense_4h_to_h", act_field="hidden_act", rotary_emb="gpt_neox.rotary_emb",
                            parallel_residual_field="use_parallel_residual")),
    ArchitectureAdapter("llama", "LlamaConfig", "LlamaForCausalLM", "model.layers", "self_attn", rope=True,
                        weights=_LLAMA_WEIGHTS),
    ArchitectureAdapter("mistral", "MistralConfig", "MistralForCausalLM", "model.layers", "self_attn", rope=True,
                        weights=_LLAMA_WEIGHTS),
    ArchitectureAdapter("qwen2", "Qwen2Config", "Qwen2ForCausalLM", "model.layers", "self_attn", rope=True,
                        weights=_LLAMA_WEIGHTS),
):
    register_adapter(_adapter)

T2R_PREFIX = "t2r_"


def supported() -> str:
    return ", ".join(sorted(ADAPTERS))


def base_model_type(model_type: str) -> str:
    """'t2r_llama' -> 'llama'; plain types pass through."""
    return model_type[len(T2R_PREFIX):] if model_type.startswith(T2R_PREFIX) else model_type


def get_adapter(model_type: str) -> ArchitectureAdapter:
    adapter = ADAPTERS.get(base_model_type(model_type))
    if adapter is None:
        raise ValueError(f"unsupported architecture {model_type!r}; supported: {supported()}")
    return adapter


def resolve(root, path: str):
    """The module at dotted ``path`` below ``root`` (``resolve(model, "model.layers")``)."""
    for part in path.split("."):
        root = getattr(root, part)
    return root


def attention_dims(config) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim) from any supported HF config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim
