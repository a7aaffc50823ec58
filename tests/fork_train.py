"""Test helper (not a test): run ``train_seg.main`` in forked processes that a fault can kill.

Importing torch and smp takes seconds, so this process imports ``train_seg`` once and forks one
child per run: each child is a real, separate process running the real entry point on real
files, and the kernel's SIGKILL ends it. The faults wrap ``os.replace``, ``os.open`` and ``os.write``,
the calls through which seg.runs.checkpoint and seg.runs.rundir change the run directory, so
production code has no test hooks.

Protocol, one JSON object per line: on stdin ``{"argv": [...], "fault": SPEC or null, "log": PATH}``
answers ``{"pid": P, "exit": RC}``, ``{"pid": P, "signal": S}`` or ``{"pid": P, "stopped": true}``;
``{"kill": P}`` SIGKILLs a stopped child and answers ``{"pid": P, "signal": 9}``.

A fault SPEC is ``OP:NAME:N:ACTION``. OP ``replace`` counts ``os.replace`` calls onto a file called
NAME, and acts on the Nth; OP ``write`` counts files opened whose name contains NAME (a checkpoint
is streamed in several writes), and acts on the first ``os.write`` into the Nth. ACTION is
``kill_before`` / ``kill_after`` (SIGKILL around the real call), ``half_kill`` (write half the
bytes, then SIGKILL), ``enospc`` (raise a full-disk OSError) or ``stop`` (SIGSTOP after the call).

Every child's validation score rises with training progress (``rising_scores``), so ``best.pt``
is rewritten at every validation whatever a few random steps learned on this CPU: the kill
points inside the second ``best.pt`` write exist on every machine.
"""

import errno
import json
import os
import signal
import sys
from pathlib import Path

import torch

import seg.engine.trainer
import train_seg


def install_fault(spec: str) -> None:
    op, name, nth, action = spec.split(":")
    calls, target_fd = 0, None
    real = {"replace": os.replace, "write": os.write}[op]

    def act(*args):
        if action == "kill_before":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if action == "half_kill":
            real(args[0], bytes(args[1][: len(args[1]) // 2]))
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(*args)
        os.kill(os.getpid(), signal.SIGKILL if action == "kill_after" else signal.SIGSTOP)
        return result

    def replace(*args):
        nonlocal calls
        if Path(args[1]).name == name:
            calls += 1
            if calls == int(nth):
                return act(*args)
        return real(*args)

    real_open = os.open

    def open_(path, *args, **kwargs):
        nonlocal calls, target_fd
        fd = real_open(path, *args, **kwargs)
        if name in Path(path).name:
            calls += 1
            if calls == int(nth):
                target_fd = fd
        return fd

    def write(fd, data):
        nonlocal target_fd
        if fd != target_fd:
            return real(fd, data)
        target_fd = None  # only the file's first write
        return act(fd, data)

    if op == "replace":
        os.replace = replace
    else:
        os.open, os.write = open_, write


def rising_scores() -> None:
    """Validation's mIoU becomes n / (n + 1), n = the model's first BN step counter: strictly rising
    with every training step, and restored exactly by a resume (it is in the state dict)."""
    real = seg.engine.trainer.evaluate

    def evaluate(model, *args, **kwargs):
        metrics = real(model, *args, **kwargs)
        steps = next(m.num_batches_tracked for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)).item()
        return {**metrics, "miou": steps / (steps + 1)}

    seg.engine.trainer.evaluate = evaluate


def run_child(request: dict) -> None:
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    rc = 1
    try:
        rising_scores()
        if request.get("fault"):
            install_fault(request["fault"])
        rc = train_seg.main(request["argv"])
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


def answer(pid: int, status: int) -> dict:
    if os.WIFSTOPPED(status):
        return {"pid": pid, "stopped": True}
    if os.WIFSIGNALED(status):
        return {"pid": pid, "signal": os.WTERMSIG(status)}
    return {"pid": pid, "exit": os.WEXITSTATUS(status)}


def main() -> None:
    torch.set_num_threads(1)
    for line in sys.stdin:
        request = json.loads(line)
        if "kill" in request:
            os.kill(request["kill"], signal.SIGKILL)
            pid, status = os.waitpid(request["kill"], 0)
        else:
            pid = os.fork()
            if pid == 0:
                run_child(request)
            pid, status = os.waitpid(pid, os.WUNTRACED)
        print(json.dumps(answer(pid, status)), flush=True)


if __name__ == "__main__":
    main()
