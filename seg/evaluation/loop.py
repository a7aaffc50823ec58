"""The eval loop: a model over a loader, scored by one confusion matrix summed over ranks.

Training's validation and ``eval_seg.py`` both run it (with :func:`seg.config.inference_settings`),
so a checkpoint scores the same in both.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from seg.evaluation.metrics import ConfusionMatrix
from seg.inference.tta import predict_labels
from seg.utils.progress import show_progress_bar


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int, *,
             device: torch.device, on_batch: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
             | None = None, **predict_kwargs) -> dict:
    """Score ``model`` on ``loader`` at the labels' resolution; sums over ranks before computing.

    ``predict_kwargs`` go to :func:`seg.inference.tta.predict_labels` (mode, scales, flip, ...).
    ``on_batch(batch_index, images, targets, predictions)`` sees every batch, e.g. to save PNGs.
    """
    matrix = ConfusionMatrix(num_classes, device=device)
    for batch_index, (images, targets) in enumerate(tqdm(loader, desc="eval", disable=not show_progress_bar(),
                                                         leave=False, dynamic_ncols=True)):
        images, targets = images.to(device), targets.to(device)
        predictions = predict_labels(model, images, num_classes=num_classes,
                                     out_size=tuple(targets.shape[-2:]), **predict_kwargs)
        matrix.update(predictions, targets)
        if on_batch is not None:
            on_batch(batch_index, images, targets, predictions)
    matrix.all_reduce()
    return matrix.compute()
