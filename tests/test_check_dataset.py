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
    cv2.imwrite(str(tmp_path / "trainannot" / "lost.png"), label)  # a label without its image
    _camvid(tmp_path, "val", {"a": (image, label)})
    (tmp_path / "valannot" / "a.png").unlink()
    script = _script("check_dataset")
    assert script.main(["--name", "camvid", "--root", str(tmp_path), "--splits", "train", "val", "test",
                        "--workers", "0"]) == 1
    lines = capsys.readouterr().out.splitlines()
    problems = [line for line in lines if line.startswith("problem: ")]
    expected = [  # a problem line starts so
        f"problem: {tmp_path / 'trainannot' / 'lost.png'} has no matching image (matched by stem)",
        f"problem: {cut} is truncated",  # the orphan did not stop the split's reading
        f"problem: label {tmp_path / 'trainannot' / 'range.png'} holds values [40]",  # in file-name order
        f"problem: image {tmp_path / 'train' / 'small.jpg'} is 16x16 but its mask",
        f"problem: {tmp_path / 'val' / 'a.jpg'} has no matching label (matched by stem)",
    ]
    assert len(problems) == len(expected) and all(map(str.startswith, problems, expected)), lines
    assert [line for line in lines if line.startswith("note: ")] == [
        f"note: test: CamVid folder {tmp_path / 'test'} not found"]  # what is absent, without the layout
    assert lines[-1] == f"camvid at {tmp_path}: 4 samples checked, 5 problem(s), 1 split(s) absent"


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


def test_withheld_test_split_is_a_note_and_workers_fit_the_cpus(tmp_path, capsys, monkeypatch):
    import seg.config
    from torch.utils import data

    sample = (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8))
    _camvid(tmp_path, "train", {"a": sample})
    _camvid(tmp_path, "val", {"b": sample})
    (tmp_path / "test").mkdir()  # a benchmark's test images, labels withheld
    cv2.imwrite(str(tmp_path / "test" / "c.jpg"), sample[0])
    script = _script("check_dataset")
    workers = []
    real = data.DataLoader.__init__

    def spy(self, *args, num_workers=0, **kwargs):
        workers.append(num_workers)
        real(self, *args, num_workers=0, **kwargs)  # read here: the count is what is checked

    monkeypatch.setattr(data.DataLoader, "__init__", spy)
    monkeypatch.setattr(script, "available_cpus", lambda: 2)
    assert script.main(["--name", "camvid", "--root", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"note: test: CamVid folder {tmp_path / 'testannot'} not found"
    assert lines[-1].endswith("2 samples checked, 0 problem(s), 1 split(s) absent")
    assert workers == [2, 2]  # the default 4, capped at the 2 CPUs
    assert script.main(["--name", "camvid", "--root", str(tmp_path / "nowhere"), "--workers", "0"]) == 1
    assert "problem: none of the splits ['train', 'val', 'test'] is there" in capsys.readouterr().out
