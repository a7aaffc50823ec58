"""predict_seg.py and seg.Predictor on a tiny trained synthetic run (CPU): equal to eval_seg --save-dir,
folders with bad files, videos, ONNX, and the user errors."""

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from numerics import with_measured_bn
import eval_seg
import predict_seg
import seg.export.onnx as export
import train_seg
from seg import Predictor
from seg.data import IMAGENET_MEAN, IMAGENET_STD, build_dataset
from seg.data.synthetic import SYNTHETIC_CLASSES, SYNTHETIC_PALETTE
from seg.export.runtime import read_model_card
from seg.modeling.models import model_from_checkpoint
from seg.runs.checkpoint import checkpoint_config, load_checkpoint

SIZE = 40  # not a multiple of the model's stride: padding and cropping back are exercised


def run_args(root: Path) -> list[str]:
    return [
        "data.name=synthetic", f"data.root={root}", "data.num_classes=5", "data.crop_size=32",
        "data.batch_size=2", "data.val_batch_size=2", "data.num_workers=0", "data.synthetic_train_images=4",
        "data.synthetic_val_images=3", f"data.synthetic_image_size={SIZE}", "model.decoder_channels=8",
        "optim.name=adamw", "optim.lr=0.01", "optim.warmup_iters=0", "train.iters=2", "train.eval_interval=2",
        "train.log_interval=1", "train.vis_images=0", "train.device=cpu",
    ]


