"""TensorBoard pictures: fixed images spread over the split, CA maps cropped to the image and laid
over it with their block's name, and the class-colour legend."""

import numpy as np
import pytest
import torch

from seg.modeling.models import build_model
from seg.utils.visualize import (HEATMAP_ALPHA, LEGEND_ROW_PX, LEGEND_WIDTH_PX, SEPARATOR_PX, ca_overlays,
                           compute_ca_maps, heatmap, legend, pick_ca_blocks, put_label, spread_indices)


@pytest.mark.parametrize("n, count, expected", [
    (101, 4, [0, 33, 67, 100]),  # CamVid val: not four consecutive video frames
    (3, 4, [0, 1, 2]),
    (10, 1, [0]),
    (0, 4, []),
    (5, 0, []),
])
def test_spread_indices(n, count, expected):
    assert spread_indices(n, count) == expected


def _image(h=30, w=40):
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_ca_overlay_ignores_the_padding_and_blends_half_and_half():
    image = _image()
    inside = np.linspace(0.0, 1.0, 3 * 4).reshape(3, 4)  # a 30x40 image at stride 10
    padded = np.concatenate([inside, np.full((1, 4), 50.0)], axis=0)  # the input was padded to 40x40
    row = ca_overlays(image, {"features.3": padded}, padded=(40, 40))
    assert row.shape == image.shape  # the image's size, not the padded one
    expected_heat = heatmap(inside, (30, 40))
    bottom = (slice(20, 30), slice(0, 40))  # clear of the label box at the top left
    blend = (1 - HEATMAP_ALPHA) * image[bottom].astype(float) + HEATMAP_ALPHA * expected_heat[bottom]
    assert np.abs(row[bottom].astype(float) - blend).max() <= 1
    # uncropped, the padding's 50 would squash the image's own range into one colour
    assert not np.array_equal(heatmap(padded, (40, 40))[:30], expected_heat)


def test_ca_panels_are_separated_and_labelled():
    image = _image()
    maps = {"features.3": np.eye(3, 4), "features.10": np.ones((3, 4))}
    row = ca_overlays(image, maps, padded=(30, 40))
    assert row.shape == (30, 2 * 40 + SEPARATOR_PX, 3)
    assert (row[:, 40:40 + SEPARATOR_PX] == 255).all()
    first, second = row[:, :40], row[:, 40 + SEPARATOR_PX:]
    # writing a panel's own label again changes nothing; another block's name would
    assert np.array_equal(put_label(first, "features.3"), first)
    assert np.array_equal(put_label(second, "features.10"), second)
    assert not np.array_equal(put_label(first, "features.10"), first)


def test_put_label_writes_white_on_black_only_at_the_top_left():
    panel = np.full((60, 200, 3), 128, dtype=np.uint8)
    out = put_label(panel, "features.10")
    changed = np.argwhere((out != panel).any(-1))
    assert changed[:, 0].max() < 20 and changed[:, 1].max() < 100
    assert (out == 255).all(-1).any() and (out == 0).all(-1).any()


def test_compute_ca_maps_pads_like_inference_and_restores_train_mode():
    model = build_model("deeplabv3", "mobilenet_v2_ca", 3, decoder_channels=16).train()
    blocks = pick_ca_blocks(model, 3)
    maps, padded = compute_ca_maps(model, torch.randn(3, 40, 50), blocks, output_stride=32)
    assert padded == (64, 64) and model.training
    assert list(maps) == list(blocks) and len(maps) == 3
    for name, values in maps.items():
        stride = 64 // values.shape[0]
        assert values.shape == (64 // stride, 64 // stride), name
        assert ((values > 0) & (values < 1)).all()  # mean of sigmoid products


def test_legend_rows_hold_each_class_colour_and_its_name():
    palette = np.array([(250, 250, 250), (10, 20, 200)], dtype=np.uint8)
    out = legend(["sky", "car"], palette)
    assert out.shape == (3 * LEGEND_ROW_PX, LEGEND_WIDTH_PX, 3)
    for i, rgb in enumerate([*palette, (0, 0, 0)]):
        band = out[i * LEGEND_ROW_PX:(i + 1) * LEGEND_ROW_PX]
        assert (band[:, -1] == rgb).all()  # right edge: clear of the text
        ink = (0, 0, 0) if i == 0 else (255, 255, 255)  # dark text on the light swatch, light on dark
        assert (band == ink).all(-1).any()
