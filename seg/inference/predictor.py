"""Masks for your own images: :class:`Predictor`, over a checkpoint or an exported ONNX model.

>>> p = Predictor.from_checkpoint("runs/demo/best.pt", device="cpu")   # or Predictor.from_onnx("m.onnx")
>>> mask = p.predict(image_rgb)            # (H, W) uint8 class indices; image: HxWx3 uint8 RGB
>>> masks = p.predict_batch([img1, img2])  # equal-sized images share one forward
>>> p.classes, p.palette

Pre-processing is the eval transform and inference is :func:`seg.inference.tta.predict_labels`
under the checkpoint's own settings (:func:`seg.config.inference_settings`), so a mask equals
what ``eval_seg.py --save-dir`` writes for the same image. Everything a predictor needs besides
the weights is its *model card* (:func:`model_card`), which the ONNX export stores in the model's
metadata; an ONNX model therefore predicts with the same pre- and post-processing.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from seg.config import Config, ConfigError, apply_overrides, eval_window, inference_settings
from seg.data import DATASETS, IMAGENET_MEAN, IMAGENET_STD, build_eval_transform, voc_palette
from seg.inference.tta import MODES, predict_labels
from seg.inference.paths import inference_model
from seg.runs.checkpoint import checkpoint_config, load_checkpoint
from seg.utils.distributed import resolve_device

MAX_CLASSES = 256  # masks are 8-bit


def class_table(cfg: Config) -> tuple[list[str], np.ndarray]:
    """Class names and (num_classes, 3) uint8 RGB palette of the dataset ``cfg`` trained on.

    A model whose class count differs from its dataset's (a custom head) gets numbered names and
    the VOC colours.
    """
    dataset = DATASETS.get(cfg.data.name)
    if dataset is not None and len(dataset.classes) == cfg.data.num_classes:
        return list(dataset.classes), np.asarray(dataset.palette, np.uint8)
    return [f"class_{i}" for i in range(cfg.data.num_classes)], voc_palette(cfg.data.num_classes)


def model_card(cfg: Config) -> dict:
    """What predicting needs besides the weights, as JSON-able values (the ONNX export stores it).

    ``inference`` are the config's settings; ``slide_window`` the window to use when a caller
    switches a whole-image config to slide mode.
    """
    classes, palette = class_table(cfg)
    settings = inference_settings(cfg)
    slide = replace(cfg, eval=replace(cfg.eval, mode="slide"))
    return {"classes": classes, "palette": palette.tolist(), "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD), "color_order": "RGB",
            "inference": {**settings, "scales": list(settings["scales"])}, "slide_window": eval_window(slide)}


def card_settings(card: dict, mode: str | None = None, scales: Sequence[float] | None = None,
                  flip: bool | None = None) -> dict:
    """The card's inference settings with the caller's ``mode``, ``scales`` and ``flip`` (None: keep)."""
    settings = {**card["inference"], "scales": tuple(card["inference"]["scales"])}
    if mode is not None and mode != settings["mode"]:
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
        window = card["slide_window"] if mode == "slide" else {"crop_size": None, "stride": None}
        settings.update(mode=mode, **window)
    if scales is not None:
        if not scales or any(not s > 0 for s in scales):
            raise ConfigError(f"scales must all be > 0, got {list(scales)}")
        settings["scales"] = tuple(float(s) for s in scales)
    if flip is not None:
        settings["flip"] = bool(flip)
    return settings


class Predictor:
    """Class-index masks for HxWx3 uint8 RGB images.

    Args:
        model: returns logits ``[N, C, h, w]`` for normalised images (a PyTorch model, or
            :class:`seg.export.runtime.OnnxModel`).
        card: the model card (:func:`model_card`): classes, palette, normalisation, inference settings.
        device: where the images go.
        mode, scales, flip: override the card's inference settings (None keeps them).
        inference_path: what runs the model, for the record (``seg.inference.paths``; from_* set it).
    """

    def __init__(self, model: nn.Module, card: dict, device: torch.device | str = "cpu", mode: str | None = None,
                 scales: Sequence[float] | None = None, flip: bool | None = None, inference_path: str = "as given") -> None:
        self.model = model
        self.classes: list[str] = list(card["classes"])
        self.palette = np.asarray(card["palette"], np.uint8).reshape(-1, 3)
        if not 0 < len(self.classes) <= MAX_CLASSES:
            raise ConfigError(f"a predictor writes 8-bit masks, so 1..{MAX_CLASSES} classes; got {len(self.classes)}")
        self.settings = card_settings(card, mode, scales, flip)
        self.device = torch.device(device)
        self.normalize = build_eval_transform(tuple(card["mean"]), tuple(card["std"])).compose
        # a model that takes BGR (mean and std then in BGR order too) gets the RGB image reversed
        self.bgr = card.get("color_order", "RGB") == "BGR"
        self.inference_path = inference_path

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", overrides: Sequence[str] = (),
                        **settings) -> "Predictor":
        """A predictor over checkpoint ``path`` and its stored config (plus config ``overrides`` such
        as ``"eval.crop_size=512"``); ``settings`` are ``mode``, ``scales``, ``flip``."""
        ckpt = load_checkpoint(path)
        cfg = apply_overrides(checkpoint_config(ckpt, path), list(overrides))
        dev = resolve_device(device)
        model, path = inference_model(ckpt, cfg, dev)
        return cls(model, model_card(cfg), dev, inference_path=path, **settings)

    @classmethod
    def from_onnx(cls, path: str | Path, threads: int | None = None, **settings) -> "Predictor":
        """A predictor over an ONNX file written by ``python -m seg.export`` (onnxruntime, CPU)."""
        from seg.export.runtime import OnnxModel, read_model_card

        card = read_model_card(path)
        card["inference"] = {**card["inference"], "amp": "none"}  # autocast means nothing to onnxruntime
        return cls(OnnxModel(path, threads), card, "cpu", inference_path="onnxruntime", **settings)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def predict(self, image: np.ndarray) -> np.ndarray:
        """The (H, W) uint8 class-index mask of one HxWx3 uint8 RGB image."""
        return self.predict_batch([image])[0]

    def predict_batch(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Masks of several images, in order; images of equal size run as one batch."""
        tensors = [self._tensor(image, i) for i, image in enumerate(images)]
        masks: list[np.ndarray | None] = [None] * len(tensors)
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, tensor in enumerate(tensors):
            by_size.setdefault(tuple(tensor.shape), []).append(i)
        for indices in by_size.values():
            batch = torch.stack([tensors[i] for i in indices]).to(self.device)
            labels = predict_labels(self.model, batch, num_classes=self.num_classes, **self.settings)
            for i, mask in zip(indices, labels.to(torch.uint8).cpu().numpy()):
                masks[i] = mask
        return masks

    def _tensor(self, image: np.ndarray, index: int) -> torch.Tensor:
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
            got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ValueError(f"image {index}: expected an HxWx3 uint8 RGB array, got {got}")
        return self.normalize(image=np.ascontiguousarray(image[..., ::-1]) if self.bgr else image)["image"]
