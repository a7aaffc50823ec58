"""eval_seg.py's user errors: one clear line each, never a traceback."""

import pytest
import torch

import eval_seg
from seg.config import config_to_dict, load_config
from seg.modeling.models import model_from_config
from seg.runs.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = load_config(None, ["data.num_classes=5", "model.decoder_channels=32", "model.encoder=mobilenet_v2"])
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, model=model_from_config(cfg.model, 5), optimizer=None, scheduler=None, scaler=None,
                    iteration=0, best_miou=0.0, config=config_to_dict(cfg))
    return path


def _error(argv, capsys) -> str:
    assert eval_seg.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_missing_checkpoint(tmp_path, capsys):
    assert str(tmp_path / "nope.pt") in _error(["--checkpoint", str(tmp_path / "nope.pt")], capsys)


def test_a_run_folder_given_as_checkpoint_names_the_file_to_give(tmp_path, capsys):
    assert f"checkpoint {tmp_path} is a folder; name a file in it, such as {tmp_path / 'best.pt'}" in _error(
        ["--checkpoint", str(tmp_path)], capsys)


def test_corrupt_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert "bad.pt" in _error(["--checkpoint", str(bad)], capsys)


def test_weights_that_do_not_fit_list_keys_and_shapes(checkpoint, tmp_path, capsys):
    err = _error(["--checkpoint", str(checkpoint), "data.num_classes=7"], capsys)
    assert "segmentation_head.0.weight: checkpoint (5, 32, 1, 1) vs model (7, 32, 1, 1)" in err


def test_weights_that_do_not_fit_are_one_line(checkpoint, capsys):
    err = _error(["--checkpoint", str(checkpoint), "data.num_classes=7", "model.decoder_channels=16"], capsys)
    assert err.count("\n") == 1 and "shape mismatch (" in err and "more" in err


def test_a_bare_weights_file_is_named_as_such(tmp_path, capsys):
    weights = tmp_path / "encoder.pth"
    torch.save({f"features.{i}.weight": torch.zeros(2) for i in range(500)}, weights)
    err = _error(["--checkpoint", str(weights)], capsys)
    assert err.startswith(f"error: {weights} is a bare weights file (500 tensors") and "model.encoder_weights" in err
    assert err.count("\n") == 1 and len(err) < 300


def test_missing_data_root(checkpoint, capsys):
    assert "/no/such/root" in _error(["--checkpoint", str(checkpoint), "--data-root", "/no/such/root"], capsys)


@pytest.mark.parametrize("scale", ["0", "-1"])
def test_non_positive_scales(checkpoint, scale, capsys):
    assert "--scales" in _error(["--checkpoint", str(checkpoint), "--scales", "1.0", scale], capsys)
