"""A small synthetic segmentation dataset in the VOC layout, so training runs with nothing downloaded.

Each scene is a cluttered, smoothly coloured background with 1-3 textured shapes that may overlap.
A class is told apart by its outline *and* its texture (stripe direction / checks), never by colour:
every colour on an object is drawn from the same distribution as the background, so a per-pixel
colour classifier is close to chance while a small conv net learns the scenes in minutes.
"""

import json
from pathlib import Path

import cv2
import numpy as np

from seg.data.palette import IGNORE_INDEX, save_index_png, voc_palette
from seg.data.voc import VOCSegmentation

SYNTHETIC_CLASSES = ("background", "disc", "square", "triangle", "cross")
SYNTHETIC_PALETTE = voc_palette(len(SYNTHETIC_CLASSES))
FORMAT_VERSION = 5  # bump when the generator changes so cached datasets are regenerated
SPEC_FILE = "synthetic.json"
MIN_CONTRAST = 110.0  # RGB distance between a texture's two colours, so the pattern is always visible


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3)


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    first = _random_colour(rng)
    while True:
        second = _random_colour(rng)
        if np.linalg.norm(first - second) >= MIN_CONTRAST:
            return first, second


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth random colour field plus clutter strokes and blobs (float32 HxWx3)."""
    coarse = rng.uniform(0, 255, (3, 3, 3)).astype(np.float32)
    image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    grain = rng.normal(0, 22, (size // 6, size // 6, 1)).astype(np.float32)
    image += cv2.resize(grain, (size, size), interpolation=cv2.INTER_LINEAR)[..., None]  # irregular mottling
    for _ in range(rng.integers(4, 9)):
        colour = tuple(float(c) for c in _random_colour(rng))
        points = rng.integers(-size // 4, size + size // 4, (2, 2))
        if rng.random() < 0.5:
            cv2.line(image, tuple(map(int, points[0])), tuple(map(int, points[1])), colour,
                     int(rng.integers(1, 3)), cv2.LINE_AA)
        else:
            cv2.circle(image, tuple(map(int, points[0])), int(rng.integers(2, 5)), colour, -1, cv2.LINE_AA)
    return image


def _texture(kind: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Binary HxW pattern that identifies the class by edge orientation, never by colour.

    Diagonal stripes go either way, so the horizontal flip augmentation keeps every class's cue.
    """
    period = int(rng.integers(5, 8))
    ys, xs = np.mgrid[0:size, 0:size] + rng.integers(0, 4 * period, 2)[:, None, None]
    if kind == 1:
        return (ys % period) < period / 2  # disc: horizontal stripes
    if kind == 2:
        cell = period + 3
        return ((ys // cell) + (xs // cell)) % 2 == 0  # square: coarse checks
    if kind == 3:
        return (xs % period) < period / 2  # triangle: vertical stripes
    diagonal = xs + ys if rng.random() < 0.5 else xs - ys
    return (diagonal % (period + 2)) < (period + 2) / 2  # cross: diagonal stripes


def _shape_mask(kind: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Filled outline of class ``kind`` at a random scale, position and rotation (uint8 0/1)."""
    mask = np.zeros((size, size), np.uint8)
    radius = rng.uniform(0.18, 0.3) * size
    centre = rng.uniform(0.15, 0.85, 2) * size
    angle = rng.uniform(-0.35, 0.35)
    if kind == 1:
        cv2.circle(mask, tuple(map(int, centre)), int(radius), 1, -1)
        return mask
    if kind == 2:
        corners = np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)]) * 0.85
    elif kind == 3:
        corners = np.array([(np.sin(a), -np.cos(a)) for a in (0, 2.094, 4.189)]) * 1.35
    else:
        arm, width = 1.1, 0.45
        corners = np.array([(-width, -arm), (width, -arm), (width, -width), (arm, -width), (arm, width),
                            (width, width), (width, arm), (-width, arm), (-width, width), (-arm, width),
                            (-arm, -width), (-width, -width)])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = corners @ rotation.T * radius + centre
    cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 1)
    return mask


def paint_object(image: np.ndarray, kind: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one textured object of class ``kind`` (1..4) into the float HxWx3 ``image``; returns its region."""
    size = image.shape[0]
    region = _shape_mask(kind, size, rng).astype(bool)
    first, second = _colour_pair(rng)
    image[region] = np.where(_texture(kind, size, rng)[region][:, None], first, second)
    return region


def finish_image(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sensor noise on the float image, then uint8."""
    image += rng.normal(0, 6, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def render_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One (HxWx3 uint8 RGB image, HxW uint8 label) scene; labels are 0..4, 255 on region borders."""
    image = background(rng, size)
    label = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(1, 4)):  # later shapes occlude earlier ones
        kind = int(rng.integers(1, len(SYNTHETIC_CLASSES)))
        label[paint_object(image, kind, rng)] = kind
    image = finish_image(image, rng)
    kernel = np.ones((3, 3), np.uint8)
    border = cv2.dilate(label, kernel) != cv2.erode(label, kernel)
    label[border] = IGNORE_INDEX  # like VOC: region borders are void
    return image, label


def _write_split(voc: Path, split: str, names: list[str], rng: np.random.Generator, size: int) -> None:
    for name in names:
        image, label = render_scene(rng, size)
        cv2.imwrite(str(voc / "JPEGImages" / f"{name}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 95])
        save_index_png(voc / "SegmentationClass" / f"{name}.png", label)
    (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")


def make_synthetic(root: str | Path, n_train: int = 600, n_val: int = 100, size: int = 96, seed: int = 0) -> Path:
    """Generate (or reuse) the synthetic dataset under ``root``; returns its ``VOCdevkit/VOC2012`` folder.

    Deterministic for a given (n_train, n_val, size, seed). An existing dataset with the same
    parameters is kept as is, so calling this before every run costs nothing.
    """
    voc = Path(root) / "VOCdevkit" / "VOC2012"
    spec = {"version": FORMAT_VERSION, "n_train": n_train, "n_val": n_val, "size": size, "seed": seed}
    spec_file = voc / SPEC_FILE
    if spec_file.is_file() and json.loads(spec_file.read_text()) == spec:
        return voc
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True, exist_ok=True)
    spec_file.unlink(missing_ok=True)  # an interrupted run must not look complete
    train_rng, val_rng = (np.random.default_rng([seed, stream]) for stream in (0, 1))
    _write_split(voc, "train", [f"train_{i:05d}" for i in range(n_train)], train_rng, size)
    _write_split(voc, "val", [f"val_{i:05d}" for i in range(n_val)], val_rng, size)
    spec_file.write_text(json.dumps(spec))
    return voc


def holds_synthetic(root: str | Path) -> bool:
    """Whether ``root`` holds a complete synthetic dataset (of any parameters)."""
    return (Path(root) / "VOCdevkit" / "VOC2012" / SPEC_FILE).is_file()


class SyntheticSegmentation(VOCSegmentation):
    """The synthetic dataset (made by :func:`make_synthetic`), read through the VOC reader."""

    classes = SYNTHETIC_CLASSES
    palette = SYNTHETIC_PALETTE
