"""Pictures for TensorBoard: image | ground truth | prediction grids, Coordinate Attention maps
laid over their image, and a legend of the class colours.

The CA maps are read with forward hooks on each block's ``conv_h`` / ``conv_w``, so the model's
own forward path is untouched and nothing is recorded unless a capture is open.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seg.data.palette import IGNORE_INDEX, colorize
from seg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from seg.modeling.attention import CoordAttention

SEPARATOR_PX = 4
HEATMAP_ALPHA = 0.5  # map over image, half and half: the paper's way of showing attention
FONT = cv2.FONT_HERSHEY_SIMPLEX
LEGEND_ROW_PX, LEGEND_WIDTH_PX = 22, 220
IGNORE_LABEL = "void / ignore"


def denormalize(image: torch.Tensor) -> np.ndarray:
    """Undo the ImageNet normalisation of a 3xHxW tensor: HxWx3 uint8 RGB."""
    array = image.detach().float().cpu().permute(1, 2, 0).numpy()
    return np.clip((array * np.asarray(IMAGENET_STD, np.float32) + np.asarray(IMAGENET_MEAN, np.float32)) * 255.0, 0, 255).astype(np.uint8)


def _hstack(panels: list[np.ndarray]) -> np.ndarray:
    height = panels[0].shape[0]
    gap = np.full((height, SEPARATOR_PX, 3), 255, dtype=np.uint8)
    row: list[np.ndarray] = []
    for panel in panels:
        row += [panel, gap]
    return np.concatenate(row[:-1], axis=1)


def prediction_grid(
    image: torch.Tensor, target: torch.Tensor, pred: torch.Tensor, palette: np.ndarray
) -> np.ndarray:
    """One HxW'x3 uint8 row: the image, its colourised ground truth and the colourised prediction."""
    return _hstack(
        [denormalize(image), colorize(target.cpu().numpy(), palette), colorize(pred.cpu().numpy(), palette)]
    )


def heatmap(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A float HxW map, min-max scaled per map, resized to ``size`` (H, W) and coloured: HxWx3 uint8 RGB."""
    span = float(values.max() - values.min())
    scaled = (values - values.min()) / span if span > 0 else np.zeros_like(values)
    gray = cv2.resize((scaled * 255).astype(np.uint8), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return cv2.cvtColor(cv2.applyColorMap(gray, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


def spread_indices(n: int, count: int) -> list[int]:
    """Up to ``count`` indices spread evenly over ``range(n)``, first and last included.

    Val splits are often video frames in order, so the first few images are near copies.
    """
    if n <= 0 or count <= 0:
        return []
    return sorted(set(np.linspace(0, n - 1, min(count, n)).round().astype(int).tolist()))


def put_label(panel: np.ndarray, text: str) -> np.ndarray:
    """``panel`` (HxWx3 uint8 RGB) with ``text`` in white on a black box at its top left."""
    out = panel.copy()
    scale = max(0.35, out.shape[1] / 800)
    (width, height), baseline = cv2.getTextSize(text, FONT, scale, 1)
    cv2.rectangle(out, (0, 0), (width + 6, height + baseline + 6), (0, 0, 0), thickness=-1)
    cv2.putText(out, text, (3, height + 3), FONT, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def ca_overlays(image: np.ndarray, maps: dict[str, np.ndarray], padded: tuple[int, int]) -> np.ndarray:
    """One row of panels, each a CA map cropped to the image, over it, labelled with its block.

    Args:
        image: the HxWx3 uint8 RGB image the model saw, before padding.
        maps: block name -> (h, w) map computed on the input padded to ``padded`` (H', W').
        padded: the padded input size; the map cells beyond the image are cut off.
    """
    height, width = image.shape[:2]
    panels = []
    for name, values in maps.items():
        rows = math.ceil(values.shape[0] * height / padded[0])
        cols = math.ceil(values.shape[1] * width / padded[1])
        colour = heatmap(values[:rows, :cols], (height, width))
        blend = cv2.addWeighted(image, 1 - HEATMAP_ALPHA, colour, HEATMAP_ALPHA, 0)
        panels.append(put_label(blend, name))
    return _hstack(panels)


def legend(classes: list[str], palette: np.ndarray) -> np.ndarray:
    """A column of class colours named in black or white, whichever reads better; void is black."""
    rows = [(name, tuple(int(c) for c in palette[i])) for i, name in enumerate(classes)]
    rows.append((IGNORE_LABEL, (0, 0, 0)))
    out = np.zeros((LEGEND_ROW_PX * len(rows), LEGEND_WIDTH_PX, 3), dtype=np.uint8)
    for i, (name, rgb) in enumerate(rows):
        top = i * LEGEND_ROW_PX
        out[top:top + LEGEND_ROW_PX] = rgb
        luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
        ink = (0, 0, 0) if luma > 128 else (255, 255, 255)
        cv2.putText(out, f"{i if i < len(classes) else IGNORE_INDEX}: {name}", (4, top + LEGEND_ROW_PX - 7), FONT, 0.45,
                    ink, 1, cv2.LINE_AA)
    return out


@torch.no_grad()
def compute_ca_maps(model: nn.Module, image: torch.Tensor, blocks: dict[str, CoordAttention],
                    output_stride: int) -> tuple[dict[str, np.ndarray], tuple[int, int]]:
    """The blocks' maps for one normalised 3xHxW image, and the padded size (H', W') they cover.

    The image is padded at the bottom and right to a multiple of ``output_stride``, as
    :mod:`seg.inference.tta` does, and run once in eval mode.
    """
    height, width = image.shape[-2:]
    x = F.pad(image[None], (0, -width % output_stride, 0, -height % output_stride))
    was_training = model.training
    model.eval()
    try:
        with capture_ca_maps(blocks) as maps:
            model(x)
    finally:
        model.train(was_training)
    return {name: m[0].cpu().numpy() for name, m in maps.items()}, tuple(x.shape[-2:])


def pick_ca_blocks(model: nn.Module, count: int = 3) -> dict[str, CoordAttention]:
    """Up to ``count`` CoordAttention blocks spread evenly from shallow to deep, by module name."""
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, CoordAttention)]
    return dict(blocks[i] for i in spread_indices(len(blocks), count))


@contextmanager
def capture_ca_maps(blocks: dict[str, CoordAttention]) -> Iterator[dict[str, torch.Tensor]]:
    """While open, record each block's gate a_h ⊗ a_w averaged over channels: name -> (N, H, W).

    The strips are the sigmoids of ``conv_h`` (N, C, H, 1) and ``conv_w`` (N, C, W, 1) outputs.
    """
    strips: dict[str, dict[str, torch.Tensor]] = {name: {} for name in blocks}
    maps: dict[str, torch.Tensor] = {}

    def record(name: str, axis: str):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            strips[name][axis] = torch.sigmoid(output.detach().float())
            if len(strips[name]) == 2:
                a_h = strips[name]["h"]  # (N, C, H, 1)
                a_w = strips[name]["w"].transpose(2, 3)  # (N, C, 1, W)
                # mean_c(a_h * a_w) without materialising the (N, C, H, W) product
                maps[name] = torch.einsum("nch,ncw->nhw", a_h[..., 0], a_w[:, :, 0]) / a_h.shape[1]
                strips[name].clear()

        return hook

    handles = []
    for name, block in blocks.items():
        handles.append(block.conv_h.register_forward_hook(record(name, "h")))
        handles.append(block.conv_w.register_forward_hook(record(name, "w")))
    try:
        yield maps
    finally:
        for handle in handles:
            handle.remove()
