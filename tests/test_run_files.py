"""Which files make a run, and what each holds: a fresh start over a run's leftovers is refused unless
they are what a start killed in its first validation leaves; best.pt is weights only; a full disk
names the way on. The run directory's other start rules are in test_rundir.py."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

import train_seg
from seg.runs.checkpoint import load_checkpoint
from seg.runs.rundir import RunDirError
from tests.test_rundir import ITERS, finished, one_error_line, run_args, snapshot  # noqa: F401 (fixture)


def make_run_dir(run: Path, finished: Path, kept: tuple[str, ...], best_iteration: int = ITERS) -> None:
    """``run`` holding ``kept`` of ``finished``'s files ("events": its TensorBoard file; best.pt as
    saved at ``best_iteration``), its config.yaml and train.log, and a user's own hidden temp file."""
    import torch

    run.mkdir()
    events = next(finished.glob("events.out.tfevents.*")).name
    for name in ("config.yaml", "train.log", *kept):
        name = events if name == "events" else name
        shutil.copy2(finished / name, run / name)
    if "best.pt" in kept:
        best = load_checkpoint(finished / "best.pt")
        best["iteration"] = best_iteration
        torch.save(best, run / "best.pt")
    (run / ".mine.tmp").write_text("the user's, not the run's")


@pytest.mark.parametrize("kept", [
    ("best.pt", "metrics.jsonl", "events"),  # last.pt deleted to save space
    ("metrics.jsonl",),
    ("events", "metrics.jsonl"),
    ("best.pt", "events"),  # best.pt of a later validation: not what a start killed in its first one leaves
])
def test_fresh_start_over_a_run_without_last_pt_is_refused_and_changes_nothing(finished, tiny_synthetic, tmp_path,
                                                                               capsys, kept):
    run = tmp_path / "run"
    make_run_dir(run, finished, kept)
    before = {name: hashlib.sha256(data).hexdigest() for name, data in snapshot(run).items()}
    assert train_seg.main(["--out", str(run), *run_args(tiny_synthetic)]) == 2
    line = one_error_line(capsys)
    named = [name for name in before if name not in ("config.yaml", "train.log", ".mine.tmp")]
    assert all(name in line for name in named) and len(named) == len(kept), line
    assert "no last.pt to resume" in line and "--overwrite" in line and "--resume" not in line
    assert {name: hashlib.sha256(data).hexdigest() for name, data in snapshot(run).items()} == before


def test_start_killed_in_its_first_validation_is_reused_but_other_temps_are_kept(finished, tiny_synthetic, tmp_path):
    """What a start killed between its first best.pt and last.pt leaves: the rerun may replace it,
    removing the killed writer's temp file but not a user's."""
    run = tmp_path / "run"
    make_run_dir(run, finished, ("best.pt", "events"), best_iteration=1)  # train.eval_interval=1
    (run / f".last.pt.{os.getpid() + 1}.tmp").write_bytes(b"half a checkpoint")
    assert train_seg.main(["--out", str(run), *run_args(tiny_synthetic)]) == 0
    assert (run / ".mine.tmp").read_text() == "the user's, not the run's"
    assert sorted(p.name for p in run.glob(".*.tmp")) == [".mine.tmp"]
    assert [json.loads(line)["iter"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_best_pt_is_weights_only_and_serves_eval_predict_export_and_hub(finished, tmp_path):
    import numpy as np
    import torch

    import seg
    from seg import Predictor
    from seg.export.onnx import load_for_export

    best, last = load_checkpoint(finished / "best.pt"), load_checkpoint(finished / "last.pt")
    assert [best[k] for k in ("optimizer", "scheduler", "scaler", "rng")] == [None] * 4
    assert last["optimizer"] is not None and last["rng"] is not None
    assert best["extra"]["metrics"]["iter"] == best["iteration"] and best["config"] == last["config"]
    assert (finished / "best.pt").stat().st_size < (finished / "last.pt").stat().st_size
    model, _ = load_for_export(finished / "best.pt")
    predictor = Predictor.from_checkpoint(finished / "best.pt", device="cpu")
    model.save_pretrained(tmp_path / "hub")
    image = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(image)
        assert torch.equal(predictor.model(image), expected)
        assert torch.equal(seg.from_pretrained(tmp_path / "hub").eval()(image), expected)
    assert np.isfinite(expected.numpy()).all()


def test_resume_from_a_weights_only_checkpoint_is_refused(finished, tiny_synthetic, tmp_path, capsys):
    run = tmp_path / "run"
    make_run_dir(run, finished, ("best.pt", "metrics.jsonl"))
    shutil.copy2(finished / "best.pt", run / "last.pt")
    assert train_seg.main(["--out", str(run), "--resume", *run_args(tiny_synthetic)]) == 2
    assert "holds weights only" in one_error_line(capsys)


@pytest.mark.parametrize("saved_iteration, way_on", [
    (None, "no checkpoint was saved yet; free space, then run the same command again"),
    (1, "at iteration 1 is intact; free space, then continue with --resume --out"),
])
def test_full_disk_suggests_resume_only_when_last_pt_exists(tiny_synthetic, tmp_path, monkeypatch,
                                                           saved_iteration, way_on):
    import errno

    import seg.runs.checkpoint as checkpoint
    from seg.config import load_config
    from seg.engine.loop import TrainState
    from seg.engine.trainer import commit_validation, save_state
    from seg.modeling.models import model_from_config
    from seg.runs.rundir import check_start

    cfg = load_config(None, run_args(tiny_synthetic))
    model = model_from_config(cfg.model, 5)
    state = TrainState(model, None, None, None)
    state.iteration = saved_iteration or 0
    if saved_iteration is not None:
        save_state(tmp_path / "last.pt", state, cfg)
    state.iteration += 1
    real = checkpoint.save_atomic

    def full_for_last(obj, path):
        if path.name == "last.pt":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(obj, path)

    monkeypatch.setattr(checkpoint, "save_atomic", full_for_last)
    with pytest.raises(RunDirError) as refusal:
        commit_validation(tmp_path, state, cfg, {"iter": state.iteration}, is_best=True,
                          saved_iteration=saved_iteration)
    message = str(refusal.value)
    assert message.startswith(f"no space left on device writing {tmp_path / 'last.pt'}; ") and way_on in message
    assert ("--resume" in message) == (saved_iteration is not None)
    if saved_iteration is None:  # best.pt of the first validation was written: the same command may run again
        assert (tmp_path / "best.pt").is_file() and check_start(tmp_path, cfg, resume=False) is None
