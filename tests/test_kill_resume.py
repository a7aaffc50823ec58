"""SIGKILL a real training process at every point of the save sequence, then ``--resume``:
the run directory must end byte for byte as an uninterrupted run's.

Runs are forked by ``tests/fork_train.py`` (torch is imported once); faults wrap ``os.replace`` /
``os.write`` in the child only. The tiny run validates after every iteration, so each
validation commits best.pt (when improved), last.pt and a metrics line.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from seg.runs.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # real SIGKILLs at every commit point, then resumes

REPO = Path(__file__).resolve().parents[1]
ITERS = 4


def run_args(root: Path) -> list[str]:
    return [
        "data.name=synthetic", f"data.root={root}", "data.num_classes=5", "data.crop_size=32",
        "data.scale_range=[1.0,1.0]", "data.batch_size=2", "data.val_batch_size=2", "data.num_workers=0",
        "data.synthetic_train_images=4", "data.synthetic_val_images=2", "data.synthetic_image_size=32",
        "model.encoder=mobilenet_v2_ca", "model.decoder_channels=8", "optim.name=adamw", "optim.lr=0.01",
        "optim.warmup_iters=0", f"train.iters={ITERS}", "train.eval_interval=1", "train.log_interval=1",
        "train.vis_images=1", "train.device=cpu",
    ]


class Forker:
    """Talks to one ``fork_train.py`` process: each ``run`` forks a child and waits for it."""

    def __init__(self, logs: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "fork_train.py")], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.logs, self.count = logs, 0

    def _ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "fork_train.py died"
        return json.loads(line)

    def run(self, argv: list[str], fault: str | None = None) -> tuple[dict, str]:
        """(outcome, the child's stdout+stderr)."""
        self.count += 1
        log = self.logs / f"run{self.count}.log"
        outcome = self._ask({"argv": [str(a) for a in argv], "fault": fault, "log": str(log)})
        return outcome, log.read_text()

    def kill(self, pid: int) -> dict:
        return self._ask({"kill": pid})

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def forker(tmp_path_factory):
    forker = Forker(tmp_path_factory.mktemp("logs"))
    yield forker
    forker.close()


@pytest.fixture(scope="module")
def reference(forker, tiny_synthetic, tmp_path_factory):
    """One uninterrupted run; the kill scenarios need a second validation that improves the best,
    which fork_train.py's rising scores guarantee on every CPU."""
    out = tmp_path_factory.mktemp("reference")
    outcome, log = forker.run(["--out", out, *run_args(tiny_synthetic)])
    assert outcome["exit"] == 0, log
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    improved = [r["iter"] for i, r in enumerate(records) if all(r["miou"] > p["miou"] for p in records[:i])]
    assert [r["iter"] for r in records] == list(range(1, ITERS + 1))
    assert len(improved) >= 2 and improved[1] > 1, f"the reference run improved only at {improved}"
    return out


def assert_same_as(run: Path, reference: Path) -> None:
    for name in ("last.pt", "best.pt"):
        assert (run / name).read_bytes() == (reference / name).read_bytes(), name
    assert (run / "metrics.jsonl").read_text().splitlines() == (reference / "metrics.jsonl").read_text().splitlines()
    assert not list(run.glob(".*.tmp"))


# Every boundary of one validation's commit (best.pt, then last.pt, then the metrics line), taken
# at the second time each file is written, so an older version of each exists when the kill lands.
KILL_POINTS = [
    "write:best.pt:2:half_kill",       # mid-write of best.pt's temp file
    "replace:best.pt:2:kill_before",   # best.pt's temp complete, not yet renamed
    "replace:best.pt:2:kill_after",    # best.pt new, last.pt one validation older
    "write:last.pt:2:half_kill",
    "replace:last.pt:2:kill_before",
    "replace:last.pt:2:kill_after",    # last.pt new, its metrics line not yet written
    "write:metrics.jsonl:2:half_kill",  # a torn metrics line
]


@pytest.mark.parametrize("fault", KILL_POINTS)
def test_kill_then_resume_equals_uninterrupted(fault, forker, tiny_synthetic, reference, tmp_path):
    out = tmp_path / "run"
    outcome, log = forker.run(["--out", out, *run_args(tiny_synthetic)], fault=fault)
    assert outcome.get("signal") == 9, f"the fault never fired: {outcome}\n{log}"
    outcome, log = forker.run(["--out", out, "--resume", *run_args(tiny_synthetic)])
    assert outcome["exit"] == 0, log
    assert_same_as(out, reference)


def test_kill_in_first_validation_then_plain_rerun(forker, tiny_synthetic, reference, tmp_path):
    """Killed after best.pt but before the first last.pt: nothing to resume, and nothing blocks a rerun."""
    out = tmp_path / "run"
    outcome, _ = forker.run(["--out", out, *run_args(tiny_synthetic)], fault="replace:best.pt:1:kill_after")
    assert outcome.get("signal") == 9 and (out / "best.pt").is_file() and not (out / "last.pt").exists()
    outcome, log = forker.run(["--out", out, *run_args(tiny_synthetic)])
    assert outcome["exit"] == 0, log
    assert_same_as(out, reference)


def error_line(log: str) -> str:
    """The entry point's one-line error: the last line of the output, and the only ``error:`` line."""
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and log.rstrip().splitlines()[-1] == errors[0] and "Traceback" not in log, log
    return errors[0]


def test_second_process_is_refused_and_dead_holder_does_not_block_resume(forker, tiny_synthetic, reference, tmp_path):
    out = tmp_path / "run"
    first, _ = forker.run(["--out", out, *run_args(tiny_synthetic)], fault="replace:last.pt:1:stop")
    assert first.get("stopped"), first
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    outcome, log = forker.run(["--out", out, *run_args(tiny_synthetic)])
    assert outcome["exit"] == 2
    assert f"in use by process {first['pid']}" in error_line(log) and str(out) in error_line(log)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert forker.kill(first["pid"])["signal"] == 9
    outcome, log = forker.run(["--out", out, "--resume", *run_args(tiny_synthetic)])
    assert outcome["exit"] == 0, log
    assert_same_as(out, reference)


def test_disk_full_keeps_last_checkpoint_and_resume_recovers(forker, tiny_synthetic, reference, tmp_path):
    out = tmp_path / "run"
    outcome, log = forker.run(["--out", out, *run_args(tiny_synthetic)], fault="write:last.pt:2:enospc")
    assert outcome["exit"] == 2
    line = error_line(log)
    assert f"no space left on device writing {out / 'last.pt'}" in line and "at iteration 1 is intact" in line
    assert load_checkpoint(out / "last.pt")["iteration"] == 1
    first = (reference / "metrics.jsonl").read_text().splitlines()[0]
    assert (out / "metrics.jsonl").read_text().splitlines() == [first]
    assert not list(out.glob(".*.tmp"))
    outcome, log = forker.run(["--out", out, "--resume", *run_args(tiny_synthetic)])
    assert outcome["exit"] == 0, log
    assert_same_as(out, reference)


def test_disk_full_before_the_first_checkpoint_says_rerun_and_the_rerun_works(forker, tiny_synthetic, reference,
                                                                                tmp_path):
    """best.pt of the first validation is written, last.pt is not: nothing to resume, so the message
    says to run the same command again, and that command is not refused."""
    out = tmp_path / "run"
    outcome, log = forker.run(["--out", out, *run_args(tiny_synthetic)], fault="write:last.pt:1:enospc")
    assert outcome["exit"] == 2
    line = error_line(log)
    assert "no checkpoint was saved yet; free space, then run the same command again" in line and "--resume" not in line
    assert (out / "best.pt").is_file() and not (out / "last.pt").exists()
    outcome, log = forker.run(["--out", out, *run_args(tiny_synthetic)])
    assert outcome["exit"] == 0, log
    assert_same_as(out, reference)
