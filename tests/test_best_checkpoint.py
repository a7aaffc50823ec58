"""Which validation best.pt holds: the first with the highest score (mIoU, or top-1 when pretraining),
replaced only on a strict improvement (a resume included), with a validation at the last iteration even off the
interval."""

import json

import train_seg
from seg.engine import pretrainer, trainer
from seg.runs.checkpoint import load_checkpoint
from seg.tools import pretrain
from tests.test_kill_resume import run_args
from tests.test_pretrain import tiny


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _scripted_miou(monkeypatch, *scores: float) -> None:
    """Validations score ``scores`` in turn (the rest of each record is real)."""
    real, script = trainer.evaluate, iter(scores)
    monkeypatch.setattr(trainer, "evaluate", lambda *a, **k: {**real(*a, **k), "miou": next(script)})


def test_best_pt_holds_the_highest_miou_and_the_last_iteration_is_validated(tiny_synthetic, tmp_path, monkeypatch):
    # scripted scores: 0.58 comes last and close to the best, but below it; so does 0.5 earlier
    _scripted_miou(monkeypatch, 0.5, 0.6, 0.58)
    run = tmp_path / "run"
    argv = ["--out", str(run), *run_args(tiny_synthetic), "train.iters=5", "train.eval_interval=2"]
    assert train_seg.main(argv) == 0
    assert [(m["iter"], m["miou"]) for m in _metrics(run)] == [(2, 0.5), (4, 0.6), (5, 0.58)]
    best = load_checkpoint(run / "best.pt")
    assert (best["iteration"], best["best_miou"]) == (4, 0.6)
    assert load_checkpoint(run / "last.pt")["iteration"] == 5


def test_pretraining_keeps_the_best_top1_whatever_top5_does(tmp_path, monkeypatch):
    scores = iter([{"top1": 0.5, "top5": 0.7}, {"top1": 0.4, "top5": 0.9}])
    monkeypatch.setattr(pretrainer, "evaluate_topk", lambda *a, **k: next(scores))
    run = tmp_path / "run"
    assert pretrain.main(["--out", str(run), *tiny(tmp_path / "data", iters=4), "model.encoder=mobilenet_v2_ca"]) == 0
    assert [m["iter"] for m in _metrics(run)] == [2, 4]
    best = load_checkpoint(run / "best.pt")
    assert (best["iteration"], best["best_miou"]) == (2, 0.5)


def test_a_resumed_run_keeps_the_best_score_it_had(tiny_synthetic, tmp_path, monkeypatch):
    _scripted_miou(monkeypatch, 0.6, 0.4)
    run, args = tmp_path / "run", [*run_args(tiny_synthetic), "train.eval_interval=2"]
    assert train_seg.main(["--out", str(run), *args, "train.iters=2"]) == 0
    assert train_seg.main(["--resume", "--out", str(run), *args, "train.iters=4"]) == 0  # 0.4 at iteration 4
    best, last = load_checkpoint(run / "best.pt"), load_checkpoint(run / "last.pt")
    assert (best["iteration"], best["best_miou"]) == (2, 0.6)
    assert (last["iteration"], last["best_miou"]) == (4, 0.6)
