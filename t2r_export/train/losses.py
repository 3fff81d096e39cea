"""Training losses shared by the recipes (attention transfer's layer loss lives with the transfer stage)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``batch [B, L+1]`` (inputs ``[:, :-1]``, targets ``[:, 1:]``), in fp32."""
    logits = model(batch[:, :-1]).logits
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())


def distillation_loss(teacher):
    """A loss function: mean KL(teacher || model) of the next-token distributions over ``batch [B, L+1]``'s
    inputs, in fp32. The teacher's whole distribution is a richer signal than the one observed token,
    so a short finetune recovers more of the teacher's quality (docs/training.md#distillation)."""

    def loss(model, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = F.log_softmax(teacher(batch[:, :-1]).logits.float(), dim=-1).flatten(0, 1)
        logits = model(batch[:, :-1]).logits.float().flatten(0, 1)
        return F.kl_div(F.log_softmax(logits, dim=-1), target, log_target=True, reduction="batchmean")

    return loss
