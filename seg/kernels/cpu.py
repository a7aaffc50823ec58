"""The C++ CPU kernels of ``ca_cpu.cpp`` for ``CoordAttention``'s inference path, built on first use.

``torch.utils.cpp_extension`` compiles them once (about 25 s, announced on stderr) into a cache under
``TORCH_EXTENSIONS_DIR`` (by default ``~/.cache/torch_extensions``), and later processes load the
cached build: any checkout whose source, flags, Python and torch match uses it. Where no compiler works, one warning is logged and CA runs through PyTorch ops,
which give the same results, only slower. ``SEG_CPU_KERNELS=0`` turns them off (for comparisons).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sys
from contextlib import contextmanager, suppress
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch

from seg.utils.atomic import write_atomic

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("ca_cpu.cpp")
NAME = "seg_ca_cpu"
ENABLED = os.environ.get("SEG_CPU_KERNELS", "1") != "0"
_module: ModuleType | None = None
_failed = False


ISA_FLAGS = {"avx512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                         "-mprefer-vector-width=512"],
             "avx2": ["-mavx2", "-mfma"], "default": []}


def _isa() -> tuple[str, list[str]]:
    """(name, compiler flags) of the vector instructions to build for: AVX2 + FMA where torch
    finds them (about 20% faster than SSE2 here), else the compiler's default. An AVX-512 build was
    no faster than AVX2 in the one quotable run (docs/performance.md), so it is built only on request:
    ``SEG_CPU_ISA=avx512`` on a CPU where torch reports it (``SEG_CPU_ISA`` may only lower what torch found)."""
    found = {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability(), "default")
    order = list(ISA_FLAGS)  # best first
    wanted = os.environ.get("SEG_CPU_ISA", "avx2")
    name = max(wanted if wanted in ISA_FLAGS else "avx2", found, key=order.index)  # the lesser of the two
    return name, ISA_FLAGS[name]


def build_dir() -> Path:
    """Where the build is cached: per Python, torch version and instruction set. torch's default
    folder is not per torch version (an upgrade could load a build made against another ABI),
    and a home directory may be shared by machines with different CPUs."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}_torch{torch.__version__.replace('+', '_')}"
    return Path(root) / tag / f"seg_ca_cpu_{_isa()[0]}"


def _cache_key(cflags: list[str]) -> str:
    """What the build depends on beyond build_dir()'s Python, torch and ISA: the source text and the flags.
    Not the source's path, which torch's ninja file holds, so a new checkout would rebuild."""
    return hashlib.sha256(SOURCE.read_bytes() + "\0".join(cflags).encode()).hexdigest()


def _load_cached(folder: Path, key: str) -> ModuleType | None:
    """The cached build if the stamp that a finished build writes matches ``key``, else None."""
    stamp, library = folder / f"{NAME}.key", folder / f"{NAME}.so"
    if not (stamp.is_file() and library.is_file() and stamp.read_text() == key):
        return None
    spec = importlib.util.spec_from_file_location(NAME, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build() -> ModuleType:
    folder = build_dir()
    cflags = ["-O3", "-fopenmp", *_isa()[1]]
    key = _cache_key(cflags)
    cached = _load_cached(folder, key)
    if cached is not None:
        return cached
    # stderr, not logging: a script that never configured logging would otherwise stall ~15 s in silence
    print(f"compiling CA's CPU kernels once, ~15 s, cached in {folder}", file=sys.stderr, flush=True)
    # Importing it logs "no CUDA runtime is found", which concerns CUDA builds; this one is CPU only.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import cpp_extension

    folder.mkdir(parents=True, exist_ok=True)
    # torch calls `ninja` by name: find pip's ninja (requirements.txt) even in an unactivated venv
    with suppress(ImportError):
        import ninja

        if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
    # torch holds an OS lock (released if the holder dies) while building, so a build killed
    # midway is simply redone by the next process (tests/test_cpu_kernel_build.py kills one).
    stamp = folder / f"{NAME}.key"
    stamp.unlink(missing_ok=True)  # no process may take the library for finished while it is rewritten
    module = cpp_extension.load(name=NAME, sources=[str(SOURCE)], build_directory=str(folder),
                                extra_cflags=cflags, extra_ldflags=["-fopenmp"])
    # written last, atomically: a build killed midway leaves no stamp, so its pieces are never loaded
    write_atomic(stamp, key.encode())
    return module


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
