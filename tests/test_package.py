"""The package installs: a wheel built from pyproject.toml holds the library, its tools and the C++
source the CPU kernels compile from, and the installed copy imports and runs away from the checkout.

The build runs on a copy of the files it reads, so nothing is written into the checkout.
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds and installs a wheel

ROOT = Path(__file__).resolve().parents[1]


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, **kwargs)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools in this environment")
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "requirements.txt", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "seg", source / "seg", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    dist = tmp_path_factory.mktemp("dist")
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                  "-w", str(dist), str(source)])
    assert built.returncode == 0, built.stderr
    (path,) = dist.glob("*.whl")
    return path


def test_the_wheel_holds_the_library_its_tools_and_the_kernel_source(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {"seg/__init__.py", "seg/config/schema.py", "seg/tools/bench.py", "seg/tools/report.py",
                "seg/kernels/ca_cpu.cpp", "seg/modeling/encoders/register.py"}
    assert expected <= names, sorted(expected - names)
    packaged = {n for n in names if n.endswith(".py")}
    in_tree = {p.relative_to(ROOT).as_posix() for p in (ROOT / "seg").rglob("*.py")}
    assert packaged == in_tree  # every module ships, and nothing else does


def test_the_installed_copy_imports_and_runs_from_another_folder(wheel, tmp_path):
    site = tmp_path / "site"
    installed = _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
                      str(wheel)])
    assert installed.returncode == 0, installed.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    # one child (its imports cost 5 to 7 CPU-seconds): build a model, then `python -m seg.tools.bench --help`
    code = ("import runpy, sys, seg, segmentation_models_pytorch as smp; "
            "smp.create_model('deeplabv3', encoder_name='mobilenet_v2_ca', encoder_weights=None, classes=3); "
            "print(seg.__file__); sys.argv = ['-m', '--help']; "
            "runpy.run_module('seg.tools.bench', run_name='__main__', alter_sys=True)")
    done = _run([sys.executable, "-c", code], cwd=elsewhere, env=env)
    assert done.returncode == 0, done.stderr
    imported, helped = done.stdout.split("\n", 1)
    assert Path(imported).is_relative_to(site)  # the installed copy, not the checkout
    assert helped.startswith("usage: python -m seg.tools.bench"), done.stdout
