"""seg.kernels.cpu: building CA's C++ kernels (g++ through torch.utils.cpp_extension), the cache
later processes load, and the fallback: a machine without a compiler must still run CA, tested by
making the build fail. What the kernels compute is test_cpu_kernels.py's."""

import logging
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from children import start_python, wait_forked
from numerics import ca_with_bn_stats
from seg.kernels import cpu
from seg.modeling.attention import CoordAttention


def test_a_failed_build_warns_once_and_ca_still_runs(monkeypatch, caplog):
    def no_compiler():
        raise OSError("g++: command not found\nsecond line")

    monkeypatch.setattr(cpu, "_module", None)
    monkeypatch.setattr(cpu, "_failed", False)
    monkeypatch.setattr(cpu, "_build", no_compiler)
    block, x = ca_with_bn_stats(), torch.randn(2, 16, 5, 6)
    with caplog.at_level(logging.WARNING, logger=cpu.__name__), torch.no_grad():
        got = [block(x), block(x)]
        expected = CoordAttention.forward(block, x)
    warnings = [r.getMessage() for r in caplog.records if r.name == cpu.__name__]
    assert len(warnings) == 1 and "g++: command not found" in warnings[0] and "second line" not in warnings[0]
    for y in got:
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_switched_off_kernels_are_not_built(monkeypatch):
    monkeypatch.setattr(cpu, "_module", None)
    monkeypatch.setattr(cpu, "ENABLED", False)
    monkeypatch.setattr(cpu, "_build", lambda: pytest.fail("built although SEG_CPU_KERNELS=0"))
    assert cpu.kernels() is None


def test_a_build_is_announced_on_stderr_without_logging_set_up(tmp_path, monkeypatch, capsys):
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: "built")
    assert cpu._build() == "built"
    assert f"compiling CA's CPU kernels once, ~15 s, cached in {cpu.build_dir()}" in capsys.readouterr().err


def test_a_checkout_at_another_path_loads_the_cached_build(ext, tmp_path, monkeypatch, capsys):
    from torch.utils import cpp_extension

    other = tmp_path / "other_checkout" / "ca_cpu.cpp"
    other.parent.mkdir()
    other.write_bytes(cpu.SOURCE.read_bytes())
    monkeypatch.setattr(cpu, "SOURCE", other)
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: pytest.fail("rebuilt for a new checkout path"))
    assert hasattr(cpu._build(), "gate")
    assert "compiling" not in capsys.readouterr().err


# a build in a process of its own, as a fresh interpreter would (a fork of this process would carry
# torch's record of the extension it loaded, and skip the build): exit code 0 if the kernels load.
# Of a stand-in source: the suite's start has built the real one, and a kill then a rebuild of it
# would cost three times as long and prove nothing more about _build.
STAND_IN = Path(__file__).parent / "fixtures" / "kernels" / "stand_in.cpp"
BUILD = f"import sys; from pathlib import Path; from seg.kernels import cpu; cpu.SOURCE = Path({str(STAND_IN)!r}); " \
        "sys.exit(cpu.kernels() is None)"


@pytest.mark.slow
def test_a_build_killed_midway_is_redone_by_the_next_process(tmp_path, monkeypatch):
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    # only for build_dir(): a fork server started with it in this process's environment would keep it
    with monkeypatch.context() as patch:
        patch.setenv("TORCH_EXTENSIONS_DIR", env["TORCH_EXTENSIONS_DIR"])
        folder = cpu.build_dir()
    # its own session, so that one killpg ends the build: python, ninja and the compiler
    child = start_python(["-c", "import os; os.setsid(); " + BUILD], tmp_path / "killed.log", env)
    # build.ninja is written just before the compiler starts
    deadline = time.monotonic() + 60
    while not (folder / "build.ninja").exists() and child.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    # the whole build: a compiler left running would race the next build for the same files
    os.killpg(child.pid, signal.SIGKILL)
    child.join()
    assert (folder / "build.ninja").exists() and not (folder / "seg_ca_cpu.so").exists(), "not caught mid-build"
    redone = start_python(["-c", BUILD], tmp_path / "redone.log", env)
    assert wait_forked(redone) == 0, redone.log.read_text()[-2000:]
    assert (folder / "seg_ca_cpu.so").exists()
