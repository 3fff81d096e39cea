"""T2R models: feature maps attached to HF causal LMs, plus their save/load and decode helpers."""

from ..architectures import ADAPTERS, ArchitectureAdapter, attention_dims, get_adapter
from .attention import RecurrentState
from .config import T2RConfig
from .recurrent import decode_step, new_state, prefill
from .swap import (is_t2r_model, load_causal_lm, load_model_config, load_t2r_model, register_auto_classes,
                   swap_attention, swap_summary)

register_auto_classes()

__all__ = [
    "ADAPTERS", "ArchitectureAdapter", "RecurrentState", "T2RConfig", "attention_dims", "decode_step",
    "get_adapter", "is_t2r_model", "load_causal_lm", "load_model_config", "load_t2r_model", "new_state", "prefill",
    "register_auto_classes", "swap_attention", "swap_summary",
]
