"""One training step by hand: the loss it minimises (cross-entropy over labelled pixels, plus
model.aux_weight times the aux head's) and the gradient clipping it applies (optim.grad_clip)."""

import math

import pytest
import torch
from torch import nn

import seg.engine.loop as engine
import train_seg
from seg.data.palette import IGNORE_INDEX
from seg.engine.loop import TrainState, segmentation_loss, train_step
from tests.test_kill_resume import run_args

LN3 = math.log(3.0)


def _maps() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two classes on a 1x3 image whose last pixel is void; logits chosen for by-hand softmaxes."""
    logits = torch.tensor([[0.0, 0.0, 9.0], [LN3, 0.0, -9.0]]).reshape(1, 2, 1, 3)  # p(1) = 3/4, 1/2
    aux = torch.tensor([[LN3, 0.0, 0.0], [0.0, 0.0, 0.0]]).reshape(1, 2, 1, 3)  # p(1) = 1/4; p(0) = 1/2
    target = torch.tensor([[[1, 0, IGNORE_INDEX]]])
    return logits, aux, target


def test_cross_entropy_averages_the_labelled_pixels_only():
    logits, _, target = _maps()
    # -log(3/4) and -log(1/2), over 2 pixels: the void pixel's confident wrong logits count for nothing
    expected = (math.log(4 / 3) + math.log(2)) / 2
    assert segmentation_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_aux_head_adds_its_loss_times_the_weight():
    logits, aux, target = _maps()
    main = (math.log(4 / 3) + math.log(2)) / 2
    aux_loss = (math.log(4) + math.log(2)) / 2  # -log(1/4) and -log(1/2)
    for weight in (0.0, 0.4, 1.0):
        got = segmentation_loss((logits, aux), target, aux_weight=weight).item()
        assert got == pytest.approx(main + weight * aux_loss, rel=1e-6), weight


def _step_size(grad_clip: float | None) -> float:
    """Norm of one plain-SGD step (lr 1) of a 1x1 conv whose weight gradient is [[1, 2, 2], [0, 0, 0]] (norm 3)."""
    model = nn.Conv2d(3, 2, kernel_size=1, bias=False)
    before = model.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    state = TrainState(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0),
                       torch.amp.GradScaler("cpu", enabled=False))
    image = torch.tensor([1.0, 2.0, 2.0]).reshape(1, 3, 1, 1)

    def first_channel(output, target):  # its gradient in the weight is [image; 0]
        return output[:, 0].sum()

    train_step(state, image, torch.zeros(1, 1, 1, dtype=torch.int64), amp="none", aux_weight=0.0,
               grad_clip=grad_clip, loss_fn=first_channel)
    return (model.weight.detach() - before).norm().item()


def test_grad_clip_caps_the_gradient_norm_and_leaves_smaller_ones_alone():
    assert _step_size(None) == pytest.approx(3.0, rel=1e-6)
    assert _step_size(1.5) == pytest.approx(1.5, rel=1e-5)
    assert _step_size(10.0) == pytest.approx(3.0, rel=1e-6)


def test_the_config_sets_every_step_s_aux_weight_and_grad_clip(tiny_synthetic, tmp_path, monkeypatch):
    weights, clips = [], []

    def recording_loss(output, target, aux_weight=0.0):
        weights.append((isinstance(output, tuple), aux_weight))
        return segmentation_loss(output, target, aux_weight)

    def recording_clip(parameters, max_norm, *args, **kwargs):
        clips.append(max_norm)
        return real_clip(parameters, max_norm, *args, **kwargs)

    real_clip = nn.utils.clip_grad_norm_
    monkeypatch.setattr(engine, "segmentation_loss", recording_loss)
    monkeypatch.setattr(nn.utils, "clip_grad_norm_", recording_clip)
    argv = ["--out", str(tmp_path / "run"), *run_args(tiny_synthetic), "train.iters=2", "model.aux_loss=true",
            "model.aux_weight=0.25", "optim.grad_clip=0.5"]
    assert train_seg.main(argv) == 0
    assert weights == [(True, 0.25)] * 2 and clips == [0.5] * 2
