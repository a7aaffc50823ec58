"""The public paths users hold stay put when the package moves inside: ``import seg``, its
top-level names, ``seg.config`` and ``seg.data``, the ``python -m`` commands, and checkpoints and
hub folders saved by an earlier layout (``fixtures/flat_layout``, made by ``measure_bn.py`` then
``make.py`` there at commit 0b5e035, when every module sat directly in ``seg/``)."""

import runpy
import sys
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch

from numerics import assert_close_at_scale
import seg
import seg.config
import seg.data

FIXTURE = Path(__file__).parent / "fixtures" / "flat_layout"
CONFIG_NAMES = ["CONFIG_VERSION", "MODEL_KEYS", "Config", "ConfigError", "DataConfig", "EvalConfig", "ModelConfig",
                "OptimConfig", "TrainConfig", "apply_overrides", "available_cpus", "config_from_dict", "config_to_dict",
                "eval_window", "inference_settings", "load_config", "save_config", "validate"]
DATA_NAMES = ["CamVid", "Cityscapes", "ContiguousSampler", "DATASETS", "DatasetError", "IGNORE_INDEX", "IMAGENET_MEAN",
              "IMAGENET_STD", "PairTransform", "SegmentationDataset", "SyntheticSegmentation", "VOCSegmentation",
              "build_dataset", "build_eval_transform", "build_loader", "build_train_transform", "colorize",
              "label_ids_to_train_ids", "make_synthetic", "voc_palette"]


def test_import_seg_registers_the_encoders_in_smp():
    for name in ("mobilenet_v2_ca", "mobilenet_v2_se", "mobilenet_v2_cbam", "resnet50_ca"):
        assert name in smp.encoders.encoders, name
    model = smp.create_model("deeplabv3", encoder_name="mobilenet_v2_ca", encoder_weights=None, classes=3)
    assert any(type(m).__name__ == "CoordAttention" for m in model.modules())


def test_top_level_names():
    assert callable(seg.attach_attention) and isinstance(seg.AttachReport, type)
    assert callable(seg.from_pretrained) and isinstance(seg.Predictor, type)
    assert seg.__version__


@pytest.mark.parametrize("module, names", [(seg.config, CONFIG_NAMES), (seg.data, DATA_NAMES)])
def test_config_and_data_keep_their_public_names(module, names):
    assert sorted(module.__all__) == sorted(names)
    assert all(hasattr(module, name) for name in names)


@pytest.mark.parametrize("command", ["seg.export", "seg.tools.bench", "seg.tools.report", "seg.tools.ablation",
                                     "seg.tools.complexity"])
def test_python_m_commands_answer_help(command, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [command, "--help"])
    monkeypatch.delitem(sys.modules, command, raising=False)  # run as __main__, as python -m does
    with pytest.raises(SystemExit) as done:
        runpy.run_module(command, run_name="__main__", alter_sys=True)
    assert done.value.code == 0 and "usage:" in capsys.readouterr().out


def assert_same_logits(got: torch.Tensor, expected: torch.Tensor) -> None:
    # The logits reach 50 and differ by about as much between the two inputs (measure_bn.py). Float32
    # is off float64 by 1e-5 of that scale here, and by other amounts on other CPUs' paths.
    assert_close_at_scale(got, expected, 1e-4)


@pytest.fixture(scope="module")
def reference():
    return torch.load(FIXTURE / "outputs.pt", weights_only=True)


def test_a_checkpoint_of_the_flat_layout_loads_and_predicts_the_same(reference):
    from seg.modeling.models import model_from_checkpoint
    from seg.runs.checkpoint import checkpoint_config, load_checkpoint

    ckpt = load_checkpoint(FIXTURE / "best.pt")
    model = model_from_checkpoint(ckpt, checkpoint_config(ckpt, "best.pt"), torch.device("cpu"))
    with torch.no_grad():
        assert_same_logits(model(reference["input"]), reference["logits"])


@pytest.mark.parametrize("load", [seg.from_pretrained, smp.from_pretrained], ids=["seg", "smp"])
def test_a_hub_folder_of_the_flat_layout_loads_and_predicts_the_same(load, reference):
    model = load(FIXTURE / "hub").eval()
    with torch.no_grad():
        assert_same_logits(model(reference["input"]), reference["logits"])
