"""Bad input to predict_seg.py: refusals (exit 2, one ``error:`` line, nothing written or read back),
unreadable images skipped and counted, and ONNX model cards checked on load. The shared helpers and
the two-step checkpoint are in tests/bad_input_cases.py; the other entry points in test_bad_inputs.py."""

import os
from pathlib import Path

import cv2
import pytest

import predict_seg
from tests.bad_input_cases import BAD_IMAGES, ckpt, image_bytes, one_error, onnx_model, pickled, sha256s, write  # noqa: F401 (fixtures)


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
                   "out is a file", "out is read-only", "unsafe pickle", "max-pixels above PIL's",
                   "reference with an ONNX model"]


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
    elif case == "reference with an ONNX model":
        model, flags = ["--onnx", str(ckpt)], ["--reference"]
        names = ["--reference applies to --checkpoint; an ONNX model runs on onnxruntime"]
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
    assert warnings[0].count(str(bad)) == 1, warnings[0]  # the path once, not again in the reason
    assert "predicted 1 image(s)" in captured.out and "skipped 1:" in captured.out
    assert sha256s(photos) == before
    written = sorted(p.name for p in (tmp_path / "masks").rglob("*") if p.is_file())
    assert written == ["x.png", "x_color.png", "x_overlay.jpg"]
    if case == "outputs share a name":  # x.jpg's colours, not x_color.jpg's mask at 32x32
        assert cv2.imread(str(tmp_path / "masks" / "x_color.png")).shape == (40, 40, 3)


def test_a_video_frames_folder_counts_among_its_outputs(tmp_path):
    from seg.inference.inputs import collect_inputs

    (tmp_path / "in" / "clip").mkdir(parents=True)
    (tmp_path / "in" / "clip.mp4").write_bytes(b"")
    (tmp_path / "in" / "clip" / "clip_000000.png").write_bytes(b"")  # where clip.mp4's first frame goes
    items, skipped = collect_inputs([str(tmp_path / "in")], tmp_path / "out", save_frames=True)
    assert [i.path.name for i in items] == ["clip_000000.png"]
    assert [(s.path.name, s.reason) for s in skipped] == [
        ("clip.mp4", f"its output {Path('clip/clip_000000.png')} would overwrite that of "
                     f"{tmp_path / 'in' / 'clip' / 'clip_000000.png'}")]
    items, skipped = collect_inputs([str(tmp_path / "in")], tmp_path / "out")  # no frames, no clash
    assert len(items) == 2 and not skipped


def bad_card(source: Path, target: Path, key: str, raw: str) -> Path:
    """A copy of ONNX model ``source`` whose metadata ``key`` holds the text ``raw``."""
    import onnx

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
