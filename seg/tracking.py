"""What a run records: TensorBoard scalars and images, and one JSON line per validation.

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

from seg.distributed import is_main
from seg.inference import predict_labels
from seg.visualize import ca_overlays, compute_ca_maps, denormalize, legend, pick_ca_blocks, prediction_grid

METRICS_FILE = "metrics.jsonl"
CA_BLOCKS_SHOWN = 3


class Tracker:
    """TensorBoard writer plus ``metrics.jsonl`` in ``run_dir``.

    Args:
        run_dir: the run directory (event files and metrics.jsonl go here).
        classes: class names, for per-class IoU tags.
        palette: RGB colour per class, for the mask images.
    """

    def __init__(self, run_dir: Path, classes: Sequence[str], palette: np.ndarray) -> None:
        self.run_dir = Path(run_dir)
        self.classes = list(classes)
        self.palette = palette
        self.writer = SummaryWriter(str(self.run_dir)) if is_main() else None
        if self.writer is not None:  # without it the GT and prediction colours can't be read
            self.writer.add_image("legend", legend(self.classes, palette), 0, dataformats="HWC")

    def scalars(self, iteration: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, iteration)

    def validation(self, iteration: int, metrics: dict, extra: dict | None = None) -> None:
        """Log val mIoU and per-class IoU, and append the validation to ``metrics.jsonl``."""
        if self.writer is None:
            return
        self.writer.add_scalar("val/miou", metrics["miou"], iteration)
        for key in ("pixel_acc", "mean_acc", "fwiou"):
            self.writer.add_scalar(f"val/{key}", metrics[key], iteration)
        for name, iou in zip(self.classes, metrics["iou"]):
            if not math.isnan(iou):
                self.writer.add_scalar(f"val_iou/{name}", iou, iteration)
        record = {"iter": iteration, "classes": self.classes, **{k: v for k, v in metrics.items() if k != "confusion"}, **(extra or {})}
        # NaN (a class absent from GT and predictions) is not JSON: store it as null
        record["iou"] = [None if math.isnan(v) else v for v in record["iou"]]
        with open(self.run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.writer.flush()

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
