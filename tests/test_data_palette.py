"""Palette, colourisation and index-PNG round trips."""

import cv2
import numpy as np
import pytest
from PIL import Image

from seg.data.base import read_label_png
from seg.data.palette import colorize, save_index_png, voc_palette


def test_voc_palette_known_entries():
    palette = voc_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    # Values printed in the VOC devkit documentation.
    assert palette[:5].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]]
    assert palette[15].tolist() == [192, 128, 128]  # person
    assert palette[255].tolist() == [224, 224, 192]  # void
    assert len({tuple(c) for c in palette}) == 256


def test_colorize_maps_classes_and_blacks_out_ignore():
    palette = np.array([[10, 20, 30], [40, 50, 60]], np.uint8)
    mask = np.array([[0, 1], [255, 7]])
    out = colorize(mask, palette)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [10, 20, 30] and out[0, 1].tolist() == [40, 50, 60]
    assert out[1].tolist() == [[0, 0, 0], [0, 0, 0]]


def test_colorize_rejects_non_2d():
    with pytest.raises(ValueError, match="HxW"):
        colorize(np.zeros((2, 2, 3), int), voc_palette(21))


def test_index_png_round_trip_keeps_indices(tmp_path):
    mask = np.array([[0, 5, 20], [255, 1, 0]], np.uint8)
    path = tmp_path / "m.png"
    save_index_png(path, mask)
    assert Image.open(path).mode == "P"
    np.testing.assert_array_equal(read_label_png(path), mask)
    # Why the reader uses PIL: OpenCV expands palette PNGs to colours instead of indices.
    assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).ndim == 3
