"""What a run records: TensorBoard scalars and images, and the record of each validation.

``metrics.jsonl`` is written by :mod:`seg.runs.rundir`, in the commit order that keeps it in step with the checkpoints.

Only the main process writes; on other ranks every method is a no-op, so callers never branch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from seg.evaluation.metrics import metrics_record
from seg.inference.tta import predict_labels
from seg.utils.distributed import current
from seg.utils.visualize import ca_overlays, compute_ca_maps, denormalize, legend, pick_ca_blocks, prediction_grid

CA_BLOCKS_SHOWN = 3
# a metrics.jsonl line holds every score, per-class accuracy too
RUN_KEYS = ("miou", "iou", "acc", "pixel_acc", "mean_acc", "fwiou")


class Tracker:
    """TensorBoard writer for ``run_dir``.

    Args:
        run_dir: the run directory (event files go here).
        classes: class names, for per-class IoU tags.
        palette: RGB colour per class, for the mask images (None: a run without masks, e.g. pretraining).
        purge_step: on resume, the first iteration to redo; TensorBoard hides events logged at or
            after it by the interrupted attempt.
    """

    def __init__(self, run_dir: Path, classes: Sequence[str], palette: np.ndarray | None,
                 purge_step: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.classes = list(classes)
        self.palette = palette
        self.writer = SummaryWriter(str(self.run_dir), purge_step=purge_step) if current().is_main else None
        if self.writer is not None and purge_step is None and palette is not None:  # once per run: the mask colours
            self.writer.add_image("legend", legend(self.classes, palette), 0, dataformats="HWC")

    def scalars(self, iteration: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, iteration)

    def validation(self, iteration: int, metrics: dict) -> None:
        """Log val mIoU and per-class IoU."""
        if self.writer is None:
            return
        self.writer.add_scalar("val/miou", metrics["miou"], iteration)
        for key in ("pixel_acc", "mean_acc", "fwiou"):
            self.writer.add_scalar(f"val/{key}", metrics[key], iteration)
        for name, iou in zip(self.classes, metrics["iou"]):
            if not math.isnan(iou):
                self.writer.add_scalar(f"val_iou/{name}", iou, iteration)
        self.writer.flush()

    def metrics_record(self, iteration: int, metrics: dict) -> dict:
        """One validation as plain JSON values: the ``metrics.jsonl`` line, also stored in ``last.pt``."""
        record = {"iter": iteration, "classes": list(self.classes), **metrics_record(metrics, RUN_KEYS)}
        return json.loads(json.dumps(record))  # plain types only, as the checkpoint requires

    @torch.no_grad()
    def predictions(self, iteration: int, model: nn.Module, samples: Sequence[tuple[torch.Tensor, torch.Tensor]],
                    *, ca_maps: bool = False, **predict_kwargs) -> None:
        """image | ground truth | prediction for fixed val samples, and CA gate maps a_h ⊗ a_w over the image.

        Samples are (3xHxW image, HxW target) pairs on the model's device, run one at a time
        because val images may differ in size.
        """
        if self.writer is None:
            return
        blocks = pick_ca_blocks(model, CA_BLOCKS_SHOWN) if ca_maps else {}
        for i, (image, target) in enumerate(samples):
            pred = predict_labels(model, image[None], num_classes=len(self.classes),
                                  out_size=tuple(target.shape), **predict_kwargs)[0]
            grid = prediction_grid(image, target, pred, self.palette)
            self.writer.add_image(f"val_images/{i}", grid, iteration, dataformats="HWC")
            if blocks:
                # a whole-image pass of its own, so that slide / multi-scale evaluation still gives one map
                maps, padded = compute_ca_maps(model, image, blocks, predict_kwargs.get("output_stride", 32))
                self.writer.add_image(f"ca_maps/{i}", ca_overlays(denormalize(image), maps, padded), iteration,
                                      dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
