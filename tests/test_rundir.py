"""The run directory: starts that must be refused leave it untouched and say how to go on in one line."""

import json
import multiprocessing
import os
import shutil
from pathlib import Path

import pytest

import train_seg
from seg.config import Config, config_to_dict
from seg.runs.checkpoint import load_checkpoint
from seg.runs.rundir import RunDirError, changed_keys, locked, trim_metrics

ITERS = 2


def run_args(root: Path, *extra: str) -> list[str]:
    return [
        "data.name=synthetic", f"data.root={root}", "data.num_classes=5", "data.crop_size=32",
        "data.batch_size=2", "data.val_batch_size=2", "data.num_workers=0", "data.synthetic_train_images=4",
        "data.synthetic_val_images=2", "data.synthetic_image_size=32", "model.encoder=mobilenet_v2",
        "model.decoder_channels=8", "optim.lr=0.01", "optim.warmup_iters=0", f"train.iters={ITERS}",
        "train.eval_interval=1", "train.log_interval=1", "train.vis_images=1", "train.device=cpu", *extra,
    ]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_synthetic):
    out = tmp_path_factory.mktemp("finished")
    assert train_seg.main(["--out", str(out), *run_args(tiny_synthetic)]) == 0
    return out


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file's bytes except the lock file, which holds the PID of the last process that took it."""
    if not run_dir.exists():
        return {}
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.rstrip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in err, err
    assert sum(line.startswith("error:") for line in lines) == 1, err
    return lines[-1]


def test_rerun_without_resume_is_refused_and_changes_nothing(finished, tiny_synthetic, capsys):
    before = snapshot(finished)
    assert train_seg.main(["--out", str(finished), *run_args(tiny_synthetic)]) == 2
    line = one_error_line(capsys)
    assert f"--resume --out {finished}" in line and "--overwrite" in line
    assert snapshot(finished) == before


def test_resume_with_changed_model_lists_keys_and_changes_nothing(finished, tiny_synthetic, capsys):
    before = snapshot(finished)
    argv = ["--out", str(finished), "--resume", *run_args(tiny_synthetic, "model.decoder_channels=16", "optim.lr=0.5")]
    assert train_seg.main(argv) == 2
    line = one_error_line(capsys)
    assert "model.decoder_channels (stored 8, requested 16)" in line and "optim.lr (stored 0.01, requested 0.5)" in line
    assert snapshot(finished) == before


