"""Train-pipeline throughput per worker: decode + augment + to-tensor, in one process, one thread.

Prints images/s for VOC-sized (500x375 JPEG) and Cityscapes-sized (2048x1024 PNG) temporary
images, and for the real CamVid PNGs (480x360) when ../shared/data/camvid exists. The "plain" row
is bare OpenCV + the same albumentations ops, to show what the dataset layer adds on top.

    python datasets/bench_pipeline.py --seconds 5 --crop 512
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from seg.data.camvid import CamVid  # noqa: E402
from seg.data.cityscapes import Cityscapes  # noqa: E402
from seg.data.palette import save_index_png  # noqa: E402
from seg.data.transforms import build_train_transform  # noqa: E402
from seg.data.voc import VOCSegmentation  # noqa: E402

CAMVID = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"


def _scene(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Photo-like content (smooth colour + mild noise) so the codecs work as hard as on real data."""
    image = cv2.resize(rng.uniform(0, 255, (6, 8, 3)).astype(np.float32), (width, height))
    image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    labels = cv2.resize(rng.integers(0, 19, (6, 8), dtype=np.uint8), (width, height),
                        interpolation=cv2.INTER_NEAREST)
    return image, labels


def make_voc_like(root: Path, count: int = 16) -> VOCSegmentation:
    voc = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        image, labels = _scene(rng, 500, 375)
        cv2.imwrite(str(voc / "JPEGImages" / f"{i}.jpg"), image)
        save_index_png(voc / "SegmentationClass" / f"{i}.png", labels)
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n".join(map(str, range(count))))
    return VOCSegmentation(root, "train")


def make_cityscapes_like(root: Path, count: int = 4) -> Cityscapes:
    images, labels_dir = root / "leftImg8bit/train/city", root / "gtFine/train/city"
    images.mkdir(parents=True)
    labels_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        image, labels = _scene(rng, 2048, 1024)
        cv2.imwrite(str(images / f"city_{i}_leftImg8bit.png"), image)
        cv2.imwrite(str(labels_dir / f"city_{i}_gtFine_labelIds.png"), labels + 7)
    return Cityscapes(root, "train")


def throughput(step, count: int, seconds: float) -> float:
    """Images/s of ``step(i)`` over ``seconds`` (after one warm-up call)."""
    step(0)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step(done % count)
        done += 1
    return done / (time.perf_counter() - start)


def plain_step(dataset, transform):
    """Bare decode + the same albumentations ops, without the dataset's checks."""
    def step(i):
        image_path, mask_path = dataset.samples[i]
        image = cv2.imread(str(image_path), cv2.IMREAD_COLOR_RGB)
        mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
        transform.compose(image=image, mask=mask)
    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python datasets/bench_pipeline.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="timing window per row (default: 5)")
    parser.add_argument("--crop", type=int, default=512, help="training crop side (default: 512)")
    args = parser.parse_args(argv)
    cv2.setNumThreads(0)  # as in a DataLoader worker: one core per worker
    torch.set_num_threads(1)
    transform = build_train_transform(args.crop, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        sets = {"VOC-sized 500x375 jpg": make_voc_like(Path(tmp) / "voc"),
                "Cityscapes-sized 2048x1024 png": make_cityscapes_like(Path(tmp) / "cs")}
        if CAMVID.is_dir():
            sets["CamVid 480x360 png (real)"] = CamVid(CAMVID, "train")
        print(f"{'input':34s} {'pipeline img/s':>15s} {'plain img/s':>12s}   (crop {args.crop}, 1 thread)")
        for name, dataset in sets.items():
            dataset.transform = transform
            ours = throughput(dataset.__getitem__, len(dataset), args.seconds)
            plain = throughput(plain_step(dataset, transform), len(dataset), args.seconds)
            print(f"{name:34s} {ours:15.1f} {plain:12.1f}", flush=True)


if __name__ == "__main__":
    main()
