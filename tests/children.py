"""Test helper (not a test): the system tests' child processes, forked rather than started afresh.

A fresh interpreter spends 5 to 7 CPU-seconds importing torch and seg before it does anything.
:func:`start_forked` runs a function in a fork of the test's own process; :func:`start_python` runs
``python ARGS`` forked from ``FORK_SERVER``, for children that train. Each child's output goes to a
log file, and its exit code is what :func:`wait_forked` returns.
"""

import contextlib
import functools
import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import socket
import sys
import traceback
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[1]


def start_forked(target: Callable[[], int | None], log: Path) -> multiprocessing.Process:
    """``target()`` in a child forked from this process, its output in ``log``, its return value
    the exit code. The child must not run autograd (see ``FORK_SERVER``)."""
    child = multiprocessing.get_context("fork").Process(target=_logged, args=(target, str(log)))
    child.start()
    child.log = log
    return child


# A child forked from a process that has run autograd cannot run it (torch refuses: its worker
# threads do not survive a fork). Children that train are forked from this fork server instead: a
# fresh interpreter that imported torch and seg once and has run nothing else.
FORK_SERVER = multiprocessing.get_context("forkserver")
FORK_SERVER.set_forkserver_preload(["train_seg", "torch.distributed.run"])


def start_python(args: list[str], log: Path, env: dict[str, str] | None = None) -> multiprocessing.Process:
    """``python ARGS`` (a script, ``-m module`` or ``-c code``, then its arguments) in the repo, with
    ``env`` added to the environment, forked from ``FORK_SERVER``: its output in ``log``. The server
    keeps the environment of the moment the first call started it: pass changes in ``env``. What
    its preloaded modules read at import (such as ``SEG_CPU_KERNELS``) keeps the server's value."""
    with contextlib.chdir(REPO):  # the server, started on first use, imports train_seg from its folder
        multiprocessing.forkserver.ensure_running()
    child = FORK_SERVER.Process(target=_logged, args=(functools.partial(_python, list(args), env or {}), str(log)))
    child.start()
    child.log = log
    return child


def _python(args: list[str], env: dict[str, str]) -> None:
    os.environ.update(env)
    os.chdir(REPO)
    if args[0] == "-m":
        sys.argv = args[1:]  # run_module puts the module's path in argv[0]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    elif args[0] == "-c":
        sys.argv = ["-c", *args[2:]]
        exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv = list(args)
        runpy.run_path(args[0], run_name="__main__")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for a child's rendezvous or process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_forked(target: Callable[[], int | None], log: Path, timeout: float = 240) -> int:
    """:func:`start_forked`, waited for: the child's exit code."""
    return wait_forked(start_forked(target, log), timeout)


def wait_forked(child: multiprocessing.Process, timeout: float = 240) -> int:
    """The exit code of a :func:`start_forked` or :func:`start_python` child; past ``timeout`` it is
    killed and the test fails."""
    child.join(timeout)
    if child.exitcode is None:
        child.kill()
        child.join()
        pytest.fail(f"a forked child ran past {timeout} s; its output is in {child.log}")
    return child.exitcode


def _logged(target: Callable[[], int | None], log: str) -> None:
    with open(log, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        os.dup2(out.fileno(), 1)  # and what C code and subprocesses write
        os.dup2(out.fileno(), 2)
        try:
            code = target()
        except Exception:
            traceback.print_exc()  # into the log, which the test shows
            code = 1
    sys.exit(code)
