"""Bad input, one table per entry point: each case exits 2 with exactly one ``error:`` line naming the
file or key (or, for predict's unreadable images, a skip counted in the exit code), no traceback,
and leaves every file it was given, and the output place, as it was.

The cases are tiny files made in tmp_path, around one checkpoint trained for two steps.
"""

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from argparse import Namespace
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import segmentation_models_pytorch as smp
import torch

import eval_seg
import predict_seg
import seg
import seg.export.onnx as export
import train_seg
from seg.errors import USER_ERRORS, UserError, print_user_error
from seg.modeling.hub import HubError
from seg.modeling.models import build_model
from tests.conftest import REPO
from tests.test_data_prepare import _script
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


# --- train -------------------------------------------------------------------------------------------

TRAIN_CASES = ["duplicate yaml keys", "config is a folder", *(f"{kind} image" for kind in BAD_IMAGES),
               "empty label"]


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_train(case, tiny_synthetic, tmp_path, capsys):
    root = shutil.copytree(tiny_synthetic, tmp_path / "data")
    extra, names = [], []
    if case == "duplicate yaml keys":
        extra = ["--config", str(write(tmp_path / "dup.yaml", DUPLICATE_KEYS))]
        names = [tmp_path / "dup.yaml", "'optim' appears twice (lines 1 and 5)"]
    elif case == "config is a folder":
        extra, names = ["--config", str(tmp_path / "data")], [f"config {tmp_path / 'data'} is a folder"]
    elif case == "empty label":
        label = write(root / VOC / "SegmentationClass" / "train_00001.png", b"")
        names = [f"error: {label} is empty (0 bytes)"]
    else:
        image = root / VOC / "JPEGImages" / "train_00001.jpg"
        content, words = BAD_IMAGES[case.removesuffix(" image")]
        write(image, content(image.read_bytes()))
        names = [image, words]
    before = sha256s(root, tmp_path / "dup.yaml")
    code = train_seg.main(["--out", str(tmp_path / "run"), *extra, *run_args(root)])
    line = one_error(capsys, code, *names)
    assert "BytesIO" not in line
    assert sha256s(root, tmp_path / "dup.yaml") == before


# --- eval --------------------------------------------------------------------------------------------

EVAL_CASES = ["save-dir is a file", "json is a folder", "config is a folder", "duplicate yaml keys",
              "unsafe pickle", "empty val image"]


@pytest.mark.parametrize("case", EVAL_CASES)
def test_eval(case, ckpt, pickled, tiny_synthetic, tmp_path, capsys):
    argv, names = ["--checkpoint", str(ckpt)], []
    place = write(tmp_path / "place" / "file.txt", "keep me")
    if case == "save-dir is a file":
        argv += ["--save-dir", str(place)]
        names = [f"--save-dir {place} is a file"]
    elif case == "json is a folder":
        argv += ["--json", str(place.parent)]
        names = [f"--json {place.parent} is a folder"]
    elif case == "config is a folder":
        argv += ["--config", str(place.parent)]
        names = [f"config {place.parent} is a folder"]
    elif case == "duplicate yaml keys":
        argv += ["--config", str(write(place.parent / "dup.yaml", DUPLICATE_KEYS))]
        names = [place.parent / "dup.yaml", "'optim' appears twice"]
    elif case == "unsafe pickle":
        argv = ["--checkpoint", str(pickled)]
        names = [pickled, "argparse.Namespace", "only its maker can convert it"]
    else:
        root = shutil.copytree(tiny_synthetic, place.parent / "data")
        image = write(root / VOC / "JPEGImages" / "val_00001.jpg", b"")
        argv += ["--data-root", str(root)]
        names = [f"{image} is empty"]
    before = sha256s(place.parent, pickled)
    line = one_error(capsys, eval_seg.main(argv), *names)
    assert "weights_only" not in line
    assert sha256s(place.parent, pickled) == before


# --- predict -----------------------------------------------------------------------------------------

