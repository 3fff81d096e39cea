"""Torch-side prefill and one-token decode of a T2R model with an explicit state.

These are the reference the exported graphs are verified against, and the torch decode path
that `bench` times. Both go through the model's own forward (HF modules + our attention
function), so there is no second copy of any architecture's math here.
"""

from __future__ import annotations

import torch

from ..architectures import attention_dims
from .attention import FEATURE_MAP_ATTR, RecurrentState
from .swap import attention_modules


def new_state(model, batch: int = 1) -> RecurrentState:
    _, kv_heads, head_dim = attention_dims(model.config)
    attn = attention_modules(model)
    fm = getattr(attn[0], FEATURE_MAP_ATTR)
    device = next(model.parameters()).device
    return RecurrentState.zeros(len(attn), batch, kv_heads, fm.feature_dim, head_dim, device=device,
                                window=fm.window)


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, state: RecurrentState, position_offset: int = 0,
            form: str | None = None) -> torch.Tensor:
    """Consume input_ids [B, T] from ``state`` (updated in place); returns logits [B, V] of the last token."""
    t = input_ids.shape[1]
    positions = torch.arange(position_offset, position_offset + t, device=input_ids.device)
    positions = positions.unsqueeze(0).expand(input_ids.shape[0], -1)
    out = model(input_ids=input_ids, position_ids=positions, t2r_state=state, t2r_form=form,
                use_cache=False, logits_to_keep=1)
    return out.logits[:, -1]


@torch.no_grad()
def decode_step(model, input_ids: torch.Tensor, position_ids: torch.Tensor,
                state: RecurrentState) -> torch.Tensor:
    """One token per row: input_ids/position_ids [B, 1]; state updated in place; returns logits [B, V]."""
    out = model(input_ids=input_ids, position_ids=position_ids, t2r_state=state, use_cache=False,
                logits_to_keep=1)
    return out.logits[:, -1]
