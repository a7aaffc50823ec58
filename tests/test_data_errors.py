"""Bad input gives a clear error that names the file and what was expected."""

import multiprocessing
import pickle
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

import train_seg
from seg.data import DatasetError, build_dataset
from seg.data.base import SplitMissing
from seg.data.camvid import CamVid
from seg.data.cityscapes import Cityscapes
from seg.data.palette import save_index_png
from seg.data.synthetic import SyntheticSegmentation, make_synthetic
from seg.data.voc import VOCSegmentation
from seg.errors import print_user_error

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def voc(tmp_path):
    """A tiny dataset in the VOC layout (train_00000..3, val_00000..1)."""
    return make_synthetic(tmp_path, n_train=4, n_val=2, size=32)


def test_missing_root_describes_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="JPEGImages"):
        VOCSegmentation(tmp_path / "nowhere", "train")


@pytest.mark.parametrize("config, missing", [
    ("voc_os16_mobilenet_v2.yaml", ""), ("cityscapes_os8_mobilenet_v2.yaml", "leftImg8bit/train"),
    ("camvid_mobilenet_v2.yaml", "train"),
])
def test_a_wrong_root_is_one_error_line_naming_the_path_and_layout(config, missing, tmp_path, capsys):
    root = tmp_path / "empty"
    root.mkdir()
    argv = ["--config", str(REPO / "configs" / config), "--out", str(tmp_path / "run"), f"data.root={root}",
            "train.device=cpu"]
    assert train_seg.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"{root / missing}".rstrip("/") in err and "; expected <root>/" in err
    assert not (tmp_path / "run").exists()


def test_a_missing_split_keeps_its_parts_through_pickling():
    err = pickle.loads(pickle.dumps(SplitMissing("x not found", "<root>/x")))  # as from a worker process
    assert (str(err), err.absent, err.expected) == ("x not found; expected <root>/x", "x not found", "<root>/x")
    assert isinstance(err, DatasetError) and isinstance(err, FileNotFoundError)


def test_user_errors_print_as_one_line_whatever_the_message(capsys):
    assert print_user_error(FileNotFoundError("no file\n  at  /a b/c\n")) == 2
    assert capsys.readouterr().err == "error: no file at  /a b/c\n"  # spaces inside a line are kept


def test_missing_split_list_names_it(voc):
    with pytest.raises(DatasetError, match=r"trainval\.txt not found(.|\n)*SegmentationClass"):
        VOCSegmentation(voc, "trainval")


def test_missing_listed_files_are_named(voc):
    (voc / "JPEGImages" / "train_00001.jpg").unlink()
    (voc / "SegmentationClass" / "train_00003.png").unlink()
    with pytest.raises(DatasetError, match=r"2 file\(s\)(.|\n)*train_00001\.jpg(.|\n)*train_00003\.png"):
        SyntheticSegmentation(voc, "train")
    lenient = SyntheticSegmentation(voc, "train", strict=False)  # as check_dataset reads a split
    assert [image.stem for image, _ in lenient.samples] == ["train_00000", "train_00002"]
    listed = voc / "ImageSets" / "Segmentation" / "train.txt"
    assert lenient.problems == [f"{voc / 'JPEGImages' / 'train_00001.jpg'} is missing (listed by {listed})",
                                f"{voc / 'SegmentationClass' / 'train_00003.png'} is missing (listed by {listed})"]
    assert SyntheticSegmentation(voc, "val").problems == []


