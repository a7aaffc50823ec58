"""Pretraining's validation score, top-k accuracy: a hand-ranked case and torchmetrics."""

import torch
from torch import nn

from seg.evaluation.topk import evaluate_topk

CPU = torch.device("cpu")


def _batches(logits: torch.Tensor, targets: torch.Tensor, size: int) -> list:
    return list(zip(logits.split(size), targets.split(size)))  # the model is the identity: inputs are logits


def test_topk_counts_the_target_within_the_first_k_ranks():
    ranking = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])  # class c is ranked c + 1
    logits = ranking.repeat(4, 1)
    targets = torch.tensor([0, 1, 4, 5])  # ranked 1st, 2nd, 5th and 6th
    assert evaluate_topk(nn.Identity(), _batches(logits, targets, 2), device=CPU) == {"top1": 0.25, "top5": 0.75}


def test_topk_equals_torchmetrics():
    from torchmetrics.classification import MulticlassAccuracy  # 2 s to import: only where it is used

    gen = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(53, 10, generator=gen), torch.randint(0, 10, (53,), generator=gen)
    got = evaluate_topk(nn.Identity(), _batches(logits, targets, 8), device=CPU)
    for k in (1, 5):
        want = MulticlassAccuracy(num_classes=10, top_k=k, average="micro")(logits, targets).item()
        assert abs(got[f"top{k}"] - want) < 1e-6, (k, got, want)
