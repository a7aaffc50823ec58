"""The C++ CPU kernels of ``ca_cpu.cpp`` for ``CoordAttention``'s inference path, built on first use.

``torch.utils.cpp_extension`` compiles them once (about 25 s) into a cache under
``TORCH_EXTENSIONS_DIR`` (by default ``~/.cache/torch_extensions``), and later processes load the
cached build. Where no compiler works, one warning is logged and CA runs through PyTorch ops,
which give the same results, only slower. ``SEG_CPU_KERNELS=0`` turns them off (for comparisons).
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager, suppress
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("ca_cpu.cpp")
ENABLED = os.environ.get("SEG_CPU_KERNELS", "1") != "0"
_module: ModuleType | None = None
_failed = False


def _isa() -> tuple[str, list[str]]:
    """(name, compiler flags) of the vector instructions to build for: AVX2 + FMA where torch
    finds them (about 20% faster than SSE2 here), else the compiler's default."""
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return "avx2", ["-mavx2", "-mfma"]
    return "default", []


def build_dir() -> Path:
    """Where the build is cached: per Python, torch version and instruction set. torch's default
    folder is not per torch version (an upgrade could load a build made against another ABI),
    and a home directory may be shared by machines with different CPUs."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}_torch{torch.__version__.replace('+', '_')}"
    return Path(root) / tag / f"seg_ca_cpu_{_isa()[0]}"


def _build() -> ModuleType:
    # Importing it logs "no CUDA runtime is found", which concerns CUDA builds; this one is CPU only.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import cpp_extension

    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "seg_ca_cpu.so").exists():
        log.info("compiling the CPU kernels for coordinate attention into %s (once, ~30 s)", folder)
    # torch calls `ninja` by name: find pip's ninja (requirements.txt) even in an unactivated venv
    with suppress(ImportError):
        import ninja

        if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
    # torch holds an OS lock (released if the holder dies) while building, so a build killed
    # midway is simply redone by the next process (tests/test_cpu_kernels.py kills one).
    return cpp_extension.load(name="seg_ca_cpu", sources=[str(SOURCE)], build_directory=str(folder),
                              extra_cflags=["-O3", "-fopenmp", *_isa()[1]], extra_ldflags=["-fopenmp"])


def kernels() -> ModuleType | None:
    """The compiled module (``forward``, ``forward_project``, ``strip_means``, ``gate``), built if needed;
    None if it cannot be."""
    global _module, _failed
    if _module is None and not _failed and ENABLED:
        try:
            _module = _build()
        except Exception as err:  # a missing compiler or ninja shows up as many exception types
            _failed = True
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
            log.warning("CPU kernels for coordinate attention could not be built (%s); "
                        "CA runs through PyTorch ops instead, with the same results, slower", first_line)
    return _module


def kernels_for(x: torch.Tensor) -> ModuleType | None:
    """The kernels if they apply to x: a contiguous float32 CPU map (a plain tensor, not a subclass)
    outside tracing, compiling and dispatch modes."""
    if not (type(x) is torch.Tensor and x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()):
        return None
    if not ENABLED or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return None  # graphs (ONNX export, torch.compile) must record the PyTorch ops
    if torch._C._len_torch_dispatch_stack():
        return None  # a dispatch mode (FlopCounterMode, FakeTensorMode) must see every op; BLAS calls skip it
    return kernels()


@contextmanager
def disabled() -> Iterator[None]:
    """CA runs through PyTorch ops inside this block, as with ``SEG_CPU_KERNELS=0`` (for comparisons)."""
    global ENABLED
    before, ENABLED = ENABLED, False
    try:
        yield
    finally:
        ENABLED = before