def test_unreadable_image(voc):
    (voc / "JPEGImages" / "train_00000.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match="cannot read image .*train_00000.jpg"):
        SyntheticSegmentation(voc, "train")[0]


def test_unreadable_mask(voc):
    (voc / "SegmentationClass" / "train_00000.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetError, match="cannot read label .*train_00000.png"):
        SyntheticSegmentation(voc, "train")[0]


def test_size_mismatch(voc):
    save_index_png(voc / "SegmentationClass" / "train_00002.png", np.zeros((20, 30), np.uint8))
    with pytest.raises(DatasetError, match=r"train_00002.jpg is 32x32 but its mask .*train_00002.png is 30x20"):
        SyntheticSegmentation(voc, "train")[2]


@pytest.mark.parametrize("dataset_class,bad", [(SyntheticSegmentation, 5), (VOCSegmentation, 21)])
def test_mask_values_out_of_range(voc, dataset_class, bad):
    mask = np.zeros((32, 32), np.uint8)
    mask[3, 4] = bad
    save_index_png(voc / "SegmentationClass" / "val_00001.png", mask)
    dataset = dataset_class(voc, "val")
    dataset[0]  # the untouched sample still loads
    with pytest.raises(DatasetError, match=rf"val_00001.png holds values \[{bad}\]; expected 0..{bad - 1} or 255"):
        dataset[1]


def test_rgb_mask_is_rejected(voc):
    cv2.imwrite(str(voc / "SegmentationClass" / "val_00000.png"), np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(DatasetError, match="val_00000.png has PIL mode 'RGB'"):
        SyntheticSegmentation(voc, "val")[0]


def _camvid(tmp_path, label_value):
    for folder in ("train", "trainannot"):
        (tmp_path / folder).mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "train" / "a.png"), np.zeros((8, 8, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "trainannot" / "a.png"), np.full((8, 8), label_value, np.uint8))
    return tmp_path


def test_camvid_void_becomes_ignore_and_bad_label_fails(tmp_path):
    assert (CamVid(_camvid(tmp_path / "ok", 11), "train")[0][1] == 255).all()
    with pytest.raises(DatasetError, match=r"a.png holds values \[12\]"):
        CamVid(_camvid(tmp_path / "bad", 12), "train")[0]


def test_camvid_orphans_are_named(tmp_path):
    root = _camvid(tmp_path, 0)
    cv2.imwrite(str(root / "train" / "b.jpg"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DatasetError, match="no matching label .*b.jpg"):
        CamVid(root, "train")
    lenient = CamVid(root, "train", strict=False)
    assert lenient.samples == [(root / "train" / "a.png", root / "trainannot" / "a.png")]
    assert lenient.problems == [f"{root / 'train' / 'b.jpg'} has no matching label (matched by stem)"]
    with pytest.raises(FileNotFoundError, match="valannot"):
        (root / "val").mkdir()
        CamVid(root, "val")


def test_cityscapes_missing_annotation(tmp_path):
    from tests.conftest import shared_path
    sample = shared_path("data", "cityscapes_sample")
    shutil.copytree(sample / "leftImg8bit", tmp_path / "leftImg8bit")
    (tmp_path / "gtFine" / "val").mkdir(parents=True)  # present but empty; no gtFine/val at all is a withheld split
    with pytest.raises(DatasetError, match="1 annotation.*frankfurt_000000_000294_gtFine_labelIds.png"):
        Cityscapes(tmp_path, "val")
    lenient = Cityscapes(tmp_path, "val", strict=False)
    missing = tmp_path / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000294_gtFine_labelIds.png"
    assert (lenient.samples, lenient.problems) == ([], [f"annotation {missing} is missing"])
    with pytest.raises(SplitMissing, match=r"^Cityscapes folder .*leftImg8bit/train not found; expected <root>/"):
        Cityscapes(tmp_path, "train")
    (tmp_path / "leftImg8bit" / "train").mkdir()
    with pytest.raises(DatasetError, match=r"^no \*_leftImg8bit.png files under .*train; expected <root>/"):
        Cityscapes(tmp_path, "train")


def test_unknown_dataset_name_lists_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'coco'.*'camvid', 'cityscapes', 'synthetic', 'voc'"):
        build_dataset("coco", tmp_path, "train")


def test_camvid_colour_label_is_rejected(tmp_path):
    root = _camvid(tmp_path, 0)
    cv2.imwrite(str(root / "trainannot" / "a.png"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"a.png is uint8 with shape \(8, 8, 3\); expected an 8-bit single"):
        CamVid(root, "train")[0]


def _cut(path, keep: float = 0.6):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_jpeg_is_refused_while_padded_one_reads(voc):
    jpeg = voc / "JPEGImages" / "train_00001.jpg"
    complete = SyntheticSegmentation(voc, "train")[1][0]
    jpeg.write_bytes(jpeg.read_bytes() + b"\0" * 16 + b"vendor trailer")  # bytes after the end marker are harmless
    assert np.array_equal(SyntheticSegmentation(voc, "train")[1][0], complete)
    _cut(jpeg)
    # OpenCV alone would return a grey-filled image here, and only libjpeg's nameless warning
    assert cv2.imread(str(jpeg)) is not None
    with pytest.raises(DatasetError, match=r"train_00001.jpg is truncated"):
        SyntheticSegmentation(voc, "train")[1]


def test_truncated_png_image_and_labels_are_refused(voc, tmp_path):
    _cut(voc / "SegmentationClass" / "val_00000.png", keep=0.9)  # palette label, read by PIL
    with pytest.raises(DatasetError, match=r"val_00000.png is truncated"):
        SyntheticSegmentation(voc, "val")[0]
    root = _camvid(tmp_path / "camvid", 0)
    rng = np.random.default_rng(0)
    cv2.imwrite(str(root / "train" / "a.png"), rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    _cut(root / "train" / "a.png")
    with pytest.raises(DatasetError, match=r"train/a.png is truncated"):
        CamVid(root, "train")[0]
    _camvid(tmp_path / "camvid2", 0)
    _cut(tmp_path / "camvid2" / "trainannot" / "a.png", keep=0.95)  # gray label, read by OpenCV
    with pytest.raises(DatasetError, match=r"trainannot/a.png is truncated"):
        CamVid(tmp_path / "camvid2", "train")[0]


def test_worker_errors_are_unwrapped_to_the_dataset_message(voc):
    from seg.data import build_eval_transform, build_loader

    _cut(voc / "JPEGImages" / "val_00001.jpg")
    loader = build_loader(SyntheticSegmentation(voc, "val", build_eval_transform()), 1, train=False, num_workers=1)
    before = set(multiprocessing.active_children())
    with pytest.raises(DatasetError) as info:
        list(loader)
    assert str(info.value).startswith(str(voc / "JPEGImages" / "val_00001.jpg")) and "\n" not in str(info.value)
    # the worker is shut down with the error, while the error is still held (not at a later collection)
    assert info.value.__context__ is None
    assert not set(multiprocessing.active_children()) - before
