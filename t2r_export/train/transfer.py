"""Attention transfer, LoLCATs' stage 1: teach the new attention parameters to reproduce softmax attention.

Everything but the feature maps (the only new parameters: phi of every layer, hedgehog or t2r,
with or without the sliding window) is frozen. One forward of the teacher-forced model gives every
layer's loss at once: each attention function computes its linear (or hybrid) output, appends
MSE(that output, the layer's softmax attention output) through the ``t2r_transfer`` keyword, and
hands the SOFTMAX output on, so every layer sees the teacher's activations and is trained on its
own (layer by layer, but in one pass). The loss is the mean over layers.
"""

from __future__ import annotations

import torch

from t2r_export.models.attention import FEATURE_MAP_ATTR


class LayerLosses:
    """Collects each layer's loss through the ``t2r_transfer`` keyword.

    Not a list on purpose: FSDP, and DDP on GPUs, rebuild list/tuple/dict arguments on their way to
    the modules, and appends to a rebuilt list are lost; an opaque object passes through as is.
    """

    def __init__(self):
        self.values: list[torch.Tensor] = []

    def append(self, loss: torch.Tensor) -> None:
        self.values.append(loss)


def transfer_parameters(model) -> list[torch.nn.Parameter]:
    """What stage 1 trains: the feature maps' parameters (t2r, hedgehog), nothing else."""
    return [p for name, p in model.named_parameters() if FEATURE_MAP_ATTR in name]


def freeze_for_transfer(model, feature_map: str) -> None:
    """requires_grad only on ``transfer_parameters``; one clear error when the map has none."""
    model.requires_grad_(False)
    params = transfer_parameters(model)
    if not params:
        raise ValueError(f"feature map {feature_map!r} has no parameters to train; attention transfer needs "
                         "a learned map ('t2r' or 'hedgehog')")
    for p in params:
        p.requires_grad_(True)


def layer_transfer_losses(model, batch: torch.Tensor) -> list[torch.Tensor]:
    """One teacher-forced forward over ``batch[:, :-1]``; every layer's MSE to its softmax output."""
    losses = LayerLosses()
    # logits are not needed: keep only the last position's
    model(batch[:, :-1], t2r_transfer=losses, logits_to_keep=1)
    # counted by name, so it works through DDP / peft wrappers
    expected = sum(name.endswith(FEATURE_MAP_ATTR) for name, _ in model.named_modules())
    if len(losses.values) != expected:
        raise RuntimeError(f"attention transfer collected {len(losses.values)} of {expected} layer losses")
    return losses.values


def attention_transfer_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Mean over layers of MSE(linear or hybrid attention output, softmax attention output)."""
    return torch.stack(layer_transfer_losses(model, batch)).mean()


@torch.no_grad()
def transfer_report(model, batch: torch.Tensor) -> list[float]:
    """Per-layer MSE on one batch, without gradients: which layers the feature maps fit worst."""
    was_training = model.training
    model.eval()
    try:
        return [float(x) for x in layer_transfer_losses(model, batch)]
    finally:
        model.train(was_training)
