"""One small declarative entry per supported ``model_type``.

An adapter says where the decoder layers and their attention modules live, whether the
architecture rotates q/k (RoPE, applied by HF before our attention function sees q/k), and
which HF classes to subclass. The ONNX graph builder keys its per-architecture code on the
same names. Nothing here is guessed by try/except: an unknown model_type is an error.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchitectureAdapter:
    model_type: str
    config_class: str          # transformers config class to subclass
    model_class: str           # transformers *ForCausalLM class to subclass
    layers: str                # dotted path from the causal LM to the decoder layer list
    attention: str             # attribute of a decoder layer holding the attention module
    rope: bool                 # positions enter through rotary embeddings (else learned)


ADAPTERS: dict[str, ArchitectureAdapter] = {}


def register_adapter(adapter: ArchitectureAdapter) -> ArchitectureAdapter:
    ADAPTERS[adapter.model_type] = adapter
    return adapter


for _adapter in (
    ArchitectureAdapter("gpt2", "GPT2Config", "GPT2LMHeadModel", "transformer.h", "attn", rope=False),
    ArchitectureAdapter("gpt_neox", "GPTNeoXConfig", "GPTNeoXForCausalLM", "gpt_neox.layers", "attention", rope=True),
    ArchitectureAdapter("llama", "LlamaConfig", "LlamaForCausalLM", "model.layers", "self_attn", rope=True),
    ArchitectureAdapter("mistral", "MistralConfig", "MistralForCausalLM", "model.layers", "self_attn", rope=True),
    ArchitectureAdapter("qwen2", "Qwen2Config", "Qwen2ForCausalLM", "model.layers", "self_attn", rope=True),
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


def attention_dims(config) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim) from any supported HF config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim
