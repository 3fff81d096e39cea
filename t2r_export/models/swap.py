"""Swap softmax attention for T2R linear attention, and save / load the result.

``swap_attention(model, T2RConfig())`` converts a supported HF causal LM in place: each attention
module gets a ``t2r_feature_map`` (the only new parameters), the config records the T2R settings
and ``attn_implementation`` becomes "t2r". The model's class becomes a registered subclass
(``T2RLlamaForCausalLM``, model_type "t2r_llama", ...), so ``save_pretrained`` writes a config that
``AutoModelForCausalLM.from_pretrained`` rebuilds once ``t2r_export.models`` is imported.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from ..ops.feature_maps import FeatureMap
from ..architectures import ADAPTERS, T2R_PREFIX, ArchitectureAdapter, attention_dims, get_adapter, resolve
from .attention import ATTN_IMPLEMENTATION, FEATURE_MAP_ATTR, register_attention_function
from .config import T2RConfig

logger = logging.getLogger(__name__)

_T2R_CLASSES: dict[str, tuple[type, type]] = {}


def decoder_layers(model, adapter: ArchitectureAdapter):
    return resolve(model, adapter.layers)


def attention_modules(model) -> list:
    adapter = get_adapter(model.config.model_type)
    return [getattr(layer, adapter.attention) for layer in decoder_layers(model, adapter)]


def _attach_feature_maps(model, cfg: T2RConfig) -> int:
    """Add one FeatureMap per attention module; returns the number of parameters added."""
    _, kv_heads, head_dim = attention_dims(model.config)
    added = 0
    ref = next(model.parameters())
    for i, attn in enumerate(attention_modules(model)):
        fm = FeatureMap(cfg.feature_map, kv_heads, head_dim, cfg.feature_dim, cfg.init, seed=cfg.seed + i,
                        eps=cfg.eps, chunk_size=cfg.chunk_size, window=cfg.window, decay=cfg.decay)
        fm.to(device=ref.device, dtype=ref.dtype)
        setattr(attn, FEATURE_MAP_ATTR, fm)
        added += sum(p.numel() for p in fm.parameters())
    return added


def _make_t2r_classes(adapter: ArchitectureAdapter) -> tuple[type, type]:
    """Subclasses of the HF config/model classes, registered with the Auto classes."""
    if adapter.model_type in _T2R_CLASSES:
        return _T2R_CLASSES[adapter.model_type]
    base_config = getattr(transformers, adapter.config_class)
    base_model = getattr(transformers, adapter.model_class)
    model_type = T2R_PREFIX + adapter.model_type
    config_cls = type("T2R" + adapter.config_class, (base_config,), {"model_type": model_type})

    def __init__(self, config):
        base_model.__init__(self, config)
        _attach_feature_maps(self, T2RConfig.from_dict(config.t2r))

    def _check_and_adjust_attn_implementation(self, attn_implementation=None, is_init_check=False, **kwargs):
        # a T2R model has exactly one attention implementation: ours
        return ATTN_IMPLEMENTATION

    model_cls = type("T2R" + adapter.model_class, (base_model,), {
        "config_class": config_cls,
        "__init__": __init__,
        "_check_and_adjust_attn_implementation": _check_and_adjust_attn_implementation,
        "__module__": __name__,
    })
    AutoConfig.register(model_type, config_cls, exist_ok=True)
    AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
    _T2R_CLASSES[adapter.model_type] = (config_cls, model_cls)
    return config_cls, model_cls


def register_auto_classes() -> None:
    register_attention_function()
    for adapter in ADAPTERS.values():
        _make_t2r_classes(adapter)


def is_t2r_model(model) -> bool:
    return getattr(model.config, "t2r", None) is not None


def max_positions(config) -> int | None:
    """The longest sequence the model's positions cover, or None when nothing bounds it."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def check_window(config, window: int) -> None:
    """A window longer than the model's positions would never fill: one clear error."""
    positions = max_positions(config)
    if positions is not None and window > positions:
        raise ValueError(f"window {window} exceeds the model's {positions} positions; expected 0 (off) to "
                         f"{positions}")


