"""The C++ CPU kernels of ``ca_cpu.cpp`` for ``CoordAttention``'s inference path, built on first use.

``torch.utils.cpp_extension`` compiles them once (about 25 s) into its cache
(``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``) and later processes load the
cached build. Where no compiler works, one warning is logged and CA runs through PyTorch ops,
which give the same results, only slower. ``SEG_CPU_KERNELS=0`` turns them off (for comparisons).
"""

from __future__ import annotations

import logging
import os
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


def _build() -> ModuleType:
    from torch.utils import cpp_extension

    # Its "no CUDA runtime found" warning concerns CUDA builds; this one is CPU only.
    ext_log = logging.getLogger(cpp_extension.__name__)
    level = ext_log.level
    ext_log.setLevel(logging.ERROR)
    try:
        # torch calls `ninja` by name: find pip's ninja (requirements.txt) even in an unactivated venv
        with suppress(ImportError):
            import ninja

            if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
                os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
        # No -march=native: the build is cached per user, possibly on a home shared by other CPUs.
        return cpp_extension.load(name="seg_ca_cpu", sources=[str(SOURCE)], extra_cflags=["-O3", "-fopenmp"],
                                  extra_ldflags=["-fopenmp"])
    finally:
        ext_log.setLevel(level)


def kernels() -> ModuleType | None:
    """The compiled module (``strip_means``, ``gate``), building it if needed; None if it cannot be."""
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
    """The kernels if they apply to x: a contiguous float32 CPU map outside tracing and compiling."""
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()):
        return None
    if not ENABLED or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return None  # graphs (ONNX export, torch.compile) must record the PyTorch ops
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
