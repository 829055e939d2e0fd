"""Learning-rate schedules: linear warm-up, then a decay, as a ``LambdaLR`` factor.

One helper serves the stage trainer (linear decay to 0, or constant, as the paper's
fairseq runs) and the micro world's own trainers (half-cosine to a floor).

Example:
    >>> import torch
    >>> from kosmos_g.train.schedules import warmup_decay
    >>> opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_decay(100, 1000, "cosine", floor=0.1))
    >>> f = warmup_decay(4, 20, "linear")
    >>> [f(s) for s in (0, 3, 12, 20)]
    [0.25, 1.0, 0.5, 0.0]
"""

from __future__ import annotations

import math
from typing import Callable

SHAPES = ("linear", "constant", "cosine")


def warmup_decay(warmup: int, total: int, shape: str = "linear", floor: float = 0.0, *,
                 warmup_from_zero: bool = False) -> Callable[[int], float]:
    """The LR factor of optimizer step ``step`` (0-based), for ``torch.optim.lr_scheduler.LambdaLR``.

    Args:
        warmup: steps of linear warm-up. The factor is ``(step + 1) / warmup`` (the first
            step already trains, the peak is reached at step ``warmup - 1``) or, with
            ``warmup_from_zero``, ``step / warmup`` (the first step runs at factor 0; what
            the stage trainer has always done, so its runs reproduce).
        total: the step at which the decay reaches ``floor`` (it stays there after).
        shape: after warm-up, ``"linear"`` to ``floor`` at ``total``, ``"constant"`` at 1
            (``floor`` unused), or ``"cosine"``: half a cosine from 1 to ``floor`` at ``total``.
        floor: the factor at and after ``total``, in [0, 1].

    Example:
        >>> f = warmup_decay(4, 20, "cosine", floor=0.1)
        >>> [round(f(s), 4) for s in (0, 3, 12, 20, 30)]
        [0.25, 1.0, 0.55, 0.1, 0.1]
    """
    if warmup < 0 or total < 0:
        raise ValueError(f"warmup must be >= 0 and total >= 0, got warmup={warmup}, total={total}.")
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}.")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must be in [0, 1], got {floor}.")
    offset = 0 if warmup_from_zero else 1
    span = max(1, total - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + offset) / warmup
        if shape == "constant":
            return 1.0
        if shape == "cosine":
            t = min(1.0, (step - warmup) / span)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
        return floor + (1 - floor) * max(0.0, (total - step) / span)

    return factor
