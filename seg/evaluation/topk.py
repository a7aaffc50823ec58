"""Top-k accuracy of a classifier over a loader, summed over ranks: pretraining's validation."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from tqdm import tqdm

from seg.engine.loop import autocast
from seg.utils.distributed import all_reduce_sum
from seg.utils.progress import show_progress_bar

TOP_K = (1, 5)


@torch.no_grad()
def evaluate_topk(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                  device: torch.device, amp: str = "none") -> dict[str, float]:
    """``{"top1": ..., "top5": ...}`` (fractions) over every sample of ``loader`` on every rank.

    A set with fewer than k classes has top-k accuracy 1; it is still reported, so records have one shape.
    """
    was_training = model.training
    model.eval()
    counts = torch.zeros(len(TOP_K) + 1, dtype=torch.int64, device=device)  # hits per k, then samples
    for images, targets in tqdm(loader, desc="eval", disable=not show_progress_bar(), leave=False, dynamic_ncols=True):
        images, targets = images.to(device), targets.to(device)
        with autocast(device, amp):
            logits = model(images)
        ranked = logits.topk(min(max(TOP_K), logits.shape[1]), dim=1).indices
        hits = ranked == targets[:, None]
        for i, k in enumerate(TOP_K):
            counts[i] += hits[:, :k].any(dim=1).sum()
        counts[-1] += targets.numel()
    model.train(was_training)
    all_reduce_sum(counts)
    total = max(int(counts[-1]), 1)
    return {f"top{k}": int(counts[i]) / total for i, k in enumerate(TOP_K)}