def swap_attention(model: PreTrainedModel, cfg: T2RConfig | None = None) -> PreTrainedModel:
    """Replace every self-attention of ``model`` by T2R linear attention, in place; returns it.

    All pretrained weights are kept bit-identical; only the feature maps are added.
    """
    cfg = cfg or T2RConfig()
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"expected a Hugging Face causal LM (a *ForCausalLM model), got {type(model).__name__}")
    if is_t2r_model(model):
        raise ValueError("model is already a T2R model; swap takes a softmax-attention model")
    adapter = get_adapter(model.config.model_type)
    if model.get_output_embeddings() is None:
        raise ValueError(f"expected a Hugging Face causal LM (a *ForCausalLM model), got {type(model).__name__}")
    if type(model).__name__ != adapter.model_class:
        raise ValueError(f"expected a {adapter.model_class} for model_type {adapter.model_type!r}, "
                         f"got {type(model).__name__}")
    check_window(model.config, cfg.window)
    register_auto_classes()
    config_cls, model_cls = _make_t2r_classes(adapter)
    added = _attach_feature_maps(model, cfg)
    model.config.__class__ = config_cls
    model.config.t2r = cfg.to_dict()
    # the recurrent state replaces the KV cache: HF must not build one
    model.config.use_cache = False
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.use_cache = False
    model.__class__ = model_cls
    model.config._attn_implementation_internal = ATTN_IMPLEMENTATION
    logger.info("swapped %d attention layers of %s (%s), +%d parameters", len(attention_modules(model)),
                adapter.model_type, cfg.feature_map, added)
    return model


def swap_summary(model) -> dict:
    heads, kv_heads, head_dim = attention_dims(model.config)
    fms = [getattr(a, FEATURE_MAP_ATTR) for a in attention_modules(model)]
    k = fms[0].feature_dim
    return {
        "architecture": get_adapter(model.config.model_type).model_type,
        "layers_swapped": len(fms),
        "parameters_added": sum(p.numel() for fm in fms for p in fm.parameters()),
        "parameters_total": sum(p.numel() for p in model.parameters()),
        "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "feature_dim": k,
        "window": fms[0].window,
        # S, z and, with a window, its keys, values and fill marks: all fp32
        "state_bytes_per_sequence": len(fms) * 4 * (kv_heads * k * (head_dim + 1)
                                                    + fms[0].window * (2 * kv_heads * head_dim + 1)),
        **{f"t2r.{key}": v for key, v in model.config.t2r.items()},
    }


def load_model_config(path: str | Path, trust_remote_code: bool = False):
    """The config of a supported causal LM (softmax or T2R) in a local directory, without its weights.

    Custom code named by the folder (``auto_map``) is refused unless ``trust_remote_code``; an
    unreadable config, an unknown architecture or a model that is no causal LM is one ValueError line.
    """
    from ..trust import check_remote_code

    register_auto_classes()
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"model directory not found: {path} (expected a directory with config.json "
                         "and model.safetensors)")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json; expected a Hugging Face model directory")
    check_remote_code(path, trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        text = (str(err).strip() or type(err).__name__).splitlines()[0][:200]
        raise ValueError(f"cannot read the model config {path / 'config.json'}: {text}") from None
    get_adapter(config.model_type)
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise ValueError(f"{path} holds a {', '.join(archs)}, not a causal LM (expected a *ForCausalLM "
                         "or *LMHeadModel checkpoint)")
    return config


def load_causal_lm(path: str | Path, trust_remote_code: bool = False, dtype=torch.float32) -> PreTrainedModel:
    """Load any supported causal LM (softmax or T2R) from a local directory, safetensors only.

    Custom code named by the folder (``auto_map``) is refused unless ``trust_remote_code``; damaged
    weights and config dimensions that do not match them are one ValueError line naming the file.
    """
    from .checkpoint_files import check_weight_files, shape_mismatches

    path = Path(path)
    config = load_model_config(path, trust_remote_code)
    files = check_weight_files(path)
    # compared on the meta device before loading, so transformers' own mismatch report never prints
    mismatches = shape_mismatches(config, files)
    if mismatches:
        more = f" (+{len(mismatches) - 1} more)" if len(mismatches) > 1 else ""
        raise ValueError(f"{path / 'config.json'} does not match the weights: {mismatches[0]}{more}")
    try:
        return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype=dtype,
                                                    trust_remote_code=trust_remote_code)
    except (RuntimeError, ValueError, OSError, TypeError) as err:
        text = (str(err).strip() or type(err).__name__).splitlines()[0][:200]
        raise ValueError(f"cannot load the weights in {path}: {text}") from None


def load_t2r_model(path: str | Path, trust_remote_code: bool = False) -> PreTrainedModel:
    """One call: a saved T2R model back, identical logits."""
    model = load_causal_lm(path, trust_remote_code=trust_remote_code)
    if not is_t2r_model(model):
        raise ValueError(f"{path} holds a softmax model, not a T2R model; run `t2r-export swap` first")
    return model
