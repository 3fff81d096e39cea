"""The learning-rate schedule of both recipes: linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import math


def warmup_cosine(step: int, steps: int, warmup_steps: int, peak: float, floor: float) -> float:
    """The rate at optimizer step ``step`` (0-based): ``peak * (step + 1) / warmup_steps`` while warming
    up, then cosine from ``peak`` to ``floor`` at ``steps`` (held there after).

    With ``peak = 1`` and ``floor`` a ratio it is the factor for ``torch.optim.lr_scheduler.LambdaLR``.
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return floor + 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))) * (peak - floor)
