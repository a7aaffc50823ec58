"""ONNX export through the CLI: static and dynamic H/W for each MobileNetV2 attention, and the error paths."""

import numpy as np
import pytest
import torch

from numerics import with_measured_bn
from seg.config import Config, config_to_dict
import seg.export.onnx as export
from seg.modeling.models import model_from_config
from seg.runs.checkpoint import save_checkpoint

HEIGHT, WIDTH = 64, 96
ENCODERS = ["mobilenet_v2", "mobilenet_v2_se", "mobilenet_v2_cbam", "mobilenet_v2_ca"]


def _config(encoder: str) -> Config:
    cfg = Config()
    cfg.model.arch, cfg.model.encoder, cfg.model.decoder_channels = "deeplabv3", encoder, 32
    cfg.data.num_classes, cfg.data.crop_size = 5, 64
    return cfg


def _checkpoint(tmp_path, encoder: str = "mobilenet_v2_ca"):
    cfg = _config(encoder)
    # Measured BN statistics and affine terms, so folding them into convs is really exercised, and so
    # the logits depend on the image: near init statistics (means within 0.1, variances 0.5 to 1.5) two
    # check images gave logits 1e-8 apart, and any export that kept the constant part would have passed.
    model = with_measured_bn(model_from_config(cfg.model, cfg.data.num_classes), 2, 3, 64, 64)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model=model, optimizer=None, scheduler=None, scaler=None, iteration=0,
                    best_miou=0.0, config=config_to_dict(cfg))
    return path


def _ort(path, height, width):
    return export.run_onnx(path, export.check_images(height, width, count=1))


@pytest.mark.parametrize("encoder", ENCODERS)
def test_static_export_matches_pytorch(tmp_path, capsys, encoder):
    import onnx

    out = tmp_path / "model.onnx"
    argv = ["--checkpoint", str(_checkpoint(tmp_path, encoder)), "--out", str(out),
            "--height", str(HEIGHT), "--width", str(WIDTH)]
    assert export.main(argv) == 0
    assert "argmax agreement" in capsys.readouterr().out
    dims = [d.dim_value for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, HEIGHT, WIDTH]
    assert _ort(out, HEIGHT, WIDTH).shape == (1, 5, HEIGHT, WIDTH)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_dynamic_export_runs_at_other_sizes(tmp_path, encoder):
    ckpt, out = _checkpoint(tmp_path, encoder), tmp_path / "model.onnx"
    argv = ["--checkpoint", str(ckpt), "--out", str(out), "--height", str(HEIGHT), "--width", str(WIDTH),
            "--dynamic"]
    assert export.main(argv) == 0  # main itself checks a second size against PyTorch
    model, _ = export.load_for_export(ckpt)
    images = export.check_images(48, 32, count=1)  # a third size, smaller than the traced one
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    got = export.run_onnx(out, images)
    assert got.shape == (1, 5, 48, 32)
    assert np.abs(got - expected).max() < export.MAX_ABS_DIFF


def test_default_size_is_crop_rounded_to_stride(tmp_path):
    cfg = _config("mobilenet_v2")
    cfg.data.crop_size = 513
    assert export.export_size(cfg, 16, None, None) == (512, 512)


def test_size_not_multiple_of_stride_names_nearest(tmp_path, capsys):
    out = tmp_path / "model.onnx"
    argv = ["--checkpoint", str(_checkpoint(tmp_path)), "--out", str(out), "--height", "70", "--width", "96"]
    assert export.main(argv) == 2
    err = capsys.readouterr().err
    assert "height 70" in err and "stride 16" in err and "--height 64 --width 96" in err
    assert not out.exists()


def test_missing_checkpoint_is_named(tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    assert export.main(["--checkpoint", str(missing), "--out", str(tmp_path / "m.onnx")]) == 2
    assert str(missing) in capsys.readouterr().err


def test_corrupt_checkpoint_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert export.main(["--checkpoint", str(bad), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "corrupt" in err


def test_missing_output_folder(tmp_path, capsys):
    out = tmp_path / "no_such_dir" / "m.onnx"
    assert export.main(["--checkpoint", str(tmp_path / "any.pt"), "--out", str(out)]) == 2
    assert "output folder does not exist" in capsys.readouterr().err


def test_disagreeing_runtime_is_refused_and_file_deleted(tmp_path, capsys, monkeypatch):
    real = export.run_onnx

    def shifted(path, images):  # a broken graph: class 0 gets a large bias
        logits = real(path, images)
        logits[:, 0] += 10.0
        return logits

    monkeypatch.setattr(export, "run_onnx", shifted)
    out = tmp_path / "model.onnx"
    argv = ["--checkpoint", str(_checkpoint(tmp_path)), "--out", str(out), "--height", "32", "--width", "32"]
    assert export.main(argv) == 2
    err = capsys.readouterr().err
    assert "disagrees" in err and "deleted" in err
    assert not out.exists()


@pytest.mark.parametrize("flag, stored, expected", [([], 3, [3]), (["--threads", "2"], 3, [2]), ([], None, [])])
def test_threads_flag_or_the_checkpoints_train_threads(tmp_path, monkeypatch, flag, stored, expected):
    cfg = _config("mobilenet_v2")
    cfg.train.threads = stored
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model=model_from_config(cfg.model, 5), optimizer=None, scheduler=None, scaler=None,
                    iteration=0, best_miou=0.0, config=config_to_dict(cfg))
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)  # record only: tests stay at one thread

    def stop(*args, **kwargs):
        raise export.ExportError("stopped before exporting")

    monkeypatch.setattr(export, "export_onnx", stop)
    assert export.main(["--checkpoint", str(path), "--out", str(tmp_path / "m.onnx"), *flag]) == 2
    assert threads == expected


def _op_counts(path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_ca_exports_the_lean_inference_graph(tmp_path):
    """Each CA block is two ReduceMeans, four MatMuls (BN folded into conv1), no Conv/BN/Concat/Split."""
    counts = {}
    for encoder in ("mobilenet_v2", "mobilenet_v2_ca"):
        cfg = _config(encoder)
        model = model_from_config(cfg.model, cfg.data.num_classes).eval()
        export.export_onnx(model, tmp_path / f"{encoder}.onnx", 32, 32)
        counts[encoder] = _op_counts(tmp_path / f"{encoder}.onnx")
    plain, ca = counts["mobilenet_v2"], counts["mobilenet_v2_ca"]
    blocks = 16
    assert ca.get("MatMul", 0) - plain.get("MatMul", 0) == 4 * blocks
    assert ca.get("ReduceMean", 0) - plain.get("ReduceMean", 0) == 2 * blocks
    for op in ("Conv", "BatchNormalization", "Concat", "Split", "Transpose"):
        assert ca.get(op, 0) == plain.get(op, 0), op
