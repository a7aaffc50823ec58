"""Class colours: the Pascal VOC palette and mask colourisation for logs and figures."""

import numpy as np

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