def _balance_head(checkpoint: Path, images: list[np.ndarray], mode: str) -> None:
    """Set the head's bias so that every class has the same mean logit over ``images`` in ``mode``.

    Then no class can win every pixel unless all tie there, so the masks hold several classes and a
    comparison of masks means something. One bias cannot do this for both modes: sliding windows see
    features of their own, and a bias balanced over both left the whole-image masks one class on
    some CPUs."""
    features = []
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu", mode=mode)
    hook = predictor.model.segmentation_head[0].register_forward_hook(
        lambda module, args, output: features.append(args[0].mean((0, 2, 3))))
    predictor.predict_batch(images)
    hook.remove()
    ckpt = load_checkpoint(checkpoint)
    weight = ckpt["model"]["segmentation_head.0.weight"]
    ckpt["model"]["segmentation_head.0.bias"] = -(weight.flatten(1) @ torch.stack(features).mean(0))
    torch.save(ckpt, checkpoint)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A trained run whose best.pt is balanced for whole-image inference, and best_slide.pt for sliding windows."""
    out = tmp_path_factory.mktemp("run")
    root = tmp_path_factory.mktemp("data")
    assert train_seg.main(["--out", str(out), *run_args(root)]) == 0
    # Two iterations leave BN near its init statistics, where the logits hardly depend on the image (2e-9
    # between two, at a scale of 0.007, under export's 1e-3 limit): measured statistics make them depend on it.
    ckpt = load_checkpoint(out / "best.pt")
    model = model_from_checkpoint(ckpt, checkpoint_config(ckpt, "best.pt"), torch.device("cpu"))
    ckpt["model"] = with_measured_bn(model, 2, 3, 32, 32).state_dict()
    torch.save(ckpt, out / "best.pt")
    shutil.copyfile(out / "best.pt", out / "best_slide.pt")
    images = [_rgb(path) for path, _ in build_dataset("synthetic", root, "val").samples]
    _balance_head(out / "best.pt", images, "whole")
    _balance_head(out / "best_slide.pt", images, "slide")
    return out


@pytest.fixture(scope="module")
def val_images(run) -> list[Path]:
    root = Path(checkpoint_config(load_checkpoint(run / "best.pt")).data.root)
    return [Path(image) for image, _ in build_dataset("synthetic", root, "val").samples]


def _predict(argv: list[str], capsys) -> tuple[int, str, str]:
    code = predict_seg.main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def _rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_masks_equal_eval_save_dir(run, val_images, tmp_path, capsys, mode):
    argv = ["--checkpoint", str(run / ("best.pt" if mode == "whole" else "best_slide.pt")), "--mode", mode]
    assert eval_seg.main([*argv, "--save-dir", str(tmp_path / "eval")]) == 0
    code, out, _ = _predict([*argv, "--batch", "2", *map(str, val_images), "--out", str(tmp_path / "pred")], capsys)
    assert code == 0 and "predicted 3 image(s)" in out
    distinct = set()
    for image in val_images:
        expected = cv2.imread(str(tmp_path / "eval" / f"{image.stem}.png"), cv2.IMREAD_UNCHANGED)
        got = cv2.imread(str(tmp_path / "pred" / f"{image.stem}.png"), cv2.IMREAD_UNCHANGED)
        assert got.dtype == np.uint8 and got.shape == (SIZE, SIZE)
        np.testing.assert_array_equal(got, expected)
        distinct.update(np.unique(got).tolist())
        for suffix in ("_color.png", "_overlay.jpg"):
            assert (tmp_path / "pred" / f"{image.stem}{suffix}").is_file()
    assert len(distinct) > 1  # a constant mask would match anything


def test_reference_switch_runs_the_papers_layers_and_says_so(run, val_images, tmp_path, capsys):
    outputs = {}
    for flag in ([], ["--reference"]):
        out = tmp_path / ("reference" if flag else "fast")
        code, stdout, _ = _predict(["--checkpoint", str(run / "best.pt"), *flag, *map(str, val_images),
                                    "--out", str(out)], capsys)
        assert code == 0
        outputs[out.name] = (stdout, [cv2.imread(str(out / f"{i.stem}.png"), cv2.IMREAD_UNCHANGED) for i in val_images])
    assert "(lean path)" in outputs["fast"][0] and "(reference path)" in outputs["reference"][0]
    disagree = sum(int((a != b).sum()) for a, b in zip(outputs["fast"][1], outputs["reference"][1]))
    assert disagree <= 1e-3 * len(val_images) * SIZE * SIZE  # rounding may flip a tie, nothing more


def test_folder_tree_with_bad_files(run, val_images, tmp_path, capsys):
    src = tmp_path / "photos"
    (src / "a" / "b").mkdir(parents=True)
    image = _rgb(val_images[0])
    cv2.imwrite(str(src / "top.png"), image[..., ::-1])
    cv2.imwrite(str(src / "a" / "wide.jpg"), cv2.resize(image, (56, 24))[..., ::-1])
    cv2.imwrite(str(src / "a" / "b" / "small.png"), cv2.resize(image, (20, 30))[..., ::-1])
    good = cv2.imencode(".jpg", image[..., ::-1])[1].tobytes()
    (src / "a" / "b" / "cut.jpg").write_bytes(good[: len(good) // 2])
    (src / "a" / "notes.txt").write_text("not an image")
    out = tmp_path / "masks"
    code, stdout, err = _predict(["--checkpoint", str(run / "best.pt"), str(src), "--out", str(out), "--batch", "3"],
                                 capsys)
    assert code == 2
    assert "predicted 3 image(s)" in stdout and "skipped 2" in stdout
    warnings = [line for line in err.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 2 and any("cut.jpg" in w for w in warnings) and any("notes.txt" in w for w in warnings)
    for rel, (h, w) in (("top", (SIZE, SIZE)), ("a/wide", (24, 56)), ("a/b/small", (30, 20))):
        assert cv2.imread(str(out / f"{rel}.png"), cv2.IMREAD_UNCHANGED).shape == (h, w), rel
        assert (out / f"{rel}_color.png").is_file() and (out / f"{rel}_overlay.jpg").is_file()
    assert not list(out.rglob("cut*")) and not list(out.rglob(".*"))  # nothing half-written, no temp files left


def test_video_overlay_keeps_frames_size_and_fps(run, val_images, tmp_path, capsys):
    video, fps, frames = tmp_path / "clip.mp4", 12.0, 5
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), fps, (48, 32))
    base = cv2.resize(_rgb(val_images[0]), (48, 32))
    for i in range(frames):
        writer.write(np.roll(base, 4 * i, axis=1)[..., ::-1].copy())
    writer.release()
    out = tmp_path / "out"
    code, stdout, _ = _predict(["--checkpoint", str(run / "best.pt"), str(video), "--out", str(out), "--batch", "2",
                                "--save-frames"], capsys)
    assert code == 0 and f"{frames} video frame(s)" in stdout
    result = cv2.VideoCapture(str(out / "clip_overlay.mp4"))
    count = 0
    while result.read()[0]:
        count += 1
    assert count == frames
    assert (result.get(cv2.CAP_PROP_FRAME_WIDTH), result.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (48, 32)
    assert result.get(cv2.CAP_PROP_FPS) == pytest.approx(fps)
    assert len(list((out / "clip").glob("clip_*_overlay.jpg"))) == frames


def test_image_outputs_are_the_mask_its_colours_and_an_overlay_at_the_asked_alpha(run, val_images, tmp_path, capsys):
    image, out = val_images[0], tmp_path / "out"
    code, _, _ = _predict(["--checkpoint", str(run / "best.pt"), str(image), "--out", str(out), "--overlay-alpha",
                           "0.8"], capsys)
    assert code == 0
    labels = cv2.imread(str(out / f"{image.stem}.png"), cv2.IMREAD_UNCHANGED)
    colors = cv2.imread(str(out / f"{image.stem}_color.png"), cv2.IMREAD_COLOR_RGB)
    blend = cv2.imread(str(out / f"{image.stem}_overlay.jpg"), cv2.IMREAD_COLOR_RGB).astype(np.float64)
    assert len(np.unique(labels)) >= 2  # several colours, so that their placement is checked
    np.testing.assert_array_equal(colors, SYNTHETIC_PALETTE[labels])
    # 0.8 of the image and 0.2 of the colours, to JPEG's accuracy, in luma: JPEG halves the chroma's
    # resolution, which costs ~5 per pixel at these 40 px. Measured: 1.4, against 19 for 0.5 and 37 for 0.2.
    luma = np.array([0.299, 0.587, 0.114])
    err = np.abs(blend @ luma - (0.8 * _rgb(image) + 0.2 * colors) @ luma).mean()
    assert err < 4, err


def test_video_frames_reach_the_model_in_rgb_as_images_do(run, tmp_path, monkeypatch, capsys):
    seen = []
    real = Predictor.predict_batch
    monkeypatch.setattr(Predictor, "predict_batch", lambda self, images: seen.extend(images) or real(self, images))
    red = np.zeros((32, 48, 3), np.uint8)
    red[..., 0] = 250  # RGB
    cv2.imwrite(str(tmp_path / "red.png"), red[..., ::-1])
    writer = cv2.VideoWriter(str(tmp_path / "red.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (48, 32))
    for _ in range(2):
        writer.write(np.ascontiguousarray(red[..., ::-1]))
    writer.release()
    code, _, _ = _predict(["--checkpoint", str(run / "best.pt"), str(tmp_path / "red.png"), str(tmp_path / "red.mp4"),
                           "--out", str(tmp_path / "out")], capsys)
    assert code == 0 and len(seen) == 3  # the image, then both frames
    for frame in seen:
        assert frame[..., 0].mean() > 200 and frame[..., 2].mean() < 50


def test_predictor_api_one_image_and_batch(run, val_images):
    predictor = Predictor.from_checkpoint(run / "best.pt", device="cpu")
    assert predictor.classes[0] == "background" and predictor.palette.shape == (5, 3)
    images = [_rgb(val_images[0]), cv2.resize(_rgb(val_images[1]), (24, 36)), _rgb(val_images[2])]
    masks = predictor.predict_batch(images)
    assert [m.shape for m in masks] == [(SIZE, SIZE), (36, 24), (SIZE, SIZE)]
    assert all(m.dtype == np.uint8 and m.max() < 5 for m in masks)
    np.testing.assert_array_equal(predictor.predict(images[1]), masks[1])
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        predictor.predict(images[0].astype(np.float32))


@pytest.fixture(scope="module")
def onnx_model(run, tmp_path_factory) -> Path:
    model = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert export.main(["--checkpoint", str(run / "best.pt"), "--out", str(model), "--dynamic"]) == 0
    return model


def test_onnx_metadata_describes_the_model(onnx_model):
    card = read_model_card(onnx_model)
    assert card["classes"] == list(SYNTHETIC_CLASSES) and np.array_equal(card["palette"], SYNTHETIC_PALETTE)
    assert card["mean"] == list(IMAGENET_MEAN) and card["std"] == list(IMAGENET_STD)
    assert (card["color_order"], card["input_stride"], card["pads_inside"]) == ("RGB", 16, True)
    assert card["inference"]["mode"] == "whole" and card["slide_window"]["crop_size"] == 32


def test_dynamic_onnx_returns_the_input_size(run, onnx_model):
    images = export.check_images(86, 117, count=1)
    logits = export.run_onnx(onnx_model, images)
    assert logits.shape == (1, 5, 86, 117)
    model, _ = export.load_for_export(run / "best.pt")
    with torch.no_grad():  # PyTorch on the image padded to the stride, cropped back
        padded = torch.nn.functional.pad(torch.from_numpy(images), (0, 11, 0, 10))
        expected = model(padded)[..., :86, :117].numpy()
    assert np.abs(logits - expected).max() < export.MAX_ABS_DIFF


def test_onnx_agrees_with_pytorch(run, onnx_model, val_images, tmp_path, capsys):
    model = onnx_model
    inputs = [*map(str, val_images), "--out"]
    assert _predict(["--checkpoint", str(run / "best.pt"), *inputs, str(tmp_path / "torch")], capsys)[0] == 0
    assert _predict(["--onnx", str(model), *inputs, str(tmp_path / "onnx")], capsys)[0] == 0
    agree = total = 0
    for image in val_images:
        a, b = (cv2.imread(str(tmp_path / d / f"{image.stem}.png"), cv2.IMREAD_UNCHANGED) for d in ("torch", "onnx"))
        agree, total = agree + int((a == b).sum()), total + a.size
    assert agree / total >= 0.999


@pytest.mark.parametrize("case", ["missing input", "empty folder", "out is a file", "not our checkpoint",
                                  "missing checkpoint"])
def test_user_errors_are_one_line_and_write_nothing(run, tmp_path, capsys, case):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "foreign.pt").write_bytes(b"not ours")
    image = tmp_path / "img.png"
    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    ckpt, inputs, out = str(run / "best.pt"), [str(image)], tmp_path / "out"
    if case == "missing input":
        inputs = [str(tmp_path / "nope.jpg")]
    elif case == "empty folder":
        inputs = [str(tmp_path / "empty")]
    elif case == "out is a file":
        out = tmp_path / "file"
    elif case == "not our checkpoint":
        ckpt = str(tmp_path / "foreign.pt")
    else:
        ckpt = str(tmp_path / "nope.pt")
    code, _, err = _predict(["--checkpoint", ckpt, *inputs, "--out", str(out)], capsys)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()



def test_help_explains_every_flag(capsys):
    actions = [a for a in predict_seg.build_parser()._actions if a.dest != "help"]
    assert all(a.help for a in actions), [a.dest for a in actions if not a.help]
    with pytest.raises(SystemExit) as exit_info:
        predict_seg.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(flag in text for a in actions for flag in a.option_strings)


class FirstAndLastChannel(torch.nn.Module):
    """Two-class logits: the normalised first and last input channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, [0, 2]]


@pytest.mark.parametrize("order, expected", [("RGB", 0), ("BGR", 1)])
def test_color_order_of_the_card_is_honoured(order, expected):
    card = {"classes": ["red", "blue"], "palette": [[255, 0, 0], [0, 0, 255]], "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5], "color_order": order, "slide_window": {"crop_size": 32, "stride": None},
            "inference": {"mode": "whole", "output_stride": 1, "crop_size": None, "stride": None, "scales": [1.0],
                          "flip": False, "amp": "none"}}
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255  # RGB: the model's first channel is red; BGR: its last
    assert (Predictor(FirstAndLastChannel(), card).predict(red) == expected).all()
