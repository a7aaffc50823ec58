"""The training loss: cross-entropy over labelled pixels, plus model.aux_weight times the aux head's."""

import math

import pytest
import torch

import seg.engine.loop as engine
import train_seg
from seg.data.palette import IGNORE_INDEX
from seg.engine.loop import segmentation_loss
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


def test_model_aux_weight_reaches_the_loss_of_every_step(tiny_synthetic, tmp_path, monkeypatch):
    seen = []

    def recording(output, target, aux_weight=0.0):
        seen.append((isinstance(output, tuple), aux_weight))
        return segmentation_loss(output, target, aux_weight)

    monkeypatch.setattr(engine, "segmentation_loss", recording)
    argv = ["--out", str(tmp_path / "run"), *run_args(tiny_synthetic), "train.iters=2", "model.aux_loss=true",
            "model.aux_weight=0.25"]
    assert train_seg.main(argv) == 0
    assert seen == [(True, 0.25)] * 2
