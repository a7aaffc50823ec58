"""Pictures for TensorBoard: image | ground truth | prediction grids, and Coordinate Attention maps.

The CA maps are read with forward hooks on each block's ``conv_h`` / ``conv_w``, so the model's
own forward path is untouched and nothing is recorded unless a capture is open.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import cv2
import numpy as np
import torch
from torch import nn

from seg.attention import CoordAttention
from seg.data.palette import colorize

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
SEPARATOR_PX = 4


def denormalize(image: torch.Tensor) -> np.ndarray:
    """Undo the ImageNet normalisation of a 3xHxW tensor: HxWx3 uint8 RGB."""
    array = image.detach().float().cpu().permute(1, 2, 0).numpy()
    return np.clip((array * IMAGENET_STD + IMAGENET_MEAN) * 255.0, 0, 255).astype(np.uint8)


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
    gray = cv2.resize((scaled * 255).astype(np.uint8), (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
    return cv2.cvtColor(cv2.applyColorMap(gray, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


def pick_ca_blocks(model: nn.Module, count: int = 3) -> dict[str, CoordAttention]:
    """Up to ``count`` CoordAttention blocks spread evenly from shallow to deep, by module name."""
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, CoordAttention)]
    if not blocks:
        return {}
    count = min(count, len(blocks))
    picks = np.linspace(0, len(blocks) - 1, count).round().astype(int)
    return {blocks[i][0]: blocks[i][1] for i in sorted(set(picks.tolist()))}


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
