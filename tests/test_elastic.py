"""Distributed runs that lose a worker: torchrun restarts, a resume by hand, two "nodes" on one
machine, a refusal on every rank, and a bounded wait for a silent peer. CPU, gloo, loopback only.

Workers run ``tests/elastic_train.py``: ``train_seg.py`` plus a fault that SIGKILLs or SIGSTOPs one
rank when it enters its Nth validation. The runs validate (and commit ``last.pt``) after every
iteration, so a fault at the 2nd validation lands after the first ``last.pt``.

The reference run is plain torchrun in a fresh interpreter. The others are forked from the fork
server in ``tests/children.py``, torchrun included (``--start-method fork --run-path``: its workers
fork from it), so none spends 5 to 7 CPU-seconds importing torch and seg; they must still equal the
reference to the bit.
"""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train_seg
from children import free_port, start_python, wait_forked
from seg.runs.checkpoint import load_checkpoint
from tests.test_kill_resume import ITERS, assert_same_as, error_line, run_args

pytestmark = pytest.mark.slow  # torchrun jobs, killed and restarted

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "elastic_train.py"
TIMEOUT_S = 30  # train.dist_timeout_s of every run here: their checkpoints hold it, so all must agree


def ddp_args(root: Path, *extra: str) -> list[str]:
    # 2 samples per rank: without SyncBatchNorm (CPU) the ASPP's pooled BN needs two per process
    return [*run_args(root), "data.batch_size=4", f"train.dist_timeout_s={TIMEOUT_S}", *extra]


def launch(launcher: list[str], argv: list, log: Path, fault: str | None = None, pids: Path | None = None,
           env: dict | None = None) -> multiprocessing.Process:
    """``python LAUNCHER tests/elastic_train.py ARGV`` by :func:`start_python`, its output in ``log``."""
    env = {"ELASTIC_FAULT": fault or "", "ELASTIC_PIDS": str(pids or ""), **(env or {})}
    return start_python([*launcher, str(WORKER), *map(str, argv)], log, env)


def torchrun(*flags: str) -> list[str]:
    """torchrun, whose workers fork from it (it has torch and seg imported) and run the script with runpy."""
    return ["-m", "torch.distributed.run", "--start-method", "fork", "--run-path", "--monitor-interval", "0.2", *flags]


def standalone(nproc: int = 2, *flags: str) -> list[str]:
    return torchrun("--standalone", "--nproc-per-node", str(nproc), *flags)


def finish(proc: multiprocessing.Process, timeout: float = 240) -> tuple[int, str]:
    """(exit code, output) of a :func:`launch`."""
    return wait_forked(proc, timeout), proc.log.read_text()


def rank_logs(log_dir: Path) -> dict[int, str]:
    """Each rank's output of the first attempt, from torchrun ``--log-dir DIR --redirects 3``."""
    return {int(p.parent.name): p.read_text() for p in sorted(log_dir.glob("*/attempt_0/*/stderr.log"))}


@pytest.fixture(scope="module")
def reference(tiny_synthetic, tmp_path_factory):
    """An uninterrupted 2-worker run by plain torchrun, each worker a fresh interpreter: the forked
    launches of the tests must equal it to the bit."""
    out = tmp_path_factory.mktemp("ddp_reference")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(WORKER), "--out", str(out), *ddp_args(tiny_synthetic)],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=240)
    rc, log = done.returncode, done.stdout + done.stderr
    assert rc == 0, log
    assert [json.loads(line)["iter"] for line in (out / "metrics.jsonl").read_text().splitlines()] == \
        list(range(1, ITERS + 1))
    return out


def test_elastic_restart_after_a_killed_worker_equals_an_uninterrupted_run(reference, tiny_synthetic, tmp_path):
    out, pids, logs = tmp_path / "run", tmp_path / "pids", tmp_path / "logs"
    pids.mkdir()
    proc = launch(standalone(2, "--max-restarts", "1", "--log-dir", str(logs), "--redirects", "3"),
                  ["--out", out, *ddp_args(tiny_synthetic)], tmp_path / "job.log", fault="1:0:2:kill", pids=pids)
    rc, log = finish(proc)
    assert rc == 0, log
    assert (pids / "fault.time").is_file() and list(logs.glob("*/attempt_1")), "no worker was killed and restarted"
    # bitwise: the restarted group resumes last.pt as one process does, and a sum over 2 ranks is order-free
    assert_same_as(out, reference)


def test_without_restarts_a_killed_worker_ends_the_job_in_time_and_a_manual_resume_finishes(
        reference, tiny_synthetic, tmp_path):
    out, pids, logs = tmp_path / "run", tmp_path / "pids", tmp_path / "logs"
    pids.mkdir()
    proc = launch(standalone(2, "--log-dir", str(logs), "--redirects", "3"),
                  ["--out", out, *ddp_args(tiny_synthetic)], tmp_path / "job.log", fault="1:0:2:kill", pids=pids)
    rc, log = finish(proc)
    ended = time.time()
    assert rc != 0 and (pids / "fault.time").is_file(), log
    assert ended - float((pids / "fault.time").read_text()) < TIMEOUT_S, log
    survivor = int((pids / "rank0.pid").read_text())
    assert not Path(f"/proc/{survivor}").exists()
    assert "Traceback" not in rank_logs(logs)[0]
    assert load_checkpoint(out / "last.pt")["iteration"] >= 1  # the run directory is intact
    rc, log = finish(launch(standalone(), ["--resume", "--out", out, *ddp_args(tiny_synthetic)],
                            tmp_path / "resume.log"))
    assert rc == 0, log
    assert_same_as(out, reference)


