"""Runs test_kernels.py, test_projection_kernel.py and test_projection_grad.py in a child pytest with TRITON_INTERPRET=1, so CI proves the kernels on CPU.

The child is needed because Triton fixes interpreter or compiler when it is first imported, and
in this process other tests import it first (and on a GPU machine it must stay compiled).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # reruns the Triton tests in a child under the interpreter

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]


def test_kernels_under_the_triton_interpreter(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "tests/test_kernels.py", "tests/test_projection_kernel.py",
           "tests/test_projection_grad.py", "-q", "-n", "0", "-p", "no:cacheprovider",
           "--basetemp", str(tmp_path / "child")]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, f"{' '.join(cmd[2:])} failed:\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
    assert "passed" in summary and "skipped" not in summary, summary
