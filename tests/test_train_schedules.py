"""The LR factor of :func:`kosmos_g.train.schedules.warmup_decay`, every shape, against references."""

from __future__ import annotations

import math

import pytest
import torch

from kosmos_g.train.schedules import warmup_decay

STEPS = (0, 1, 3, 4, 5, 9, 12, 19, 20, 21, 40)
WARMUP, TOTAL = 4, 20


def old_trainer_factor(warmup: int, total: int, schedule: str = "linear"):
    """The trainer's factor before this module existed (kept verbatim as the reference)."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return step / warmup
        if schedule == "constant":
            return 1.0
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def micro_factor(warmup: int, total: int, floor: float = 0.1):
    """The micro world's own trainers' factor (linear warm-up from 1/warmup, half-cosine to ``floor``)."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return f


@pytest.mark.parametrize("warmup, total", [(WARMUP, TOTAL), (0, TOTAL), (7, 7), (3, 1000)])
@pytest.mark.parametrize("shape", ["linear", "constant"])
def test_trainer_shapes_equal_the_old_helper_bit_for_bit(warmup, total, shape):
    new = warmup_decay(warmup, total, shape, warmup_from_zero=True)
    old = old_trainer_factor(warmup, total, shape)
    assert [new(s) for s in range(total + 10)] == [old(s) for s in range(total + 10)]


@pytest.mark.parametrize("warmup, total", [(WARMUP, TOTAL), (0, TOTAL), (7, 7), (300, 6000)])
def test_cosine_with_a_floor_equals_the_micro_trainers_bit_for_bit(warmup, total):
    new, old = warmup_decay(warmup, total, "cosine", floor=0.1), micro_factor(warmup, total)
    assert [new(s) for s in range(total + 10)] == [old(s) for s in range(total + 10)]


def test_values_at_chosen_steps():
    lin0 = warmup_decay(WARMUP, TOTAL, "linear", warmup_from_zero=True)
    assert [lin0(s) for s in STEPS] == [0.0, 0.25, 0.75, 1.0, 15 / 16, 11 / 16, 0.5, 1 / 16, 0.0, 0.0, 0.0]
    lin = warmup_decay(WARMUP, TOTAL)  # warm-up from 1/warmup, decay to 0
    assert [lin(s) for s in STEPS[:4]] == [0.25, 0.5, 1.0, 1.0]
    floored = warmup_decay(WARMUP, TOTAL, "linear", floor=0.2)
    assert floored(12) == pytest.approx(0.2 + 0.8 * 0.5) and floored(20) == floored(40) == pytest.approx(0.2)
    const = warmup_decay(WARMUP, TOTAL, "constant")
    assert [const(s) for s in STEPS] == [0.25, 0.5, 1.0] + [1.0] * 8
    cos = warmup_decay(WARMUP, TOTAL, "cosine", floor=0.1)
    assert [cos(s) for s in (0, 3, 4)] == [0.25, 1.0, 1.0]
    assert cos(12) == pytest.approx(0.55) and cos(20) == pytest.approx(0.1) and cos(40) == pytest.approx(0.1)
    assert warmup_decay(0, TOTAL, "cosine")(TOTAL) == pytest.approx(0.0)


def test_drives_lambda_lr():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_decay(2, 6, "linear", warmup_from_zero=True))
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [0.0, 1.0, 2.0, 1.5, 1.0, 0.5, 0.0]


@pytest.mark.parametrize("kwargs, match", [
    ({"warmup": -1, "total": 10}, "warmup must be >= 0"),
    ({"warmup": 0, "total": 10, "shape": "step"}, "shape must be one of"),
    ({"warmup": 0, "total": 10, "floor": 1.5}, r"floor must be in \[0, 1\]"),
])
def test_bad_arguments_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        warmup_decay(**kwargs)
