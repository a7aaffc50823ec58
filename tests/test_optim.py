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