def read_only_out(tmp_path: Path) -> Path:
    """A folder that cannot be created: under a read-only folder, or, for root (whom file modes do
    not stop), under /sys, which takes no new folders."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        return locked / "out"
    return Path("/sys/seg-test-bad-inputs")


PREDICT_REFUSED = ["out inside an input folder", "out matched by an input pattern", "out would overwrite an input",
                   "out is a file", "out is read-only", "unsafe pickle", "max-pixels above PIL's"]


@pytest.mark.parametrize("case", PREDICT_REFUSED)
def test_predict_refuses(case, ckpt, pickled, tmp_path, capsys):
    photos = tmp_path / "photos"
    write(photos / "a.png", image_bytes(".png"))
    write(photos / "sub" / "b.jpg", image_bytes(".jpg"))
    inputs, out, model = [str(photos)], tmp_path / "masks", ["--checkpoint", str(ckpt)]
    flags, names = [], []
    if case == "out inside an input folder":
        out, names = photos / "masks", [f"--out {photos / 'masks'}", "read back as an input of"]
    elif case == "out matched by an input pattern":  # the next run would take sub/b_overlay.jpg for a photo
        inputs, out = [f"{photos}/*/*.jpg"], photos
        names = [f"output {photos / 'sub' / 'b_overlay.jpg'} would be read back", f"{photos}/*/*.jpg"]
    elif case == "out would overwrite an input":
        inputs, out = [str(photos / "a.png")], photos
        names = [f"output {photos / 'a.png'} would be read back"]
    elif case == "out is a file":
        out = photos / "a.png"
        names = [f"--out {out} is a file"]
    elif case == "out is read-only":
        out = read_only_out(tmp_path)
        names = [f"--out {out} is not a writable folder"]
    elif case == "unsafe pickle":
        model, names = ["--checkpoint", str(pickled)], [pickled, "will not unpickle"]
    else:
        flags, names = ["--max-pixels", str(10**9)], ["--max-pixels must be within 1..178,956,970"]
    before = sha256s(tmp_path)
    one_error(capsys, predict_seg.main([*model, *inputs, "--out", str(out), *flags]), *names)
    assert sha256s(tmp_path) == before


@pytest.mark.parametrize("case", [*(f"{kind} image" for kind in BAD_IMAGES), "outputs share a name"])
def test_predict_skips_and_counts(case, ckpt, tmp_path, capsys):
    photos = tmp_path / "photos"
    write(photos / "x.jpg", image_bytes(".jpg"))
    if case == "outputs share a name":
        bad = write(photos / "x_color.jpg", image_bytes(".jpg", 32))  # its x_color.png is x.jpg's colour mask
        words = f"its output x_color.png would overwrite that of {photos / 'x.jpg'}"
    else:
        content, words = BAD_IMAGES[case.removesuffix(" image")]
        bad = write(photos / "sub" / "bad.png", content(image_bytes(".png")))
    before = sha256s(photos)
    code = predict_seg.main(["--checkpoint", str(ckpt), str(photos), "--out", str(tmp_path / "masks")])
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.out + captured.err, captured.err
    assert "error:" not in captured.err
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 1 and str(bad) in warnings[0] and words in warnings[0], captured.err
    assert "predicted 1 image(s)" in captured.out and "skipped 1:" in captured.out
    assert sha256s(photos) == before
    written = sorted(p.name for p in (tmp_path / "masks").rglob("*") if p.is_file())
    assert written == ["x.png", "x_color.png", "x_overlay.jpg"]
    if case == "outputs share a name":  # x.jpg's colours, not x_color.jpg's mask at 32x32
        assert cv2.imread(str(tmp_path / "masks" / "x_color.png")).shape == (40, 40, 3)


def bad_card(source: Path, target: Path, key: str, raw: str) -> Path:
    """A copy of ONNX model ``source`` whose metadata ``key`` holds the text ``raw``."""
    model = onnx.load(str(source))
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = raw
    onnx.save(model, str(target))
    return target


ONNX_CARDS = {  # key: (stored text, what the error says it must be)
    "mean": ("[0.485, 0.456", "is not JSON"),
    "std": ("[0.229, 0.224, 0]", "within 0..1 and > 0"),
    "palette": ("[[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 256]]", "3 ints in 0..255"),
    "classes": ('["a", "b", "c"]', "5 names, one per output channel"),
    "inference": ('{"mode": "whole", "output_stride": 32, "crop_size": null, "stride": null, "scales": [-1.0], '
                  '"flip": false, "amp": "none"}', "a non-empty list of numbers in (0, 4]"),
    "color_order": ('"HSV"', "one of ('RGB', 'BGR')"),
}


@pytest.mark.parametrize("key", ONNX_CARDS)
def test_predict_refuses_bad_onnx_metadata(key, onnx_model, tmp_path, capsys):
    raw, expected = ONNX_CARDS[key]
    model = bad_card(onnx_model, tmp_path / "bad.onnx", key, raw)
    image = write(tmp_path / "photo.png", image_bytes())
    before = sha256s(tmp_path)
    code = predict_seg.main(["--onnx", str(model), str(image), "--out", str(tmp_path / "masks")])
    line = one_error(capsys, code, model, expected)
    assert f"metadata '{key}" in line
    assert sha256s(tmp_path) == before  # no empty output folder either


# --- export ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["out is a folder", "unsafe pickle"])
def test_export(case, ckpt, pickled, tmp_path, capsys):
    folder = tmp_path / "models"
    write(folder / "old.onnx", "an earlier export")
    if case == "out is a folder":
        argv, names = ["--checkpoint", str(ckpt), "--out", str(folder)], [f"--out {folder} is a folder"]
    else:
        argv, names = ["--checkpoint", str(pickled), "--out", str(folder / "m.onnx")], [pickled, "will not unpickle"]
    before = sha256s(tmp_path)
    one_error(capsys, export.main(argv), *names)
    assert sha256s(tmp_path) == before


# --- hub ---------------------------------------------------------------------------------------------

def _recipe(config: dict, **changes) -> dict:
    config["_seg"]["build_model"].update(changes)
    return config


HUB_CASES = {  # name: (change to config.json, words of the error)
    "not JSON": (lambda c: '{"_seg": ', "config.json is not valid JSON"),
    "not an object": (lambda c: [c], "config.json holds a JSON list"),
    "_seg not an object": (lambda c: {**c, "_seg": "build_model"}, "'_seg' must be an object with one key"),
    "unknown argument": (lambda c: _recipe(c, clases=3), "'_seg.build_model' has unknown keys ['clases']"),
    "missing argument": (lambda c: {**c, "_seg": {"build_model": {"arch": "fpn"}}}, "missing ['encoder', 'num_classes']"),
    "wrong type": (lambda c: _recipe(c, num_classes="three"), "'_seg.build_model.num_classes' must be int"),
    "wrong value": (lambda c: _recipe(c, arch="nope"), "'_seg.build_model' does not build a model: unknown arch"),
    "weights do not fit": (lambda c: _recipe(c, num_classes=4), "model.safetensors does not fit the model"),
    "unknown smp class": (lambda c: {"_model_class": "Nope", "_seg": {"attention": {"kind": "ca"}}},
                          "'_model_class' must name an smp model class"),
}


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hub")
    build_model("fpn", "mobilenet_v2", 3, attention=None).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case", HUB_CASES)
@pytest.mark.parametrize("load", [seg.from_pretrained, smp.from_pretrained], ids=["seg", "smp"])
def test_hub_load(case, load, hub_folder, tmp_path, capsys):
    folder = shutil.copytree(hub_folder, tmp_path / "model")
    change, words = HUB_CASES[case]
    config = change(json.loads((folder / "config.json").read_text()))
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    before = sha256s(folder)
    with pytest.raises(USER_ERRORS) as info:
        load(folder)
    assert isinstance(info.value, HubError) and isinstance(info.value, (UserError, ValueError))
    code = print_user_error(info.value)  # as a command line reports it
    named = folder / ("model.safetensors" if case == "weights do not fit" else "config.json")
    one_error(capsys, code, named, words)
    assert sha256s(folder) == before


# --- check_dataset -----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [*(f"{kind} image" for kind in BAD_IMAGES), "empty label"])
def test_check_dataset_reports(case, tiny_synthetic, tmp_path, capsys):
    root = shutil.copytree(tiny_synthetic, tmp_path / "data")
    if case == "empty label":
        bad, words = write(root / VOC / "SegmentationClass" / "val_00000.png", b""), "is empty"
    else:
        content, words = BAD_IMAGES[case.removesuffix(" image")]
        bad = root / VOC / "JPEGImages" / "val_00000.jpg"
        write(bad, content(bad.read_bytes()))
    before = sha256s(root)
    code = _script("check_dataset").main(["--name", "synthetic", "--root", str(root), "--workers", "0"])
    captured = capsys.readouterr()
    assert code == 1 and "Traceback" not in captured.out + captured.err, captured.err
    problems = [line for line in captured.out.splitlines() if line.startswith("problem:")]
    assert len(problems) == 1 and str(bad) in problems[0] and words in problems[0] and "BytesIO" not in problems[0]
    assert captured.out.splitlines()[-1].endswith("6 samples checked, 1 problem(s)")
    assert sha256s(root) == before


# --- the pixel limit holds with memory bounded ---------------------------------------------------------

BOUNDED_READ = """
import resource, sys
from pathlib import Path
from seg.data.base import DatasetError, read_image, read_label_png

