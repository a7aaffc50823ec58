"""Optimiser construction: per-optimiser weight-decay defaults and the no-decay groups."""

import pytest
import torch
from torch import nn

from seg.engine.optim import DEFAULT_WEIGHT_DECAY, build_optimizer


def _decays(optimizer) -> set[float]:
    return {group["weight_decay"] for group in optimizer.param_groups if group["params"][0].ndim > 1}


@pytest.mark.parametrize("name, cls, decay", [("sgd", torch.optim.SGD, 4e-5), ("adamw", torch.optim.AdamW, 1e-2)])
def test_weight_decay_default_depends_on_the_optimiser(name, cls, decay):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    optimizer = build_optimizer(model, name, 0.1)
    assert isinstance(optimizer, cls) and DEFAULT_WEIGHT_DECAY[name] == decay
    assert _decays(optimizer) == {decay}
    assert {g["weight_decay"] for g in optimizer.param_groups if g["params"][0].ndim == 1} == {0.0}  # BN, biases
    assert _decays(build_optimizer(model, name, 0.1, weight_decay=0.5)) == {0.5}  # an explicit value wins


def test_unknown_optimiser_is_named():
    with pytest.raises(ValueError, match="'adam'"):
        build_optimizer(nn.Linear(2, 2), "adam", 0.1)


def test_poly_schedule_warms_up_linearly_from_a_tenth_then_decays_with_power_0_9():
    """optim.schedule=poly (the default): lr * (0.1 + 0.9 * t / W) for t < W, then lr * (1 - t / T)^0.9."""
    from seg.engine.optim import build_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.01)
    scheduler = build_scheduler(optimizer, total_iters=10, warmup_iters=4)
    got = [optimizer.param_groups[0]["lr"]]
    for _ in range(10):
        optimizer.step()  # no gradient, no change: only the order torch expects
        scheduler.step()
        got.append(optimizer.param_groups[0]["lr"])
    want = [0.01 * (0.1 + 0.9 * t / 4) for t in range(4)] + [0.01 * (1 - t / 10) ** 0.9 for t in range(4, 11)]
    assert got == pytest.approx(want, abs=1e-12) and got[-1] == 0.0


def test_cosine_schedule_by_iteration_matches_the_formula_and_resumes():
    """optim.schedule=cosine: linear warm-up from 0.1x, then 0.5 * lr * (1 + cos(pi * t / T)), hand-computed."""
    import math

    from seg.engine.optim import CosineByIteration, build_scheduler

    def lrs(scheduler, optimizer, steps):
        out = []
        for _ in range(steps):
            scheduler.step()
            out.append(optimizer.param_groups[0]["lr"])
        return out

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.05)
    scheduler = build_scheduler(optimizer, total_iters=10, warmup_iters=2, schedule="cosine")
    assert isinstance(scheduler, CosineByIteration) and optimizer.param_groups[0]["lr"] == pytest.approx(0.005)
    got = lrs(scheduler, optimizer, 10)
    want = [0.005 + 0.045 * 1 / 2] + [0.025 * (1 + math.cos(math.pi * t / 10)) for t in range(2, 11)]
    assert got == pytest.approx(want)
    # a resumed scheduler continues where the state says, as LambdaLR does
    other = torch.optim.SGD([param], lr=0.05)
    resumed = build_scheduler(other, total_iters=10, warmup_iters=2, schedule="cosine")
    first = build_scheduler(torch.optim.SGD([param], lr=0.05), total_iters=10, warmup_iters=2, schedule="cosine")
    for _ in range(4):
        first.step()
    resumed.load_state_dict(first.state_dict())
    assert other.param_groups[0]["lr"] == pytest.approx(want[3]) and lrs(resumed, other, 6) == pytest.approx(want[4:])
