"""What ``predict_seg.py`` reads: image files, folders (recursive), glob patterns and videos.

Each input becomes an :class:`Input` with the path its outputs take under the output folder: a
folder's files keep their path relative to the folder, a glob's relative to the part of the
pattern before its first wildcard, a named file keeps only its name.

Predicting never reads or overwrites its own outputs. An output folder from which an input
would read them back (inside an input folder, matched by an input pattern, or the very file of an
input) is refused rather than skipped while walking: skipping only the current ``--out`` tree would
still let the next run with another ``--out`` read this run's masks as photos. Two inputs whose
outputs share a name (``x.jpg`` and ``x.png`` both write ``x.png``; ``x.jpg`` and ``x_color.jpg`` both
``x_color.png``) keep the first; the second is skipped, named.
"""

from __future__ import annotations

import fnmatch
import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from seg.errors import UserError
from seg.inference.outputs import frame_base, image_outputs, output_claims

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"})
WILDCARDS = "*?["


class InputError(UserError, ValueError):
    """An input the user named that does not exist or holds nothing to predict on."""


@dataclass(frozen=True)
class Source:
    """What one input spec reads: the files under ``base`` whose relative path matches ``parts``
    (glob rules: ``**`` is any number of folders; a folder input is ``**/*``)."""

    spec: str
    base: Path  # absolute
    parts: tuple[str, ...]

    def reads(self, path: Path) -> bool:
        """Would this spec read the file at absolute ``path``?"""
        return path.is_relative_to(self.base) and _matches(path.relative_to(self.base).parts, self.parts)


def _matches(parts: Sequence[str], pattern: Sequence[str]) -> bool:
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_matches(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _matches(parts[1:], pattern[1:])


@dataclass(frozen=True)
class Input:
    path: Path
    out: Path  # output path relative to the output folder, without extension
    is_video: bool


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str

    def __str__(self) -> str:
        # a reader's message names the path already (e.g. "cannot read image P: ..."): once is enough
        return self.reason if str(self.path) in self.reason else f"{self.path}: {self.reason}"


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


def _split_pattern(pattern: str) -> tuple[Path, tuple[str, ...]]:
    """The folder before ``pattern``'s first wildcard, and the parts from there on."""
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if any(c in part for c in WILDCARDS))
    return (Path(*parts[:fixed]) if fixed else Path(".")), parts[fixed:]


def _pattern(pattern: str) -> list[Input]:
    matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not matches:
        raise InputError(f"no files match {pattern!r}")
    base, _ = _split_pattern(pattern)
    return [_entry(path, path.relative_to(base)) for path in matches]


def _source(spec: str) -> Source:
    path = Path(spec)
    if path.is_dir():
        return Source(spec, path.resolve(), ("**", "*"))
    if path.is_file():
        return Source(spec, path.parent.resolve(), (glob.escape(path.name),))
    base, parts = _split_pattern(spec)
    return Source(spec, base.resolve(), parts)


def _check_not_read_back(found: list[Input], sources: list[Source], out: Path, save_frames: bool) -> None:
    """Refuse an ``out`` where an input spec would read an output (this run's, or a later run's)."""
    root = out.resolve()
    for item in found:
        files, folders = output_claims(root / item.out, item.is_video, save_frames)
        # a frame's files stand for all of them: their names differ only in the frame number
        files += [p for folder in folders for p in image_outputs(frame_base(folder, 0))]
        for path in files:
            reader = next((source for source in sources if source.reads(path)), None)
            if reader is not None:
                raise InputError(f"--out {out}: output {path} would be read back as an input of {reader.spec!r}; "
                                 "put --out outside the inputs")


def _clash(files: dict[Path, Input], folders: dict[Path, Input], own_files: list[Path],
           own_folders: list[Path]) -> tuple[Path, Input] | None:
    """The first output name already taken (a file, or a folder of frames and anything in it), and by whom."""
    for path in own_files + own_folders:
        if path in files or path in folders:
            return path, files.get(path) or folders[path]
    for path in own_files:
        for parent in path.parents:
            if parent in folders:
                return path, folders[parent]
    for folder in own_folders:
        for path, first in files.items():
            if folder in path.parents:
                return path, first
    return None


def _claim_outputs(found: list[Input], save_frames: bool) -> tuple[list[Input], list[Skipped]]:
    """Each input whose output names (all of them, not the stem) are still free, and the skipped rest."""
    files: dict[Path, Input] = {}
    folders: dict[Path, Input] = {}
    kept, skipped = [], []
    for item in found:
        own_files, own_folders = output_claims(item.out, item.is_video, save_frames)
        clash = _clash(files, folders, own_files, own_folders)
        if clash is not None:
            skipped.append(Skipped(item.path, f"its output {clash[0]} would overwrite that of {clash[1].path}"))
            continue
        files.update(dict.fromkeys(own_files, item))
        folders.update(dict.fromkeys(own_folders, item))
        kept.append(item)
    return kept, skipped


def collect_inputs(specs: list[str], out: Path, save_frames: bool = False) -> tuple[list[Input], list[Skipped]]:
    """Every input ``specs`` names whose outputs under folder ``out`` are its own, and those skipped
    (folder entries by extension, inputs whose outputs would overwrite an earlier input's).

    Raises :class:`InputError` for a path that does not exist, a folder with nothing to predict
    on, a pattern that matches nothing and an ``out`` from which an input would read outputs back.
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
    _check_not_read_back(found, [_source(spec) for spec in specs], out, save_frames)
    kept, clashing = _claim_outputs(found, save_frames)
    return kept, skipped + clashing
