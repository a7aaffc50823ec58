"""Readers against the real sample files in ../shared/data (skipped when absent)."""

import cv2
import numpy as np
from cityscapesscripts.helpers.labels import id2label, trainId2label
from PIL import Image

from seg.data.camvid import CamVid
from seg.data.cityscapes import CITYSCAPES_CLASSES, Cityscapes, TRAIN_ID_LUT
from seg.data.voc import VOCSegmentation
from tests.conftest import shared_path


def test_voc_sample_keeps_indices_and_void_border():
    root = shared_path("data", "voc_sample")
    dataset = VOCSegmentation(root, "val")
    assert len(dataset) == 3 and dataset.num_classes == 21 and dataset.palette.shape == (21, 3)
    values = set()
    for i, (image, mask) in enumerate(dataset):
        assert image.dtype == np.uint8 and image.shape == (*mask.shape, 3)
        values |= set(np.unique(mask).tolist())
        np.testing.assert_array_equal(mask, np.array(Image.open(dataset.samples[i][1])))
    assert values <= set(range(21)) | {255} and len(values) > 4
    assert dataset.samples[0][0].stem == "2011_000003" and 255 in dataset[0][1]  # its void border is kept
    # RGB order: OpenCV decodes BGR, the dataset must hand out RGB.
    np.testing.assert_array_equal(image, cv2.imread(str(dataset.samples[-1][0]))[..., ::-1])


def test_cityscapes_lut_matches_label_table():
    for label_id in range(256):
        label = id2label.get(label_id)
        expected = label.trainId if label is not None and 0 <= label.trainId < 19 else 255
        assert TRAIN_ID_LUT[label_id] == expected, label_id
    assert CITYSCAPES_CLASSES == tuple(trainId2label[t].name for t in range(19))


def test_cityscapes_label_ids_agree_with_shipped_train_ids():
    root = shared_path("data", "cityscapes_sample")
    mapped = Cityscapes(root, "val", target="labelIds")
    shipped = Cityscapes(root, "val", target="labelTrainIds")
    assert len(mapped) == 1 and mapped.num_classes == 19
    (image, ours), (_, theirs) = mapped[0], shipped[0]
    assert image.shape == (128, 256, 3) and ours.shape == (128, 256)
    assert (ours == theirs).mean() >= 0.997
    assert set(np.unique(ours).tolist()) <= set(range(19)) | {255}


def test_camvid_counts_and_labels():
    root = shared_path("data", "camvid")
    train, val = CamVid(root, "train"), CamVid(root, "val")
    assert (len(train), len(val)) == (367, 101) and train.num_classes == 11
    seen = set()
    for i in range(0, len(train), 60):
        image, mask = train[i]
        assert image.shape == (360, 480, 3) and mask.shape == (360, 480)
        seen |= set(np.unique(mask).tolist())
    assert seen <= set(range(11)) | {255} and 255 in seen and 11 not in seen


def test_camvid_accepts_jpeg_images(tmp_path):
    root = shared_path("data", "camvid")
    (tmp_path / "val").mkdir()
    (tmp_path / "valannot").mkdir()
    for png in sorted((root / "val").iterdir())[:3]:
        cv2.imwrite(str(tmp_path / "val" / f"{png.stem}.jpg"), cv2.imread(str(png)))
        (tmp_path / "valannot" / png.name).write_bytes((root / "valannot" / png.name).read_bytes())
    dataset = CamVid(tmp_path, "val")
    assert len(dataset) == 3
    image, mask = dataset[0]
    assert image.shape == (360, 480, 3) and mask.shape == (360, 480)
