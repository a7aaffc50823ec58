"""Confusion-matrix segmentation metrics: mIoU, per-class IoU, pixel / mean accuracy, FWIoU.

Counts accumulate on the device of the tensors passed to ``update`` and are summed over DDP
ranks with a single all-reduce, so the result is exact as long as every sample is seen by
exactly one rank (use ``seg.data.ContiguousSampler``, never a padding sampler).
"""

from __future__ import annotations

import math

import torch

from seg.data.palette import IGNORE_INDEX
from seg.utils.distributed import all_reduce_sum


class ConfusionMatrix:
    """Accumulates a ``num_classes x num_classes`` int64 matrix, rows = ground truth, cols = prediction.

    Pixels whose target equals ``ignore_index`` are dropped (their predictions are not looked
    at). Any other target or prediction outside ``[0, num_classes)`` raises ``ValueError``:
    it means a label map or the model's class count is wrong, and silently dropping it would
    bias the score.

    NaN convention (same as mmseg ``IoUMetric`` and cityscapesScripts): a class that is absent
    from the ground truth and never predicted has IoU 0/0 = NaN and is left out of ``miou``.
    A class absent from the ground truth but predicted has IoU 0. Per-class accuracy is NaN
    when the class is absent from the ground truth and is left out of ``mean_acc``.

    Args:
        num_classes: number of evaluated classes.
        ignore_index: target value of pixels to skip.
        device: where the matrix starts; it moves to the device of the first ``update``.
    """

    def __init__(
        self, num_classes: int, ignore_index: int = IGNORE_INDEX, device: torch.device | str = "cpu"
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"ConfusionMatrix: num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ConfusionMatrix: ignore_index={ignore_index} collides with a class id in [0, {num_classes})"
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.mat.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Count one batch. ``pred`` and ``target`` are integer label maps of the same shape."""
        if pred.shape != target.shape:
            raise ValueError(
                f"ConfusionMatrix.update: pred shape {tuple(pred.shape)} != target shape "
                f"{tuple(target.shape)}; pass class indices (e.g. logits.argmax(1)), not logits"
            )
        if pred.is_floating_point() or target.is_floating_point():
            raise ValueError(
                f"ConfusionMatrix.update: expected integer label maps, got pred {pred.dtype}, "
                f"target {target.dtype}"
            )
        if self.mat.device != pred.device:
            self.mat = self.mat.to(pred.device)
        n = self.num_classes
        # int64 before arithmetic: with uint8 inputs target * n + pred would wrap around at 256
        target = target.reshape(-1).to(device=pred.device, dtype=torch.int64)
        pred = pred.reshape(-1).to(torch.int64)
        keep = target != self.ignore_index
        target, pred = target[keep], pred[keep]
        out_of_range = (target < 0) | (target >= n) | (pred < 0) | (pred >= n)
        if bool(out_of_range.any()):  # one host sync per batch; the error path explains itself
            self._raise_out_of_range(pred, target)
        self.mat += torch.bincount(target * n + pred, minlength=n * n).reshape(n, n)

    def _raise_out_of_range(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        n = self.num_classes
        bad_t = torch.unique(target[(target < 0) | (target >= n)]).tolist()
        bad_p = torch.unique(pred[(pred < 0) | (pred >= n)]).tolist()
        raise ValueError(
            f"ConfusionMatrix.update: values must be in [0, {n}) (targets may also be "
            f"ignore_index={self.ignore_index}); found target values {bad_t[:10]} and "
            f"prediction values {bad_p[:10]} at valid pixels"
        )

    def all_reduce(self) -> None:
        """Sum the matrix over DDP ranks in place (a no-op in a single process)."""
        all_reduce_sum(self.mat)

    def compute(self) -> dict:
        """Scores from the counts so far.

        Returns a dict of plain Python values (JSON-serialisable, NaN aside):
            miou: nanmean of ``iou``; NaN when no class is defined.
            iou: per-class IoU list, NaN for 0/0.
            acc: per-class accuracy (recall) list, NaN for classes absent from the ground truth.
            pixel_acc: correct / valid pixels.
            mean_acc: nanmean of ``acc``.
            fwiou: IoU weighted by ground-truth frequency (classes present in the ground truth).
            confusion: the matrix as a list of lists of ints, rows = ground truth.
        """
        mat = self.mat.detach().to("cpu", torch.float64)
        tp = mat.diag()
        gt_count = mat.sum(1)
        union = gt_count + mat.sum(0) - tp
        iou = tp / union  # 0/0 -> NaN by IEEE division, which is exactly the convention we want
        acc = tp / gt_count
        total = mat.sum()
        freq = gt_count / total
        present = gt_count > 0
        return {
            "miou": _nanmean(iou),
            "iou": iou.tolist(),
            "acc": acc.tolist(),
            "pixel_acc": (tp.sum() / total).item(),
            "mean_acc": _nanmean(acc),
            "fwiou": (freq[present] * iou[present]).sum().item() if total > 0 else math.nan,
            "confusion": self.mat.cpu().tolist(),
        }


def _nanmean(values: torch.Tensor) -> float:
    defined = values[~values.isnan()]
    return defined.mean().item() if defined.numel() else math.nan


RECORD_KEYS = ("miou", "iou", "pixel_acc", "mean_acc", "fwiou")


def metrics_record(metrics: dict, keys: tuple[str, ...] = RECORD_KEYS) -> dict:
    """``keys`` of :meth:`ConfusionMatrix.compute`'s scores as JSON takes them: in the per-class lists,
    NaN (a class never seen and never predicted) becomes None."""
    return {k: [None if v != v else v for v in metrics[k]] if isinstance(metrics[k], list) else metrics[k]
            for k in keys}


def iou_table(classes: list[str], iou: list[float | None]) -> str:
    """Per-class IoU as a Markdown table; a class without a score (None or NaN) reads n/a."""
    rows = [f"| {name} | {'n/a' if v is None or v != v else f'{v:.4f}'} |" for name, v in zip(classes, iou)]
    return "\n".join(["| class | IoU |", "|---|---:|", *rows])
