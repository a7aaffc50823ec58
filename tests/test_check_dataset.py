"""datasets/check_dataset.py finds every broken sample of a split, not just the first, and names it."""

import cv2
import numpy as np

from tests.test_data_prepare import _script


def _camvid(root, split, items):
    """Write CamVid ``split`` with ``items``: name -> (image HxWx3, label HxW)."""
    (root / split).mkdir(parents=True)
    (root / f"{split}annot").mkdir()
    for name, (image, label) in items.items():
        cv2.imwrite(str(root / split / f"{name}.jpg"), image)
        cv2.imwrite(str(root / f"{split}annot" / f"{name}.png"), label)


def test_every_problem_is_listed_with_its_file(tmp_path, capsys):
    rng = np.random.default_rng(0)
    image, label = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), np.zeros((16, 16), np.uint8)
    bad_label = label.copy()
    bad_label[2, 3] = 40
    _camvid(tmp_path, "train", {"good": (image, label), "cut": (image, label), "small": (image, label[:8]),
                                "range": (image, bad_label)})
    cut = tmp_path / "train" / "cut.jpg"
    cut.write_bytes(cut.read_bytes()[:200])
    _camvid(tmp_path, "val", {"a": (image, label)})
    (tmp_path / "valannot" / "a.png").unlink()
    script = _script("check_dataset")
    assert script.main(["--name", "camvid", "--root", str(tmp_path), "--splits", "train", "val", "test",
                        "--workers", "0"]) == 1
    lines = capsys.readouterr().out.splitlines()
    problems = [line for line in lines if line.startswith("problem: ")]
    assert len(problems) == 5, lines
    assert f"{cut} is truncated" in problems[0]
    assert "range.png holds values [40]" in problems[1]  # samples are in file-name order
    assert "small.jpg is 16x16 but its mask" in problems[2]
    assert problems[3].startswith("problem: val: 1 file(s)") and "a.jpg" in problems[3]
    assert problems[4].startswith("problem: test: CamVid folder")
    assert lines[-1] == f"camvid at {tmp_path}: 4 samples checked, 5 problem(s)"


def test_clean_dataset_passes_with_worker_processes(tmp_path, capsys):
    _camvid(tmp_path, "train", {f"s{i}": (np.zeros((8, 8, 3), np.uint8), np.full((8, 8), 11, np.uint8))
                                for i in range(3)})
    assert _script("check_dataset").main(["--name", "camvid", "--root", str(tmp_path), "--splits", "train",
                                          "--workers", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("3 samples checked, 0 problem(s)")


def test_no_progress_bar_is_drawn_into_a_pipe(tmp_path, capsys):
    rng = np.random.default_rng(0)
    _camvid(tmp_path, "train", {"a": (rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), np.zeros((16, 16), np.uint8))})
    assert _script("check_dataset").main(["--name", "camvid", "--root", str(tmp_path), "--splits", "train",
                                          "--workers", "0"]) == 0
    assert capsys.readouterr().err == ""  # pytest's capture is not a terminal, as a pipe or log file is not