def test_resume_may_extend_the_run(finished, tiny_synthetic, tmp_path):
    run = shutil.copytree(finished, tmp_path / "run")
    assert train_seg.main(["--out", str(run), "--resume", *run_args(tiny_synthetic, "train.iters=3")]) == 0
    assert [json.loads(line)["iter"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_overwrite_discards_the_old_run(finished, tiny_synthetic, tmp_path):
    run = shutil.copytree(finished, tmp_path / "run")
    assert train_seg.main(["--out", str(run), "--overwrite", *run_args(tiny_synthetic)]) == 0
    assert [json.loads(line)["iter"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert len(list(run.glob("events.out.tfevents.*"))) == 1


def test_failed_start_leaves_nothing_and_the_corrected_rerun_works(tiny_synthetic, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    assert train_seg.main(["--out", str(out), *run_args(tiny_synthetic, "data.num_classes=3")]) == 2
    line = one_error_line(capsys)
    assert "data.num_classes is 3" in line and "data.num_classes=5" in line
    assert snapshot(out) == {}
    assert train_seg.main(["--out", str(out), *run_args(tiny_synthetic)]) == 0


def test_unwritable_synthetic_root_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    argv = ["--out", str(tmp_path / "run"), *run_args(blocker / "synthetic")]
    assert train_seg.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data.root=") and "writable data.root" in err[0]
    assert not (tmp_path / "run").exists()


def test_crop_not_fitting_the_stride_is_a_config_error(tiny_synthetic, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_seg.main(["--out", str(out), *run_args(tiny_synthetic, "data.crop_size=40")]) == 2
    line = one_error_line(capsys)
    assert "data.crop_size=40 is not a multiple of 16" in line and "data.crop_size=32 or 48" in line
    assert not out.exists()


@pytest.mark.parametrize("workers", [0, 1])
def test_truncated_jpeg_is_named(tiny_synthetic, tmp_path, capsys, workers):
    root = shutil.copytree(tiny_synthetic, tmp_path / "data")
    jpeg = root / "VOCdevkit" / "VOC2012" / "JPEGImages" / "train_00002.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    out = tmp_path / "run"
    before = set(multiprocessing.active_children())
    assert train_seg.main(["--out", str(out), *run_args(root, f"data.num_workers={workers}")]) == 2
    assert f"error: {jpeg} is truncated" in one_error_line(capsys)
    # the loaders' workers are gone when main returns, not at a later garbage collection that waits 5 s
    assert set(multiprocessing.active_children()) <= before
    # met mid-run (check_dataset.py finds it up front): what was saved before it stays consistent
    iters = [json.loads(line)["iter"] for line in (out / "metrics.jsonl").read_text().splitlines()] \
        if (out / "metrics.jsonl").exists() else []
    assert iters == list(range(1, len(iters) + 1))
    assert (load_checkpoint(out / "last.pt")["iteration"] if iters else 0) == len(iters)


def test_lock_refuses_a_second_holder_naming_the_first(tmp_path):
    with locked(tmp_path):
        with pytest.raises(RunDirError, match=rf"in use by process {os.getpid()}"):
            with locked(tmp_path):
                pass
    with locked(tmp_path):  # released on exit
        pass


def test_changed_keys_ignores_keys_that_may_change_on_resume():
    stored = config_to_dict(Config())
    requested = config_to_dict(Config())
    requested["train"]["iters"] += 10
    requested["data"]["root"] = "/elsewhere"
    assert changed_keys(stored, requested) == []
    requested["model"]["encoder"] = "mobilenet_v2"
    assert changed_keys(stored, requested) == ["model.encoder (stored 'mobilenet_v2_ca', requested 'mobilenet_v2')"]


@pytest.mark.parametrize("lines, record, expected", [
    ([1, 2, 3], {"iter": 2}, [1, 2]),        # killed after later lines: drop them
    ([1], {"iter": 2}, [1, 2]),              # killed before the line for last.pt: restore it
    ([1, 2], None, [1, 2]),                  # a checkpoint without a stored record
    ([2, 1], {"iter": 2}, [2, 1]),           # nothing to repair: untouched
])
def test_trim_metrics(tmp_path, lines, record, expected):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"iter": i}) + "\n" for i in lines) + '{"iter": 3, "mi')  # torn last line
    trim_metrics(path, 2, record)
    assert [json.loads(line)["iter"] for line in path.read_text().splitlines()] == expected


def test_batch_not_divisible_by_processes_is_a_config_error(tiny_synthetic):
    import torch

    from seg.config import ConfigError, load_config
    from seg.utils.distributed import DistInfo
    from seg.engine.trainer import build_loaders

    cfg = load_config(None, run_args(tiny_synthetic, "data.batch_size=100"))
    three_ranks = DistInfo(rank=0, local_rank=0, world_size=3, device=torch.device("cpu"), is_main=True)
    with pytest.raises(ConfigError, match=r"data.batch_size=100 \(global\) is not divisible by 3 processes"):
        build_loaders(cfg, None, None, three_ranks)


def test_resume_on_another_process_count_is_refused(finished, tiny_synthetic):
    from seg.config import load_config
    from seg.runs.rundir import check_start

    assert load_checkpoint(finished / "last.pt")["extra"]["world_size"] == 1
    with pytest.raises(RunDirError, match=r"trained by 1 process\(es\), this start has 2.*resume with 1"):
        check_start(finished, load_config(train_seg.DEFAULT_CONFIG, run_args(tiny_synthetic)), resume=True, world_size=2)


def test_resume_with_fewer_iters_than_done_is_refused(finished, tiny_synthetic, capsys):
    before = snapshot(finished)
    argv = ["--out", str(finished), "--resume", *run_args(tiny_synthetic, "train.iters=1")]
    assert train_seg.main(argv) == 2
    assert "train.iters=1 is at or below iteration 2" in one_error_line(capsys)
    assert snapshot(finished) == before


def test_resume_with_more_iters_says_the_schedule_is_stretched(finished, tiny_synthetic, tmp_path, capsys):
    run = shutil.copytree(finished, tmp_path / "run")
    assert train_seg.main(["--out", str(run), "--resume", *run_args(tiny_synthetic, "train.iters=3")]) == 0
    err = capsys.readouterr().err
    assert err.count("train.iters changed from 2 to 3: the learning-rate schedule is stretched from iteration 2") == 1


def test_checkpoint_with_renamed_and_extra_config_keys_still_evaluates(finished, tmp_path, capsys):
    """A checkpoint from another version of the code: unknown keys warn once, known ones are used."""
    import eval_seg
    import torch

    ckpt = load_checkpoint(finished / "best.pt")
    ckpt["config"]["train"]["log_every"] = ckpt["config"]["train"].pop("log_interval")  # a rename
    ckpt["config"]["future"] = {"anything": 1}  # a section this code does not know
    ckpt["config_version"] = 99
    torch.save(ckpt, tmp_path / "other.pt")
    assert eval_seg.main(["--checkpoint", str(tmp_path / "other.pt")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "does not know" in line]
    assert len(warnings) == 1 and "train.log_every" in warnings[0] and "future" in warnings[0]
    assert "config version 99" in warnings[0]


def test_checkpoint_missing_a_model_key_is_refused_in_one_line(finished, tmp_path, capsys):
    import eval_seg
    import torch

    ckpt = load_checkpoint(finished / "best.pt")
    del ckpt["config"]["model"]["encoder"]
    torch.save(ckpt, tmp_path / "old.pt")
    assert eval_seg.main(["--checkpoint", str(tmp_path / "old.pt")]) == 2
    assert "lacks model.encoder, which decide the model" in one_error_line(capsys)


def test_overwrite_starts_a_fresh_train_log(finished, tiny_synthetic, tmp_path):
    run = shutil.copytree(finished, tmp_path / "run")
    assert (run / "train.log").read_text().count("run directory") == 1
    assert train_seg.main(["--out", str(run), "--overwrite", *run_args(tiny_synthetic)]) == 0
    assert (run / "train.log").read_text().count("run directory") == 1


@pytest.fixture
def stopped_early(finished, tmp_path) -> Path:
    """``finished`` as if it had been started with train.iters=3 and killed after iteration 2."""
    import torch
    import yaml

    run = shutil.copytree(finished, tmp_path / "run")
    ckpt = load_checkpoint(run / "last.pt")
    ckpt["config"]["train"]["iters"] = ITERS + 1
    torch.save(ckpt, run / "last.pt")
    (run / "config.yaml").write_text(yaml.safe_dump(ckpt["config"], sort_keys=False))
    return run


def test_plain_resume_continues_a_run_started_with_overrides(stopped_early):
    assert train_seg.main(["--resume", "--out", str(stopped_early)]) == 0
    assert [json.loads(line)["iter"] for line in (stopped_early / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_resume_refusal_lists_only_what_the_command_typed(stopped_early, tmp_path, capsys):
    before = snapshot(stopped_early)
    assert train_seg.main(["--resume", "--out", str(stopped_early), "model.decoder_channels=16"]) == 2
    line = one_error_line(capsys)
    assert "different config: model.decoder_channels (stored 8, requested 16)." in line
    config = tmp_path / "other.yaml"
    config.write_text("optim:\n  lr: 0.5\n")
    assert train_seg.main(["--resume", "--out", str(stopped_early), "--config", str(config)]) == 2
    assert "different config: optim.lr (stored 0.01, requested 0.5)." in one_error_line(capsys)
    assert snapshot(stopped_early) == before
