"""Shared fixtures and the suite's hooks, and paths to the optional real data beside the repo. Models in
well-conditioned states and comparisons at an output's scale are in ``numerics.py``; the system tests'
child processes in ``children.py``.

torch is imported inside the hooks, not here: under xdist the first process starts its workers only
once it has loaded this file, and importing torch first held them back by about 2 s."""

import gc
import os
import threading
from pathlib import Path

import pytest

# CA's CPU kernels and PyTorch's ops agree only to fp32 rounding, and by default each process
# times both and keeps the faster (seg/kernels/calibrate.py). Tests compare runs made in different
# processes bit for bit (kill and resume, torchrun restarts), and on a CPU where the two paths are
# about as fast, two processes could choose differently. So every process of the suite, children
# included, runs the kernels; test_calibrate.py checks the timing choice with a fake clock.
os.environ.setdefault("SEG_CPU_KERNELS", "1")
# The child processes the system tests start (the report's parts, torchrun's workers) use one
# thread, like the tests (below). With the other xdist worker busy, a second OpenMP thread often
# waits for a core, and every parallel region waits for it while its peer spins.
os.environ["OMP_NUM_THREADS"] = "1"

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
KERNEL_BUILD = pytest.StashKey[threading.Thread]()


def shared_path(*parts: str) -> Path:
    """Path under ../shared, or skip the test when the material is absent (users won't have it)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: this test needs the project's shared material")
    return path


def pytest_collection_modifyitems(config, items):
    # xdist (--dist loadscope) hands a worker one module at a time, in this order. The modules with
    # system tests take up to two minutes each; run last, one of them kept a worker busy for a minute
    # after the other had finished. So they go first, and the many quick modules even out the end.
    system = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in system)  # stable: a module's tests keep their order
    import torch  # only the processes that collect, and so run tests, get here

    # Two OpenMP threads on a shared 2-core machine make small forwards ~100x slower; tests use one.
    torch.set_num_threads(1)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture(scope="module")
def ext():
    """CA's compiled CPU kernels (seg.kernels.cpu), built for real once per cache."""
    from seg.kernels import cpu

    module = cpu.kernels()
    assert module is not None, "the CPU kernels did not build; see the warning logged above"
    return module


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> Path:
    """4 train and 2 val synthetic images of 32 px: enough for real runs that train and validate."""
    from seg.data import make_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, n_train=4, n_val=2, size=32, seed=0)
    return root


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)


# Importing and collecting make ~400,000 objects that live to the end (see pytest_collection_finish),
# and with the default thresholds (700, 10, 10) full collections walked them again and again. Five
# model-heavy test files spent 1.3 to 1.4 s in the collector per xdist worker, and 0.9 s with these.
gc.set_threshold(20_000, 20, 20)


@pytest.hookimpl(wrapper=True)
def pytest_sessionstart(session):
    yield  # xdist starts its workers here; importing seg (about 5 s) first would hold them back
    # Compile CA's CPU kernels (~15 s, once per cache) on a thread of the first pytest process, while
    # the xdist workers start and collect (about as long); pytest_collection_finish waits for it.
    if not hasattr(session.config, "workerinput"):
        from seg.kernels import cpu  # not on the thread: collecting in this process (-n 0) imports seg too

        session.config.stash[KERNEL_BUILD] = build = threading.Thread(target=cpu.kernels, daemon=True)
        build.start()


def pytest_collection_finish(session):
    # Every process has the kernels before its first test, not inside whichever test first runs a CA
    # model in eval: that may be a timed child process of the kill/resume tests. A worker waits on
    # torch's build lock, then loads the library the first process built.
    build = session.config.stash.get(KERNEL_BUILD, None)
    if build is not None:
        build.join()
    else:
        from seg.kernels import cpu

        cpu.kernels()
    # torch, timm, sympy and the collected items are ~400,000 objects that live to the end, and every
    # full collection walked them all: 6.6 s of 62 s in four model-heavy test files. Frozen, the
    # collections skip them (3.3 to 4.0 s).
    gc.collect()
    gc.freeze()


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    # The suite's time and --durations above mean little without the CPU: 2 cores of the x86 models
    # the project runs on differ by about 1.5x, and the vector ISA torch chose changes the float path.
    import torch

    from seg.tools.timing import cpu_name

    terminalreporter.write_line(f"CPU: {cpu_name()}, {os.cpu_count()} cores, torch CPU capability "
                                f"{torch.backends.cpu.get_cpu_capability()}")
