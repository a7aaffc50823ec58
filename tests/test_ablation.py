"""seg.tools.ablation --smoke: two encoders x two seeds on the CPU, the table, and skipping finished runs."""

import json
from pathlib import Path

import pytest

from seg.tools import ablation

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [REPO / "configs" / "camvid_mobilenet_v2.yaml", REPO / "configs" / "camvid_mobilenet_v2_ca.yaml"]


def _argv(out: Path, *extra: str) -> list[str]:
    return ["--configs", *map(str, CONFIGS), "--seeds", "0", "1", "--out", str(out), "--smoke", *extra]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    assert ablation.main(_argv(out)) == 0
    return out


def test_every_run_is_finished_and_scored(smoke):
    for stem in ("camvid_mobilenet_v2", "camvid_mobilenet_v2_ca"):
        for seed in (0, 1):
            run = smoke / stem / f"seed{seed}"
            record = json.loads((run / ablation.FINAL).read_text())
            assert (run / "best.pt").is_file() and record["seed"] == seed
            assert 0.0 <= record["miou"] <= 1.0 and len(record["iou"]) == 5
            best = max(json.loads(line)["miou"] for line in (run / "metrics.jsonl").read_text().splitlines())
            assert record["miou"] == pytest.approx(best, abs=1e-9)  # final.json scores best.pt


def test_table_and_json_have_both_encoders(smoke, capsys):
    report = json.loads((smoke / "ablation.json").read_text())
    rows = {r["encoder"]: r for r in report["rows"]}
    assert set(rows) == {"mobilenet_v2", "mobilenet_v2_ca"}
    for r in rows.values():
        assert r["seeds"] == [0, 1] and r["miou_mean"] == pytest.approx(sum(r["miou"]) / 2)
        assert r["train_ms"] > 0
    assert rows["mobilenet_v2"]["train_ratio"] == 1.0
    assert rows["mobilenet_v2_ca"]["params"] > rows["mobilenet_v2"]["params"]


def test_rerun_skips_finished_runs(smoke, monkeypatch, capsys):
    finals = sorted(smoke.glob(f"*/seed*/{ablation.FINAL}"))
    stamps = [p.stat().st_mtime_ns for p in finals]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(ablation, "run_training", no_training)
    assert ablation.main(_argv(smoke, "--no-step-time")) == 0
    assert [p.stat().st_mtime_ns for p in finals] == stamps and len(finals) == 4
    table = capsys.readouterr().out
    assert "| camvid_mobilenet_v2 | mobilenet_v2 | 2 |" in table and "| mobilenet_v2_ca | 2 |" in table


def test_unfinished_run_resumes_from_last_checkpoint(smoke, monkeypatch):
    run = smoke / "camvid_mobilenet_v2" / "seed0"
    (run / ablation.FINAL).unlink()
    kept = {name: (run / name).stat().st_mtime_ns for name in ("last.pt", "best.pt", "metrics.jsonl")}
    plans = []
    real = ablation.run_training
    monkeypatch.setattr(ablation, "run_training", lambda plan, dist: plans.append(plan) or real(plan, dist))
    assert ablation.main(_argv(smoke, "--no-step-time")) == 0
    assert [(p.run_dir, p.resume) for p in plans] == [(run, "auto")] and (run / ablation.FINAL).is_file()
    # resumed at its last iteration: nothing retrained, nothing rewritten (a fresh start would have)
    assert {name: (run / name).stat().st_mtime_ns for name in kept} == kept


def test_bad_override_is_one_clear_line(tmp_path, capsys):
    assert ablation.main(_argv(tmp_path, "optim.lrr=0.1")) == 2
    assert "optim.lr" in capsys.readouterr().err


def test_cost_columns_count_the_model_the_run_trains():
    """The aux head and attention put into a timm encoder are in the params: the aux head's count is
    checked by hand, isolated by a pair of configs that differ in it alone."""
    from seg.config import load_config

    base = ["model.encoder=tu-efficientnet_b0", "model.encoder_weights=none", "data.num_classes=5"]
    cfgs = {"plain": load_config(None, base), "aux": load_config(None, [*base, "model.aux_loss=true"]),
            "ca+aux": load_config(None, [*base, "model.aux_loss=true", "model.attention=ca"])}
    cost = ablation.cost_of(cfgs, None)
    # EfficientNet-B0's stride-16 feature has 112 channels: 3x3 conv 112->28 (no bias), BN(28), 1x1 28->5 + bias
    assert cost["aux"]["params"] - cost["plain"]["params"] == 112 * 28 * 9 + 2 * 28 + 28 * 5 + 5
    assert cost["ca+aux"]["params"] > cost["aux"]["params"]
    assert cost["ca+aux"]["gflops"] > cost["aux"]["gflops"] == cost["plain"]["gflops"]  # aux runs in train mode only


