"""Shared fixtures: paths to the optional real data beside the repo, and a CA block with BN statistics."""

import gc
import os
import threading
from pathlib import Path

import pytest
import torch

# CA's CPU kernels and PyTorch's ops agree only to fp32 rounding (~1e-7), and by default each process
# times both and keeps the faster (seg/kernels/calibrate.py). Tests compare runs made in different
# processes bit for bit (kill and resume, torchrun restarts), and on a CPU where the two paths are
# about as fast, two processes could choose differently. So every process of the suite, children
# included, runs the kernels; test_calibrate.py checks the timing choice with a fake clock.
os.environ.setdefault("SEG_CPU_KERNELS", "1")

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
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


def ca_with_bn_stats(channels: int = 16, inplace: bool = False):
    """A CA block with its inference fast paths (seg.kernels.fast), in eval mode, whose BN is far
    from identity, so a wrong or stale BN fold shows."""
    from seg.modeling.attention import CoordAttention
    from seg.kernels.fast import optimize_for_inference

    block = optimize_for_inference(CoordAttention(channels))
    block.inplace = inplace
    with torch.no_grad():
        block.bn1.running_mean.uniform_(-0.5, 0.5)
        block.bn1.running_var.uniform_(0.3, 2.0)
        block.bn1.weight.uniform_(0.5, 1.5)
        block.bn1.bias.uniform_(-0.5, 0.5)
    return block.eval()


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> Path:
    """4 train and 2 val synthetic images of 32 px: enough for real runs that train and validate."""
    from seg.data import make_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, n_train=4, n_val=2, size=32, seed=0)
    return root


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Two OpenMP threads on a shared 2-core machine make small forwards ~100x slower; tests use one.
torch.set_num_threads(1)


def pytest_sessionstart(session):
    # Compile CA's CPU kernels (~15 s, once per cache) on a thread of the first pytest process, while
    # the xdist workers start and collect (about as long); pytest_collection_finish waits for it.
    if not hasattr(session.config, "workerinput"):
        from seg.kernels import cpu

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
    from seg.tools.timing import cpu_name

    terminalreporter.write_line(f"CPU: {cpu_name()}, {os.cpu_count()} cores, torch CPU capability "
                                f"{torch.backends.cpu.get_cpu_capability()}")