def test_two_nodes_with_c10d_rendezvous_train_together(reference, tiny_synthetic, tmp_path):
    out, port = tmp_path / "run", free_port()
    node = torchrun("--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                    f"127.0.0.1:{port}", "--rdzv-id", "two-nodes", "--local-addr", "127.0.0.1")
    procs = [launch(node, ["--out", out, *ddp_args(tiny_synthetic)], tmp_path / f"node{i}.log") for i in range(2)]
    for proc in procs:
        rc, log = finish(proc)
        assert rc == 0, log
    # 2 nodes x 1 process is the same 2-rank job as 1 node x 2 processes, to the bit
    assert_same_as(out, reference)


def stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def wait_for(condition, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def test_second_job_on_the_same_out_is_refused_on_every_rank(tiny_synthetic, tmp_path):
    out, pids, logs = tmp_path / "run", tmp_path / "pids", tmp_path / "logs"
    pids.mkdir()
    # the first job stops its rank 0 (the lock holder) mid-run; its rank 1 waits for it
    first = launch(standalone(), ["--out", out, *run_args(tiny_synthetic), "data.batch_size=4"],
                   tmp_path / "first.log", fault="0:0:1:stop", pids=pids)
    try:
        wait_for(lambda: (pids / "rank0.pid").is_file() and stopped(int((pids / "rank0.pid").read_text())))
        holder = int((pids / "rank0.pid").read_text())
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        second = launch(standalone(2, "--log-dir", str(logs), "--redirects", "3"),
                        ["--out", out, *run_args(tiny_synthetic), "data.batch_size=4"], tmp_path / "second.log")
        rc, log = finish(second)
        assert rc != 0, log
        lines = {rank: error_line(text) for rank, text in rank_logs(logs).items()}
        assert sorted(lines) == [0, 1] and lines[0] == lines[1], lines
        assert f"in use by process {holder}" in lines[0] and str(out) in lines[0]
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    finally:
        for pid in pids.glob("rank*.pid"):
            try:
                os.kill(int(pid.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
        rc, _ = finish(first, timeout=60)
    assert rc != 0


def test_a_silent_peer_ends_the_waiting_rank_within_the_timeout(tiny_synthetic, tmp_path):
    """Rank 1 hangs (SIGSTOP: alive, connected, silent); rank 0 gives up after train.dist_timeout_s."""
    out, pids = tmp_path / "run", tmp_path / "pids"
    pids.mkdir()
    port, argv = free_port(), ["--out", out, *run_args(tiny_synthetic), "data.batch_size=4", "train.dist_timeout_s=3"]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    procs = [launch([], argv, tmp_path / f"rank{rank}.log", fault="1:0:1:stop", pids=pids,
                    env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}) for rank in (0, 1)]
    try:
        rc, log = finish(procs[0], timeout=120)
        ended = time.time()
    finally:
        for proc in procs:
            proc.kill()
            proc.join()
    assert rc == 1, log
    line = error_line(log)
    assert "rank 0 lost contact with another rank" in line and "train.dist_timeout_s=3" in line
    assert f"--resume --out {out}" in line
    assert ended - float((pids / "fault.time").read_text()) < 3 + 10, log


# In-process checks of how a start is chosen (one process, no torchrun).

def test_resume_flag_takes_auto():
    assert train_seg.parse_args(["--out", "RUN", "--resume", "auto"]).resume == "auto"
    assert train_seg.parse_args(["--resume", "--out", "RUN"]).resume is True
    assert train_seg.parse_args(["--out", "RUN"]).resume is False


def test_resume_auto_starts_afresh_and_a_torchrun_restart_resumes(tiny_synthetic, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert train_seg.main(["--out", str(out), "--resume", "auto", *run_args(tiny_synthetic), "train.iters=2"]) == 0
    assert load_checkpoint(out / "last.pt")["iteration"] == 2
    # a restarted worker runs the first attempt's command line, --overwrite included: it resumes
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    assert train_seg.main(["--out", str(out), "--overwrite", *run_args(tiny_synthetic), "train.iters=3"]) == 0
    assert load_checkpoint(out / "last.pt")["iteration"] == 3
    assert [json.loads(line)["iter"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    # and only a run with the same config
    capsys.readouterr()
    assert train_seg.main(["--out", str(out), *run_args(tiny_synthetic), "train.iters=4", "optim.lr=0.5"]) == 2
    assert "different config: optim.lr" in capsys.readouterr().err


def test_torchrun_restarts_need_an_out_dir(monkeypatch, capsys):
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    assert train_seg.main([]) == 2
    assert "torchrun --max-restarts needs --out RUN_DIR" in capsys.readouterr().err
