"""Bad input, one table per entry point: each case exits 2 with exactly one ``error:`` line naming the
file or key, no traceback, and leaves every file it was given, and the output place, as it was.

Train, eval, export, hub loading and check_dataset are here; predict_seg.py's tables are in
test_bad_inputs_predict.py. The shared helpers and the checkpoint trained for two steps are in
tests/bad_input_cases.py."""

import json
import resource
import shutil
import warnings
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp

import eval_seg
import seg
import seg.export.onnx as export
import train_seg
from seg.data import DatasetError
from seg.data.base import read_image, read_label_png
from seg.engine import trainer
from seg.errors import USER_ERRORS, UserError, print_user_error
from seg.modeling.hub import HubError
from seg.modeling.models import build_model
from tests.bad_input_cases import BAD_IMAGES, DUPLICATE_KEYS, VOC, ckpt, one_error, pickled, png_bomb, sha256s, write  # noqa: F401 (fixtures)
from tests.children import run_forked
from tests.test_data_prepare import _script
from tests.test_rundir import run_args


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


def test_a_set_smaller_than_one_batch_is_refused_before_the_run_writes_anything(tiny_synthetic, tmp_path, capsys):
    run = tmp_path / "run"
    code = train_seg.main(["--out", str(run), *run_args(tiny_synthetic, "data.batch_size=1000")])
    one_error(capsys, code, "the training set has 4 samples, fewer than one batch of 1000")
    assert not run.exists() or sorted(p.name for p in run.iterdir()) == []


@pytest.mark.parametrize("bad_at", [1, 2], ids=["first validation", "after a checkpoint"])
def test_a_file_gone_bad_mid_run_says_how_to_go_on_and_that_works(bad_at, tiny_synthetic, tmp_path, capsys,
                                                                    monkeypatch):
    run, real, validations = tmp_path / "run", trainer.evaluate, []

    def evaluate(*args, **kwargs):  # validation `bad_at` meets a val image that went bad during the run
        validations.append(1)
        if len(validations) == bad_at:
            raise DatasetError(f"cannot read image {tiny_synthetic / 'x.jpg'}: not an image file")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", evaluate)
    code = train_seg.main(["--out", str(run), *run_args(tiny_synthetic)])
    line = one_error(capsys, code, "x.jpg: not an image file")
    hint = f"; once the data is fixed, --resume --out {run} continues from {run / 'last.pt'}"
    assert line.endswith(hint) == (bad_at == 2)  # before the first checkpoint, rerunning is all there is
    monkeypatch.setattr(trainer, "evaluate", real)
    again = ["--resume", "--out", str(run)] if bad_at == 2 else ["--out", str(run), *run_args(tiny_synthetic)]
    assert train_seg.main(again) == 0
    assert [json.loads(r)["iter"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_bad_file_under_overwrite_does_not_point_at_the_run_it_was_to_discard(tiny_synthetic, tmp_path, capsys):
    root, run = shutil.copytree(tiny_synthetic, tmp_path / "data"), tmp_path / "run"
    assert train_seg.main(["--out", str(run), *run_args(root)]) == 0
    capsys.readouterr()
    (root / VOC / "JPEGImages" / "val_00001.jpg").unlink()
    code = train_seg.main(["--overwrite", "--out", str(run), *run_args(root)])
    assert "--resume" not in one_error(capsys, code, "val_00001.jpg")


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
    with warnings.catch_warnings(record=True) as caught, pytest.raises(USER_ERRORS) as info:
        warnings.simplefilter("always")
        load(folder)
    assert not [str(w.message) for w in caught]  # nothing printed above the one-line error
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

def _bounded_read(*paths: Path) -> None:
    """In a forked child: read each file as image and label with the address space capped, printing each refusal."""
    # the address space used so far (torch, OpenCV...) plus a few hundred MB: decoding 30000x30000 RGB needs 2.7 GB
    with open("/proc/self/status") as status:
        used = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (used + 300 * 2**20, resource.getrlimit(resource.RLIMIT_AS)[1]))
    for path in paths:
        for read in (read_image, read_label_png):
            try:
                read(path)
            except DatasetError as err:
                print(err)


@pytest.mark.slow  # a child process under a memory limit
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmSize from /proc")
def test_header_bomb_is_refused_before_decoding_with_memory_bounded(tmp_path):
    bomb = write(tmp_path / "bomb.png", png_bomb())  # past PIL's own hard limit too
    small = write(tmp_path / "small.png", png_bomb(10000, 10000))  # only our limit stops this one
    assert len(bomb.read_bytes()) < 200
    log = tmp_path / "child.log"
    code, out = run_forked(lambda: _bounded_read(bomb, small), log, timeout=120), log.read_text()
    assert code == 0 and "Traceback" not in out, out[-2000:]
    over = "over the limit of 89,478,485"
    assert out.splitlines() == [
        f"image {bomb} declares more than 178,956,970 pixels, {over}",
        f"label {bomb} declares more than 178,956,970 pixels, {over}",
        f"image {small} declares 10000x10000 = 100,000,000 pixels, {over}",
        f"label {small} declares 10000x10000 = 100,000,000 pixels, {over}",
    ], out
