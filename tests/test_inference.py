"""predict / predict_labels on tiny deterministic models, checked against hand computations."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from seg.inference.tta import predict, predict_labels


class TinyNet(nn.Module):
    """Two stride-2 convs, BN, upsample x4; rejects sizes that are not multiples of 4, like smp models."""

    def __init__(self, num_classes: int = 3, aux: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, num_classes, 1))
        self.aux = aux
        self.body[1].running_mean.uniform_(-0.5, 0.5)  # eval-mode BN must differ from batch statistics

    def forward(self, x):
        if x.shape[-2] % 4 or x.shape[-1] % 4:
            raise ValueError(f"TinyNet needs sides divisible by 4, got {tuple(x.shape)}")
        out = F.interpolate(self.body(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return (out, out.mean()) if self.aux else out


class PositionModel(nn.Module):
    """Channels: column index, row index, and input width, all relative to the input it is given."""

    def forward(self, x):
        n, _, h, w = x.shape
        col = torch.arange(w, dtype=x.dtype).expand(n, h, w)
        row = torch.arange(h, dtype=x.dtype)[:, None].expand(n, h, w)
        return torch.stack([col, row, torch.full((n, h, w), float(w))], 1)


def _image(h=30, w=45, n=2):
    return torch.randn(n, 3, h, w)


def test_whole_pads_to_stride_and_crops_back():
    model, x = TinyNet().eval(), _image()
    with pytest.raises(ValueError):
        model(x)  # the padding is what makes this size work
    ref = model(F.pad(x, (0, 3, 0, 2)))[..., :30, :45]
    probs = predict(model, x, num_classes=3, output_stride=4)
    assert probs.shape == (2, 3, 30, 45) and probs.dtype == torch.float32
    torch.testing.assert_close(probs, ref.softmax(1))
    assert torch.equal(predict_labels(model, x, num_classes=3, output_stride=4), ref.argmax(1))


def test_slide_with_crop_equal_to_image_is_whole():
    model, x = TinyNet().eval(), _image()
    whole = predict(model, x, num_classes=3, output_stride=4)
    slide = predict(model, x, num_classes=3, output_stride=4, mode="slide", crop_size=(30, 45))
    torch.testing.assert_close(slide, whole)


def _softmax_of(*channels):
    return torch.stack([torch.as_tensor(c, dtype=torch.float32) for c in channels]).softmax(0)


def test_slide_averages_overlapping_logits_by_hand():
    x = _image(6, 6, n=1)
    probs = predict(PositionModel(), x, num_classes=3, output_stride=1, mode="slide", crop_size=4, stride=2)
    # windows start at 0 and 2 on each axis; positions 2-3 are seen by both windows
    per_axis = torch.tensor([0.0, 1, 1, 2, 2, 3])
    expected = _softmax_of(per_axis.expand(6, 6), per_axis[:, None].expand(6, 6), torch.full((6, 6), 4.0))
    torch.testing.assert_close(probs[0], expected)


def test_slide_pads_an_image_smaller_than_the_crop():
    x = _image(3, 5, n=1)
    probs = predict(PositionModel(), x, num_classes=3, output_stride=1, mode="slide", crop_size=(4, 8))
    cols, rows = torch.arange(5.0).expand(3, 5), torch.arange(3.0)[:, None].expand(3, 5)
    torch.testing.assert_close(probs[0], _softmax_of(cols, rows, torch.full((3, 5), 8.0)))


def test_flip_with_a_mirror_symmetric_model_changes_nothing():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_((conv.weight + conv.weight.flip(-1)) / 2)
    x = _image()
    plain = predict(conv, x, num_classes=4, output_stride=1)
    torch.testing.assert_close(predict(conv, x, num_classes=4, output_stride=1, flip=True), plain)


def test_multiscale_flip_averages_probabilities_by_hand():
    model, x = TinyNet().eval(), _image(32, 48)
    got = predict(model, x, num_classes=3, output_stride=4, scales=(0.5, 1.0), flip=True)
    views = []
    for scale in (0.5, 1.0):
        xs = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False) if scale != 1 else x
        for flipped in (False, True):
            logits = model(xs.flip(-1)).flip(-1) if flipped else model(xs)
            views.append(F.interpolate(logits, size=(32, 48), mode="bilinear", align_corners=False).softmax(1))
    torch.testing.assert_close(got, torch.stack(views).mean(0))
    labels = predict_labels(model, x, num_classes=3, output_stride=4, scales=(0.5, 1.0), flip=True)
    assert torch.equal(labels, got.argmax(1))


def test_scale_one_only_equals_whole():
    model, x = TinyNet().eval(), _image()
    whole = predict(model, x, num_classes=3, output_stride=4)
    torch.testing.assert_close(predict(model, x, num_classes=3, output_stride=4, scales=[1.0]), whole)
    # two identical views go through the averaging path and must give the same probabilities
    torch.testing.assert_close(predict(model, x, num_classes=3, output_stride=4, scales=(1.0, 1.0)), whole)


def test_out_size_resizes_logits_before_softmax():
    model, x = TinyNet().eval(), _image(32, 48)
    got = predict(model, x, num_classes=3, output_stride=4, out_size=(64, 96))
    ref = F.interpolate(model(x), size=(64, 96), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, ref.softmax(1))
    labels = predict_labels(model, x, num_classes=3, output_stride=4, out_size=(64, 96), flip=True)
    assert labels.shape == (2, 64, 96) and labels.dtype == torch.int64


def test_runs_in_eval_mode_takes_first_of_tuple_and_restores_train_mode():
    model, x = TinyNet(aux=True), _image(32, 48)
    model.train()
    probs = predict(model, x, num_classes=3, output_stride=4)
    assert model.training
    model.eval()
    torch.testing.assert_close(probs, model(x)[0].softmax(1))


def test_does_not_write_into_the_callers_image():
    x = _image(8, 8)
    before = x.clone()
    predict(nn.Identity(), x, num_classes=3, output_stride=1)
    assert torch.equal(x, before)


@pytest.mark.parametrize("kwargs,match", [
    ({"scales": (0.0,)}, "scales"), ({"scales": (1.0, -0.5)}, "scales"), ({"scales": ()}, "scales"),
    ({"mode": "tile"}, "mode"), ({"mode": "slide"}, "crop_size"),
    ({"mode": "slide", "crop_size": 16, "stride": 20}, "stride"), ({"num_classes": 5}, "num_classes=5"),
    ({"out_size": (0, 4)}, "out_size"),
])
def test_bad_arguments_raise(kwargs, match):
    args = {"num_classes": 3, "output_stride": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        predict(TinyNet().eval(), _image(32, 32), **args)


class _FullResAllocations(TorchDispatchMode):
    """Counts freshly allocated tensors with at least ``min_numel`` elements (views and in-place ops excluded)."""

    def __init__(self, min_numel: int) -> None:
        super().__init__()
        self.min_numel, self.count = min_numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() >= self.min_numel and not t._is_view() \
                    and t.untyped_storage().data_ptr() not in inputs:
                self.count += 1
        return out


@pytest.mark.parametrize("fn", [predict, predict_labels])
@pytest.mark.parametrize("flip,expected", [(False, 1), (True, 2)])
def test_full_resolution_class_tensors_are_only_the_model_outputs(fn, flip, expected):
    """One per model run: no extra per-class copies for crop, softmax, argmax or un-flipping."""
    model, x = nn.Conv2d(3, 19, 1).eval(), _image(45, 70, n=1)
    counter = _FullResAllocations(min_numel=19 * 45 * 70)
    with counter:
        fn(model, x, num_classes=19, output_stride=16, flip=flip)
    assert counter.count == expected


class _AutocastProbe(nn.Module):
    """Records whether autocast was on (and its dtype) when it ran."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = []

    def forward(self, x):
        device = x.device.type
        self.seen.append(torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None)
        return x[:, :3]


@pytest.mark.parametrize("amp, dtype", [("none", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_precision_is_the_callers_choice_and_float32_by_default(amp, dtype):
    probe = _AutocastProbe()
    predict_labels(probe, torch.randn(1, 3, 8, 8), num_classes=3, output_stride=1, amp=amp)
    predict_labels(probe, torch.randn(1, 3, 8, 8), num_classes=3, output_stride=1)
    assert probe.seen == [dtype, None]
