"""seg.tools.report --smoke end to end on the CPU (so the GPU report cannot rot), and seg.tools.ablation --jobs."""

import json
import os
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from children import run_forked, start_forked, start_python, wait_forked
from seg.tools import ablation, report

pytestmark = pytest.mark.slow  # the report's smoke run and the ablation's parallel jobs

REPO = Path(__file__).resolve().parents[1]


def _forked_part(name: str, argv: list[str], seconds: float, log: Path, env: dict | None = None) -> dict:
    """``report.run_part`` with the part forked from the fork server, not started afresh: the five
    parts' imports were about 25 of the smoke run's 70 CPU-seconds. ``run_part`` itself, a fresh
    process cut at its budget, is the next test's. (The CUDA tests' ``SEG_CPU_KERNELS=0`` comes too
    late for the server's imports; on a CPU those tests skip either way.)"""
    assert argv[0] == sys.executable, argv
    start = time.perf_counter()
    code = wait_forked(start_python(argv[1:], log, {"PYTHONUNBUFFERED": "1", **(env or {})}), timeout=seconds)
    return report.part_record(name, code, seconds, time.perf_counter() - start, log)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    # a generous budget: the parts end when they are done, and a slower CPU (or the other xdist worker)
    # must not cut a part and drop its table; the report's own timing is not what this test checks.
    # --jobs 1 trains the ablation's 8 runs in the ablation's own process: 8 child start-ups (about 4 s
    # of imports each) are most of its smoke; the parallel children have their own test below.
    with pytest.MonkeyPatch.context() as patch:  # module scope: the monkeypatch fixture is per test
        patch.setattr(report, "run_part", _forked_part)
        assert report.main(["--smoke", "--device", "cpu", "--out", str(out), "--budget", "1200", "--jobs", "1"]) == 0
    return out


def test_smoke_report_has_every_part_and_table(smoke):
    out = smoke
    text = (out / "report.md").read_text()
    for fragment in ("## Environment", "| torch |", "| cpu |", "### Cost, eager", "| plain A/A |", "| SE |",
                     "| CBAM |", "| CA |", "| CA fused | absent on cpu:", "| CA prologue | absent on cpu:",
                     "### CamVid ablation", "### Pretraining cost", "| plain A/A |", "200 epochs loader-bound",
                     "### Evaluation speed", "| CA | reference | reference |", "### CUDA tests"):
        assert fragment in text, fragment
    data = json.loads((out / "report.json").read_text())
    # eval_seg.py ran for every model on both paths, and recorded the path it took
    cells = {(r["model"], r["path"]): r["inference_path"] for r in data["eval"]["rows"]}
    assert cells == {(m, p): "lean" if p == "default" else "reference"
                     for m in ("plain", "plain A/A", "SE", "CA") for p in ("default", "reference")}
    assert {p["part"]: p["status"] for p in data["parts"]}["ablation"] == "ok"
    rows = data["ablation"]["rows"]
    assert [r["variant"] for r in rows] == ["plain", "SE", "CBAM", "CA"]
    assert all(len(r["runs"]) == 2 and r["miou_mean"] is not None for r in rows)
    within_two_levels = [p for p in [*out.glob("*"), *out.glob("*/*")] if p.is_file()]
    assert len(within_two_levels) <= 8 and {"report.md", "report.json"} <= {p.name for p in within_two_levels}


def test_a_part_over_its_budget_is_cut_and_recorded(tmp_path):
    part = report.run_part("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], 5,
                           tmp_path / "sleep.log")
    assert part["status"] == "cut at its budget of 5 s" and part["seconds"] < 15


def _log_span(run_dir: Path) -> tuple[datetime, datetime]:
    stamps = [datetime.strptime(line[:19], "%Y-%m-%d %H:%M:%S")
              for line in (run_dir / "train.log").read_text().splitlines() if line[:4].isdigit()]
    return stamps[0], stamps[-1]


def _ablation_argv(out: Path) -> list[str]:
    return ["--configs", str(REPO / "configs" / "demo.yaml"), "--encoders", "mobilenet_v2", "mobilenet_v2_ca",
            "--seeds", "0", "--jobs", "2", "--smoke", "--no-step-time", "--out", str(out), "train.iters=6",
            "train.eval_interval=2"]


def _ablation_session(argv: list[str]) -> int:
    """In a forked child: ``python -m seg.tools.ablation ARGV`` as the leader of a new session."""
    os.setsid()
    return ablation.main(argv)


def test_jobs_train_at_the_same_time_and_resume_after_a_kill(tmp_path):
    out = tmp_path / "ablation"
    parent = start_forked(lambda: _ablation_session(_ablation_argv(out)), tmp_path / "killed.log")
    runs = [out / f"demo-{e}" / "seed0" for e in ("mobilenet_v2", "mobilenet_v2_ca")]
    deadline = time.time() + 120
    while not any((r / "last.pt").is_file() for r in runs) and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(parent.pid, signal.SIGKILL)  # the parent and both training children, mid-run
    parent.join()
    assert not all((r / "final.json").is_file() for r in runs)
    log = tmp_path / "rerun.log"
    assert run_forked(lambda: _ablation_session(_ablation_argv(out)), log, timeout=300) == 0, log.read_text()[-3000:]
    for run in runs:
        assert json.loads((run / "final.json").read_text())["seed"] == 0
        assert [json.loads(line)["iter"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6]
    (a_start, a_end), (b_start, b_end) = (_log_span(r) for r in runs)
    assert a_start <= b_end and b_start <= a_end  # the two trainings ran at the same time
