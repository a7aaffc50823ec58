"""Test helper (not a test): what the bad-input tables share: file hashes, the one-error-line check,
unreadable images, and a checkpoint trained for two steps (with its ONNX export) to feed them."""

import hashlib
import struct
import zlib
from argparse import Namespace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import seg.export.onnx as export
import train_seg
from tests.test_rundir import run_args

VOC = Path("VOCdevkit") / "VOC2012"


def sha256s(*places: Path) -> dict[str, str | None]:
    """sha256 of every file at or under each place, "folder" for each folder (so an empty one made
    shows), None for a place that does not exist."""
    digests: dict[str, str | None] = {}
    for place in places:
        digests[str(place)] = None
        for path in [place, *(place.rglob("*") if place.is_dir() else [])]:
            if path.exists():
                digests[str(path)] = "folder" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def one_error(capsys, code: int, *names: str) -> str:
    """The one ``error:`` line of a refused command, checked to name each of ``names``."""
    captured = capsys.readouterr()
    assert code == 2, (code, captured.err)
    assert "Traceback" not in captured.out + captured.err, captured.err
    lines = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and captured.err.strip().splitlines()[-1] == lines[0], captured.err  # log lines may precede
    assert all(str(name) in lines[0] for name in names), (names, lines[0])
    return lines[0]


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A complete PNG of a few hundred bytes whose header declares ``width`` x ``height`` RGB pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")


def image_bytes(suffix: str = ".png", size: int = 40) -> bytes:
    rng = np.random.default_rng(0)
    return cv2.imencode(suffix, rng.integers(0, 255, (size, size, 3), dtype=np.uint8))[1].tobytes()


# what each kind of unreadable file holds, and the words its refusal says
BAD_IMAGES = {
    "empty": (lambda good: b"", "is empty (0 bytes)"),
    "truncated": (lambda good: good[: len(good) // 2], "is truncated"),
    "undecodable": (lambda good: b"plain text, not an image\n", "not an image file"),
    "header bomb": (lambda good: png_bomb(), "declares more than"),
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_synthetic) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert train_seg.main(["--out", str(out), *run_args(tiny_synthetic)]) == 0
    return out / "best.pt"


@pytest.fixture(scope="module")
def onnx_model(ckpt, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert export.main(["--checkpoint", str(ckpt), "--out", str(path), "--dynamic"]) == 0
    return path


@pytest.fixture()
def pickled(tmp_path) -> Path:
    """A checkpoint holding an object that weights_only loading refuses."""
    path = tmp_path / "pickled.pt"
    torch.save({"model": {}, "args": Namespace(lr=0.1)}, path)
    return path


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


DUPLICATE_KEYS = "optim:\n  lr: 0.01\ntrain:\n  iters: 2\noptim:\n  lr: 0.5\n"
