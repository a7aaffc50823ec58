"""``--scope pretrain`` of ``seg.tools.bench``: what the paper's ImageNet protocol would cost here.

It times one pretraining step (``seg.engine.loop.train_step`` on the classifier
``seg.tools.pretrain`` builds, timm's SGD) for MobileNetV2 and + CA, interleaved with an A/A copy
of plain, and the training loader (``seg.data.classification``, timm's transforms) decoding real
JPEGs of ImageNet's typical size with N workers. From the medians it projects the wall time of
200 epochs over ImageNet's 1,281,167 training images, bound by the model and bound by the loader.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from timm.optim import create_optimizer_v2

from seg.config import ModelConfig
from seg.data.classification import ImageFolderClasses, build_classification_transform
from seg.data.loaders import build_loader
from seg.engine.loop import TrainState, train_step
from seg.engine.optim import build_scheduler
from seg.modeling.classifier import EncoderClassifier
from seg.modeling.models import encoder_from_config
from seg.tools.bench_pipeline import photo_scene
from seg.tools.timing import cpu_name, interleaved, noise_warning, ratio

IMAGENET_TRAIN_IMAGES = 1_281_167
EPOCHS = 200
IMAGENET_SIZE = (500, 375)  # the typical ImageNet photo (w x h); decoding cost scales with it
AA = "plain A/A"
ENCODERS = {"plain": "mobilenet_v2", AA: "mobilenet_v2", "CA": "mobilenet_v2_ca"}


def step_runner(encoder: str, batch: int, size: int, device: torch.device, amp: str, channels_last: bool):
    """One SGD step of ``encoder`` + classifier head on a fixed batch, as pretraining takes it."""
    model = EncoderClassifier(encoder_from_config(ModelConfig(encoder=encoder)), 1000).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    optimizer = create_optimizer_v2(model, opt="sgd", lr=0.05, weight_decay=4e-5, momentum=0.9)
    state = TrainState(model, optimizer, build_scheduler(optimizer, 10**6, schedule="cosine"),
                       torch.amp.GradScaler(device.type, enabled=False))
    images = torch.randn(batch, 3, size, size, device=device).to(memory_format=fmt)
    targets = torch.randint(0, 1000, (batch,), device=device)
    loss = torch.nn.CrossEntropyLoss()
    return lambda: train_step(state, images, targets, amp=amp, aux_weight=0.0, grad_clip=None,
                              loss_fn=lambda out, t: loss(out.float(), t))


def train_rates(device: torch.device, batch: int, size: int, repeats: int, warmup: int) -> dict:
    """Training img/s of each model (medians of interleaved steps) and the ratios to plain."""
    cuda = device.type == "cuda"
    amp = "bf16" if cuda else "none"
    runners = {name: step_runner(enc, batch, size, device, amp, channels_last=cuda) for name, enc in ENCODERS.items()}
    times = interleaved(runners, repeats, warmup, torch.cuda.synchronize if cuda else lambda: None)
    return {"amp": amp, "channels_last": cuda, "rows": [
        {"model": name, "img_s": batch / statistics.median(t), "ratio": ratio(times, name, "plain")}
        for name, t in times.items()]}


def write_jpegs(root: Path, count: int, size: tuple[int, int] = IMAGENET_SIZE) -> None:
    """``count`` photo-like JPEGs (the pipeline bench's scenes) in two class folders."""
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / "train" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{i:05d}.jpg"), photo_scene(rng, *size)[0])


def loader_rate(workers: int, batch: int, size: int, images: int, passes: int) -> dict:
    """Images/s of the training loader (decode, random-resized crop, flip, normalise) with ``workers``."""
    with tempfile.TemporaryDirectory() as tmp:
        write_jpegs(Path(tmp), images)
        dataset = ImageFolderClasses(tmp, "train", build_classification_transform(size, train=True))
        loader = build_loader(dataset, batch, train=True, num_workers=workers)
        seconds = []
        for _ in range(passes + 1):  # the first pass starts the workers: not timed
            start = time.perf_counter()
            count = sum(len(targets) for _, targets in loader)
            seconds.append(time.perf_counter() - start)
        return {"workers": workers, "images": count, "img_s": count / statistics.median(seconds[1:])}


def projected_hours(img_s: float) -> float:
    return EPOCHS * IMAGENET_TRAIN_IMAGES / img_s / 3600


def pretrain_table(device: str, batch: int, size: int, repeats: int, warmup: int, workers: int,
                   loader_images: int) -> tuple[list[str], dict]:
    """The table's lines and the JSON record of one ``--scope pretrain`` run."""
    dev = torch.device(device)
    trained = train_rates(dev, batch, size, repeats, warmup)
    loading = loader_rate(workers, min(batch, loader_images), size, loader_images, passes=3)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU: {cpu_name()}"
    lines = [f"pretraining step on {name}: batch {batch} at {size}x{size}, {trained['amp']}, channels_last "
             f"{trained['channels_last']}, eager, median of {repeats} interleaved steps",
             "", "| model | train img/s | step time / plain | 200 epochs, model-bound (h) |", "|---|---:|---:|---:|"]
    for row in trained["rows"]:
        lines.append(f"| {row['model']} | {row['img_s']:.1f} | {row['ratio']:.3f} | {projected_hours(row['img_s']):.1f} |")
    lines += ["", f"loader: {loading['workers']} workers, {loading['images']} JPEGs of {IMAGENET_SIZE[0]}x"
              f"{IMAGENET_SIZE[1]}: {loading['img_s']:.1f} img/s; 200 epochs loader-bound: "
              f"{projected_hours(loading['img_s']):.1f} h (the run takes the larger of the two bounds)"]
    aa = next(r["ratio"] for r in trained["rows"] if r["model"] == AA)
    if (warning := noise_warning("pretrain step", aa)) is not None:
        lines.append(warning)
    return lines, {"device": name, "batch": batch, "size": size, **trained, "loader": loading,
                   "epochs": EPOCHS, "imagenet_train_images": IMAGENET_TRAIN_IMAGES}
