"""The standalone preparation scripts in datasets/: outputs, precedence rules, idempotence."""

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.io import savemat

from seg.data.base import read_label_png
from seg.data.cityscapes import label_ids_to_train_ids
from seg.data.palette import save_index_png
from tests.conftest import REPO, shared_path


def _script(name):
    # Registered in sys.modules so that Pool workers can unpickle the script's functions.
    spec = importlib.util.spec_from_file_location(f"datasets_{name}", REPO / "datasets" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _snapshot(folder: Path):
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


def _sbd_mat(path, mask):
    # Shaped like SBD's files: a struct with Segmentation next to other fields.
    boundaries = np.empty((20, 1), object)
    boundaries[:, 0] = [np.zeros(mask.shape, np.uint8) for _ in range(20)]
    savemat(path, {"GTcls": {"Segmentation": mask, "Boundaries": boundaries,
                             "CategoriesPresent": np.unique(mask[mask > 0]).astype(np.uint8)}})


@pytest.fixture()
def voc_and_sbd(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True)
    (voc / "ImageSets/Segmentation/train.txt").write_text("a\nb\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("c\n")
    for image_id in "abc":
        save_index_png(voc / "SegmentationClass" / f"{image_id}.png", np.full((6, 7), 255, np.uint8))
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    (sbd / "cls").mkdir(parents=True)
    (sbd / "train.txt").write_text("a\nd\n")
    (sbd / "val.txt").write_text("e\nc\n")
    for value, image_id in enumerate("adec"):
        _sbd_mat(sbd / "cls" / f"{image_id}.mat", np.full((6, 7), value + 3, np.uint8))
    return voc, sbd


def test_prepare_voc_aug(voc_and_sbd):
    voc, sbd = voc_and_sbd
    script = _script("prepare_voc_aug")
    script.main(["--sbd", str(sbd.parent), "--voc", str(voc.parents[1]), "--workers", "2"])
    assert (voc / "ImageSets/Segmentation/train_aug.txt").read_text() == "a\nb\nd\ne\n"
    aug = voc / "SegmentationClassAug"
    assert sorted(p.name for p in aug.iterdir()) == ["a.png", "b.png", "d.png", "e.png"]
    # VOC's own masks win over SBD's; SBD-only ids come from the .mat files.
    assert (aug / "a.png").read_bytes() == (voc / "SegmentationClass" / "a.png").read_bytes()
    assert (read_label_png(aug / "d.png") == 4).all() and (read_label_png(aug / "e.png") == 5).all()
    before = _snapshot(voc)
    script.main(["--sbd", str(sbd), "--voc", str(voc), "--workers", "2"])
    assert _snapshot(voc) == before


def test_sbd_mat_errors_name_the_file(tmp_path):
    script = _script("prepare_voc_aug")
    savemat(tmp_path / "x.mat", {"other": np.zeros(2)})
    with pytest.raises(ValueError, match="x.mat: expected an SBD .mat"):
        script.load_sbd_mask(tmp_path / "x.mat")
    _sbd_mat(tmp_path / "y.mat", np.full((3, 3), 40, np.uint8))
    with pytest.raises(ValueError, match="y.mat: Segmentation must be .* 0..20"):
        script.load_sbd_mask(tmp_path / "y.mat")


def test_prepare_cityscapes(tmp_path):
    sample = shared_path("data", "cityscapes_sample")
    shutil.copytree(sample, tmp_path / "cs")
    frame = tmp_path / "cs/gtFine/val/frankfurt/frankfurt_000000_000294"
    out = Path(f"{frame}_gtFine_labelTrainIds.png")
    out.unlink()
    script = _script("prepare_cityscapes")
    script.main(["--root", str(tmp_path / "cs"), "--workers", "2"])
    ours = read_label_png(out)
    np.testing.assert_array_equal(ours, label_ids_to_train_ids(read_label_png(Path(f"{frame}_gtFine_labelIds.png"))))
    shipped = read_label_png(sample / "gtFine/val/frankfurt" / out.name)
    assert (ours == shipped).mean() >= 0.997
    before = _snapshot(tmp_path / "cs")
    script.main(["--root", str(tmp_path / "cs"), "--workers", "2"])
    assert _snapshot(tmp_path / "cs") == before


def test_make_synthetic_cli_matches_library(tmp_path):
    from seg.data.synthetic import make_synthetic
    assert _script("make_synthetic").main(["--root", str(tmp_path / "cli"), "--n-train", "3", "--n-val", "2",
                                           "--size", "40"]) == 0
    voc = tmp_path / "cli" / "VOCdevkit" / "VOC2012"
    lib = make_synthetic(tmp_path / "lib", n_train=3, n_val=2, size=40)
    assert [(p.relative_to(voc), p.read_bytes()) for p in sorted(voc.rglob("*"))
            if p.is_file()] == [(p.relative_to(lib), p.read_bytes()) for p in sorted(lib.rglob("*")) if p.is_file()]


@pytest.mark.parametrize("name, argv, words", [
    ("prepare_cityscapes", ["--root", "{tmp}/nowhere"], "no *_gtFine_labelIds.png under {tmp}/nowhere/gtFine"),
    ("prepare_voc_aug", ["--sbd", "{tmp}/nowhere", "--voc", "{tmp}"], "{tmp}/nowhere has no cls/ folder"),
    ("make_synthetic", ["--root", "{tmp}/file.txt/sub"], "cannot write the synthetic dataset in {tmp}/file.txt/sub"),
])
def test_scripts_report_bad_paths_in_one_line(name, argv, words, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("a file where a folder is expected")
    code = _script(name).main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and words.format(tmp=tmp_path) in err
    assert err.count("\n") == 1 and "}}" not in err
