"""Training losses shared by the recipes (attention transfer's layer loss lives with the transfer stage)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``batch [B, L+1]`` (inputs ``[:, :-1]``, targets ``[:, 1:]``), in fp32."""
    logits = model(batch[:, :-1]).logits
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
