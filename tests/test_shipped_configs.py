"""Every file in configs/ starts: one training step and one validation with its own model (architecture,
encoder, output stride, aux head), optimiser, schedule type and class count, on a small synthetic set
(no data or weights on disk). The crop shrinks to 64, a multiple of every output stride: the recipe's
full crop and warm-up length prove nothing more about whether it starts, and cost minutes on a CPU."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from seg.config import load_config
from seg.data import SyntheticSegmentation, voc_palette
from seg.engine.trainer import run_training
from seg.runs.rundir import LAST
from seg.runs.start import StartPlan
from seg.utils.distributed import DistInfo

SMALL_CROP = 64  # a multiple of output strides 8, 16 and 32
CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def start_overrides(path: Path, data_root: Path) -> list[str]:
    """Swap in synthetic data, a 64 crop and a batch of 2; everything that shapes the model or the
    update stays. One step, then a validation; a warm-up keeps its type (one warm-up step)."""
    shipped = load_config(path, [])
    return [
        "data.name=synthetic", f"data.root={data_root}", "data.train_split=train", "data.val_split=val", f"data.num_classes={shipped.data.num_classes}", "data.batch_size=2",
        f"data.crop_size={SMALL_CROP}", "data.val_batch_size=1", "data.num_workers=0", "data.synthetic_train_images=2",
        "data.synthetic_val_images=1", f"data.synthetic_image_size={SMALL_CROP}", "model.encoder_weights=none",
        f"optim.warmup_iters={min(shipped.optim.warmup_iters, 1)}", "train.iters=1", "train.eval_interval=1",
        "train.log_interval=1", "train.vis_images=0", "train.device=cpu",
    ]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_trains_one_step_and_validates(path, tmp_path, monkeypatch):
    cfg = load_config(path, start_overrides(path, tmp_path / "synthetic"))
    # the synthetic scenes use labels 0-4, which any class count >= 5 can hold
    classes = [f"class{i}" for i in range(cfg.data.num_classes)]
    monkeypatch.setattr(SyntheticSegmentation, "classes", tuple(classes))
    monkeypatch.setattr(SyntheticSegmentation, "palette", voc_palette(len(classes)))
    state = run_training(StartPlan(tmp_path / "run", cfg), DistInfo(rank=0, local_rank=0, world_size=1,
                                                                    device=torch.device("cpu"), is_main=True))
    shipped = load_config(path, [])  # what shapes the model and the update is the recipe's own
    assert cfg.model == replace(shipped.model, encoder_weights=None)
    assert replace(cfg.optim, warmup_iters=shipped.optim.warmup_iters) == shipped.optim
    assert (cfg.optim.warmup_iters > 0) == (shipped.optim.warmup_iters > 0)
    assert cfg.data.num_classes == shipped.data.num_classes
    assert state.iteration == 1 and 0.0 <= state.best_miou <= 1.0
    assert (tmp_path / "run" / LAST).is_file()


def test_voc_recipe_keeps_the_paper_crop_within_a_stride():
    """512, not DeepLab's 513: smp needs a multiple of the output stride, and 512 is the nearest."""
    for path in (p for p in CONFIGS if p.stem.startswith("voc")):
        cfg = load_config(path, [])
        assert cfg.data.crop_size == 512 and cfg.data.crop_size % cfg.model.output_stride == 0
