"""Shared fixtures: paths to the optional real data beside the repo, a CA block with BN statistics,
models at measured BN statistics or built with zero weights, and comparisons at an output's scale.
The system tests' child processes are in ``children.py``."""

import contextlib
import gc
import os
import threading
from pathlib import Path
from typing import Iterator

import pytest
import torch

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


# torch.nn.init's fills, which module constructors call for their random init
_INITS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
          "xavier_normal_", "orthogonal_", "constant_", "ones_", "zeros_")


@contextlib.contextmanager
def zero_init() -> Iterator[None]:
    """Modules built inside this block get zeros where ``torch.nn.init`` would fill their weights:
    for tests of shapes and structure, which do not read them. Drawing ResNet-50's random init was
    about 80% of building it."""
    def zero(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        with torch.no_grad():
            return tensor.zero_()

    saved = {name: getattr(torch.nn.init, name) for name in _INITS}
    for name in _INITS:
        setattr(torch.nn.init, name, zero)
    try:
        yield
    finally:
        for name, fill in saved.items():
            setattr(torch.nn.init, name, fill)


def pytest_collection_modifyitems(config, items):
    # xdist (--dist loadscope) hands a worker one module at a time, in this order. The modules with
    # system tests take up to two minutes each; run last, one of them kept a worker busy for a minute
    # after the other had finished. So they go first, and the many quick modules even out the end.
    system = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in system)  # stable: a module's tests keep their order
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


def assert_close_at_scale(got, expected, share: float = 1e-4, name: str | None = None) -> None:
    """``got`` equals ``expected`` to a ``share`` of ``expected``'s largest |value| (tensors or arrays);
    ``name`` prefixes the failure message.

    For outputs computed in another summation order (another process, CPU path or kernel): their
    rounding error grows with the output's scale, not with each element's size, while a wrong weight
    or layer moves them by a percent or more of that scale. A fixed atol is either too tight for
    large outputs or too loose for small ones."""
    got, expected = torch.as_tensor(got), torch.as_tensor(expected)
    torch.testing.assert_close(got, expected, atol=share * expected.abs().max().item(), rtol=0,
                               msg=(lambda message: f"{name}: {message}") if name else None)


def with_measured_bn(model: torch.nn.Module, *input_shape: int, seed: int = 0) -> torch.nn.Module:
    """``model`` in eval mode at a well-conditioned operating point: each BN's running statistics
    measured on two random batches of ``input_shape``, its affine terms set away from the kinks.

    Built fresh, BN's statistics are (0, 1) and MobileNetV2's fan-out init shrinks the signal block
    by block: features of ~1e-12 at the last level, logits that are the head's bias and gradients of
    ~1e-18. Two implementations compared there at an atol agree however wrong one is. Measured
    statistics normalise every layer, as training would, so each block sees values of order one.

    BN's outputs are then centred at 2 (weights 0.5 to 1), between ReLU6's kinks at 0 and 6, and
    CA's at 0, between hard-swish's at -3 and 3. Centred at 0, many values sit within rounding of a
    kink, and two implementations that differ in the last bit disagree there by O(1) in the
    backward: whole-DeepLab gradients then differed by up to 3% (and fp32 from float64 by up to
    70%), depending on the seed. Centred away, they agree to 1e-6 of each tensor's scale.
    """
    from seg.modeling.attention import CoordAttention

    in_ca = {id(m.bn1) for m in model.modules() if isinstance(m, CoordAttention)}
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in norms]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None  # a plain average over the batches
            bn.weight.uniform_(0.5, 1.0, generator=gen)
            bn.bias.fill_(0.0 if id(bn) in in_ca else 2.0)
        model.train()
        for _ in range(2):
            model(torch.randn(input_shape, generator=gen))
    for bn, momentum in zip(norms, momenta):
        bn.momentum = momentum
    return model.eval()


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
    torch.manual_seed(0)


# Two OpenMP threads on a shared 2-core machine make small forwards ~100x slower; tests use one.
torch.set_num_threads(1)
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
    from seg.tools.timing import cpu_name

    terminalreporter.write_line(f"CPU: {cpu_name()}, {os.cpu_count()} cores, torch CPU capability "
                                f"{torch.backends.cpu.get_cpu_capability()}")
