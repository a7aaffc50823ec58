"""End to end on real CamVid frames from ../shared (skipped without it): the CPU recipe's config with
tiny sizes, then eval_seg. Checks train.log's plain lines, the thread setting, the TensorBoard
legend / scalars / CA overlays, the eval JSON's description of itself, and the class-index PNGs
against an independent numpy confusion matrix."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import eval_seg
import train_seg
from conftest import shared_path

REPO = Path(__file__).resolve().parents[1]
CAMVID_VOID, CLASSES = 11, 11
TRAIN_FRAMES, VAL_FRAMES = 4, 3


@pytest.fixture(scope="module")
def camvid(tmp_path_factory):
    """A few train and val frames of the real set, linked into the SegNet layout."""
    source = shared_path("data", "camvid")
    root = tmp_path_factory.mktemp("camvid")
    for split, count in (("train", TRAIN_FRAMES), ("val", VAL_FRAMES)):
        names = sorted(p.name for p in (source / split).glob("*.png"))
        for name in [names[i] for i in np.linspace(0, len(names) - 1, count).round().astype(int)]:
            for folder in (split, f"{split}annot"):
                (root / folder).mkdir(exist_ok=True)
                (root / folder / name).symlink_to(source / folder / name)
    return root


@pytest.fixture(scope="module")
def run(camvid, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    threads = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "set_num_threads", threads.append)  # record, leave the test process at 1
        argv = ["--config", str(REPO / "configs" / "camvid_cpu.yaml"), "--out", str(out), f"data.root={camvid}",
                "data.crop_size=64", "data.batch_size=2", "data.val_batch_size=3", "data.num_workers=0",
                "model.decoder_channels=16", "train.iters=4", "train.eval_interval=4", "train.log_interval=2",
                "train.vis_images=2", "train.ca_maps=true", "train.threads=1"]
        assert train_seg.main(argv) == 0
    return out, threads


def test_train_log_has_plain_progress_lines_and_threads_are_set(run):
    out, threads = run
    log = (out / "train.log").read_text()
    assert "\r" not in log
    lines = re.findall(r"iter (\d+)/4: loss [\d.]+, lr [\d.e+-]+, [\d.]+ img/s", log)
    assert lines == ["2", "4"]
    assert threads == [1]  # train.threads


def test_tensorboard_has_legend_accuracy_scalars_and_unpadded_ca_overlays(run):
    events = EventAccumulator(str(run[0]), size_guidance={"images": 0}).Reload()
    assert {"val/mean_acc", "val/fwiou", "val/miou", "val/pixel_acc"} <= set(events.Tags()["scalars"])
    (legend,) = events.Images("legend")
    assert legend.height == 22 * (CLASSES + 1)
    overlay = events.Images("ca_maps/0")[-1]
    # 360x480 frames run padded to 384x480; the maps are cut back to the frame, three blocks side by side
    assert (overlay.height, overlay.width) == (360, 3 * 480 + 2 * 4)


@pytest.fixture(scope="module")
def evaluated(run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    threads = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "set_num_threads", threads.append)
        argv = ["--checkpoint", str(run[0] / "last.pt"), "--json", str(folder / "eval.json"),
                "--save-dir", str(folder / "pred")]
        assert eval_seg.main(argv) == 0
    return folder, threads


def test_eval_json_says_what_it_measured(evaluated, run, camvid):
    folder, threads = evaluated
    report = json.loads((folder / "eval.json").read_text())
    assert report["checkpoint"] == str((run[0] / "last.pt").resolve())
    assert (report["dataset"], report["data_root"], report["split"]) == ("camvid", str(camvid.resolve()), "val")
    assert (report["mode"], report["scales"], report["flip"]) == ("whole", [1.0], False)
    assert (report["crop_size"], report["stride"], report["images"]) == (None, None, VAL_FRAMES)
    assert threads == [1]  # the checkpoint's train.threads holds for evaluation too


def test_class_index_pngs_score_what_the_json_says(evaluated, camvid):
    folder, _ = evaluated
    report = json.loads((folder / "eval.json").read_text())
    confusion = np.zeros((CLASSES, CLASSES), dtype=np.int64)
    for label_path in sorted((camvid / "valannot").iterdir()):
        label = np.array(Image.open(label_path))
        pred = np.array(Image.open(folder / "pred" / label_path.name))
        assert pred.dtype == np.uint8 and pred.shape == label.shape
        assert set(np.unique(pred)) <= set(range(CLASSES)) | {255}
        assert (folder / "pred" / f"{label_path.stem}_color.png").is_file()
        valid = label != CAMVID_VOID
        confusion += np.bincount(CLASSES * label[valid].astype(np.int64) + pred[valid],
                                 minlength=CLASSES ** 2).reshape(CLASSES, CLASSES)
    tp = np.diag(confusion).astype(float)
    union = confusion.sum(0) + confusion.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / union
    assert report["miou"] == pytest.approx(np.nanmean(iou), abs=1e-9)
