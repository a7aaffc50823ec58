"""Class colours: the Pascal VOC palette and mask colourisation for logs and figures."""

import os
from pathlib import Path

import numpy as np
from PIL import Image

IGNORE_INDEX = 255


def voc_palette(num_classes: int = 256) -> np.ndarray:
    """Pascal VOC colour map (the devkit's bit-interleaving algorithm), shape (num_classes, 3) uint8 RGB.

    Bit j of the class index's three lowest bit groups sets bit 7-j of R, G and B, so class 1 is
    (128, 0, 0), class 2 is (0, 128, 0) and so on. Used by VOC masks and the synthetic dataset.
    """
    palette = np.zeros((num_classes, 3), dtype=np.uint8)
    for index in range(num_classes):
        code, rgb = index, [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((code >> channel) & 1) << (7 - bit)
            code >>= 3
        palette[index] = rgb
    return palette


VOC_PALETTE = voc_palette()  # all 256 entries, as stored in VOC's PNG masks


def colorize(mask: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Map an HxW label mask to an HxWx3 uint8 RGB image; 255 (ignore) and unknown labels become black.

    Accepts numpy arrays or CPU tensors (anything ``np.asarray`` takes).
    """
    labels = np.asarray(mask)
    if labels.ndim != 2:
        raise ValueError(f"colorize expects an HxW mask, got shape {labels.shape}")
    palette = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    known = (labels >= 0) & (labels < len(palette))
    out = np.zeros((*labels.shape, 3), dtype=np.uint8)
    out[known] = palette[labels[known]]
    return out


def save_index_png(path: str | Path, mask: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Write an HxW uint8 mask as a palette ("P") PNG, the VOC mask format; atomic (temp file + rename)."""
    png = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8))
    png.putpalette((VOC_PALETTE if palette is None else np.asarray(palette, np.uint8)).tobytes())  # L -> P
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    png.save(tmp, format="PNG")
    os.replace(tmp, path)
