"""Train/eval pipelines: shapes, dtypes, padding values, and that no label value is ever invented."""

import numpy as np
import torch
from torchvision.models import MobileNet_V2_Weights

from seg.data.transforms import build_eval_transform, build_train_transform

# The oracle for normalisation: torchvision's ImageNet weights were trained on inputs normalised so,
# and an ImageNet-pretrained encoder must see its inputs as it did then.
_IMAGENET = MobileNet_V2_Weights.IMAGENET1K_V1.transforms()
IMAGENET_MEAN, IMAGENET_STD = _IMAGENET.mean, _IMAGENET.std


def _pair(rng, height=40, width=50, labels=(0, 3, 7, 255)):
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = rng.choice(np.array(labels, np.uint8), (height, width))
    return image, mask


def test_train_output_types_and_padding():
    image = np.full((20, 24, 3), 200, np.uint8)
    mask = np.full((20, 24), 4, np.uint8)
    x, y = build_train_transform(32, scale=(1.0, 1.0), hflip=False, seed=0)(image, mask)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (32, 32) and y.dtype == torch.int64
    # Padding: the mask is ignore and the image is black (0) before normalisation.
    assert (y[20:] == 255).all() and (y[:, 24:] == 255).all() and (y[:20, :24] == 4).all()
    black = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).view(3, 1)
    torch.testing.assert_close(x[:, 25, 30:], black.expand(3, 2))


def test_train_never_invents_labels():
    rng = np.random.default_rng(0)
    transform = build_train_transform((24, 28), scale=(0.5, 2.0), jitter=True, seed=1)
    seen = set()
    for _ in range(150):
        image, mask = _pair(rng)
        _, out = transform(image, mask)
        seen |= set(out.unique().tolist())
    assert seen <= {0, 3, 7, 255}
    assert {0, 3, 7, 255} <= seen


def test_train_is_seeded():
    image, mask = _pair(np.random.default_rng(0))
    first = build_train_transform(24, seed=5)(image, mask)
    again = build_train_transform(24, seed=5)(image, mask)
    other = build_train_transform(24, seed=6)(image, mask)
    torch.testing.assert_close(first, again)
    assert not torch.equal(first[0], other[0])


def test_eval_keeps_image_and_labels():
    image, mask = _pair(np.random.default_rng(1), 33, 47)
    x, y = build_eval_transform()(image, mask)
    assert x.shape == (3, 33, 47) and y.dtype == torch.int64
    np.testing.assert_array_equal(y.numpy(), mask)
    expected = (image[5, 6] / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(x[:, 5, 6].numpy(), expected, atol=1e-5)


def test_train_rescales_within_the_scale_range():
    # a 10x10 image labelled 3 throughout, padded into a 48 px crop: the label covers (10 * factor)^2 pixels
    image, mask = np.zeros((10, 10, 3), np.uint8), np.full((10, 10), 3, np.uint8)

    def area(scale, seed=0):
        _, y = build_train_transform(48, scale=scale, hflip=False, seed=seed)(image, mask)
        return int((y == 3).sum())

    assert area((0.5, 0.5)) == 25 and area((2.0, 2.0)) == 400
    areas = [area((0.5, 2.0), seed) for seed in range(40)]
    assert min(areas) >= 25 and max(areas) <= 400
    assert min(areas) < 60 and max(areas) > 300  # both ends of the range are drawn
