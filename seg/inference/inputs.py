"""What ``predict_seg.py`` reads: image files, folders (recursive), glob patterns and videos.

Each input becomes an :class:`Input` with the path its outputs take under the output folder: a
folder's files keep their path relative to the folder, a glob's relative to the part of the
pattern before its first wildcard, a named file keeps only its name.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

from seg.errors import UserError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"})
WILDCARDS = "*?["


class InputError(UserError, ValueError):
    """An input the user named that does not exist or holds nothing to predict on."""


@dataclass(frozen=True)
class Input:
    path: Path
    out: Path  # output path relative to the output folder, without extension
    is_video: bool


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


def _entry(path: Path, relative: Path) -> Input:
    return Input(path, relative.with_suffix(""), path.suffix.lower() in VIDEO_SUFFIXES)


def _folder(folder: Path) -> tuple[list[Input], list[Skipped]]:
    found, skipped = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue  # hidden files (.DS_Store, editor temps) are not the user's data
        if path.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES:
            found.append(_entry(path, relative))
        else:
            skipped.append(Skipped(path, "not an image or video file (by extension)"))
    if not found:
        raise InputError(f"no images or videos in folder {folder}")
    return found, skipped


def _pattern(pattern: str) -> list[Input]:
    matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not matches:
        raise InputError(f"no files match {pattern!r}")
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if any(c in part for c in WILDCARDS))
    base = Path(*parts[:fixed]) if fixed else Path(".")
    return [_entry(path, path.relative_to(base)) for path in matches]


def collect_inputs(specs: list[str]) -> tuple[list[Input], list[Skipped]]:
    """Every input ``specs`` names, and the folder entries skipped by extension.

    Raises :class:`InputError` for a path that does not exist, a folder with nothing to predict
    on and a pattern that matches nothing. Two inputs that would write the same output name
    keep the first; the second is skipped, named.
    """
    found: list[Input] = []
    skipped: list[Skipped] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            inputs, ignored = _folder(path)
            found += inputs
            skipped += ignored
        elif path.is_file():
            found.append(_entry(path, Path(path.name)))
        elif any(c in spec for c in WILDCARDS):
            found += _pattern(spec)
        else:
            raise InputError(f"input not found: {spec}")
    unique: dict[Path, Input] = {}
    for item in found:
        first = unique.setdefault(item.out, item)
        if first is not item:
            skipped.append(Skipped(item.path, f"its outputs would overwrite those of {first.path}"))
    return list(unique.values()), skipped