# the address space used so far (torch, OpenCV...) plus a few hundred MB: decoding 30000x30000 RGB needs 2.7 GB
with open("/proc/self/status") as status:
    used = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (used + 300 * 2**20, resource.getrlimit(resource.RLIMIT_AS)[1]))
for path in sys.argv[1:]:
    for read in (read_image, read_label_png):
        try:
            read(Path(path))
        except DatasetError as err:
            print(err)
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmSize from /proc")
def test_header_bomb_is_refused_before_decoding_with_memory_bounded(tmp_path):
    bomb = write(tmp_path / "bomb.png", png_bomb())  # past PIL's own hard limit too
    small = write(tmp_path / "small.png", png_bomb(10000, 10000))  # only our limit stops this one
    assert len(bomb.read_bytes()) < 200
    done = subprocess.run([sys.executable, "-c", BOUNDED_READ, str(bomb), str(small)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    over = "over the limit of 89,478,485"
    assert done.stdout.splitlines() == [
        f"image {bomb} declares more than 178,956,970 pixels, {over}",
        f"label {bomb} declares more than 178,956,970 pixels, {over}",
        f"image {small} declares 10000x10000 = 100,000,000 pixels, {over}",
        f"label {small} declares 10000x10000 = 100,000,000 pixels, {over}",
    ], done.stdout
