"""Fused-vs-reference comparisons shared by the interpreter tests and the CUDA tests of seg.kernels."""

import copy
import dataclasses
import inspect
import os
from typing import Callable

import torch
from torch import nn

from seg.engine.loop import TrainState, train_step
from seg.kernels.fast import use_fused
from seg.modeling.attention import CoordAttention
from seg.modeling.models import build_model

if os.environ.get("TRITON_INTERPRET") == "1":
    import triton.language
    from triton.runtime import interpreter

    # Triton's interpreter evaluates an overflow check for every integer +, - and * (in int64), then
    # drops it, since device asserts only run with debug=True: over a third of a whole-DeepLab test's
    # time. Off, the kernels compute the same values; only the discarded checks are skipped.
    interpreter.interpreter_builder.options = dataclasses.replace(interpreter.interpreter_builder.options,
                                                                  sanitize_overflow=False)

    _builtins: dict[object, list[tuple[str, object]]] = {}

    def _patch_builtin(pkg, builder, scope) -> None:
        # Triton lists every member of tl, tl.core, tl.math and tl.tensor (inspect.getmembers) on every
        # kernel launch to find the builtins it reroutes, a sixth of the child's time. Which members
        # are builtins never changes, so they are listed once, on the first launch, when none is patched
        # (each launch restores what it patched).
        if pkg not in _builtins:
            _builtins[pkg] = [(name, member) for name, member in inspect.getmembers(pkg)
                              if triton.language.core.is_builtin(member)]
        for name, member in _builtins[pkg]:
            interpreter._patch_attr(pkg, name, member, builder, scope)

    interpreter._patch_builtin = _patch_builtin

# Machine epsilon of each dtype: the unit the low-precision tolerances are written in.
EPS = {torch.float32: 2**-23, torch.bfloat16: 2**-8, torch.float16: 2**-11}


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def block_outputs(block: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    """[output, grad_x, every parameter's grad, BN running mean and var] of one forward + backward."""
    x = x.detach().clone().requires_grad_()
    block.zero_grad(set_to_none=True)
    y = block(x)
    y.backward(grad)
    return [y, x.grad, *(p.grad for p in block.parameters()), block.bn1.running_mean, block.bn1.running_var]


def fused_reference_exact(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool, train: bool,
                          device: str = "cpu") -> dict[str, list[torch.Tensor]]:
    """``block_outputs`` of one random CA block run three ways on the same input and output grad:
    fused and reference in ``dtype``, and the reference in float64 (the "exact" answer)."""
    gen = torch.Generator().manual_seed(sum(shape))
    base = CoordAttention(shape[1])
    with torch.no_grad():  # BN away from its identity init, so its gradients are not special
        base.bn1.weight.uniform_(0.5, 1.5, generator=gen)
        base.bn1.bias.uniform_(-0.5, 0.5, generator=gen)
    x = torch.randn(shape, generator=gen) + 0.5  # a non-zero mean, so the pooled strips differ
    grad = torch.randn(shape, generator=gen)
    fmt = memory_format(channels_last)
    runs = {"fused": (True, dtype), "reference": (False, dtype), "exact": (False, torch.float64)}
    out = {}
    for name, (fused, run_dtype) in runs.items():
        block = copy.deepcopy(base).to(device=device, dtype=run_dtype, memory_format=fmt).train(train)
        use_fused(block, fused)
        to = dict(device=device, dtype=run_dtype, memory_format=fmt)
        out[name] = [t.double().cpu() for t in block_outputs(block, x.to(**to), grad.to(**to))]
    return out


def assert_fused_as_accurate(out: dict[str, list[torch.Tensor]], dtype: torch.dtype) -> None:
    """Each fused tensor is within 2x the reference's own error against float64, plus a few eps.

    The slack covers rounding in a different order (fp32 sums of bf16 products, one rounding of
    ``x * a_h * a_w`` instead of two) without letting a wrong index or a missing term through:
    those give errors of the order of the values themselves. The scale is at least 1 because some
    exact values are 0 (conv1's bias gradient: BN right after it cancels it) and both runs leave
    rounding noise there.
    """
    for i, (fused, ref, exact) in enumerate(zip(out["fused"], out["reference"], out["exact"])):
        # A tensor that is 0 by cancellation (conv1's bias gradient: BN's batch statistics cancel
        # it) holds only the rounding noise of a long sum of large terms in both runs, and how two
        # such noises compare is luck: an H200 run with other tile sizes gave 3.2x. A wrong index
        # still shows, as an error of the order of the terms.
        factor = 8 if exact.abs().max().item() < 1e-6 else 2
        assert_as_accurate(fused, ref, exact, dtype, factor, f"tensor {i}")


def assert_as_accurate(got: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype,
                       factor: float = 2, what: str = "tensor") -> None:
    """``got`` is within ``factor`` times ``ref``'s own error against the float64 ``exact``, plus
    4 eps of ``dtype`` at the values' scale (at least 1)."""
    exact = exact.double()
    scale = max(exact.abs().max().item(), 1.0)
    err = (got.double() - exact).abs().max().item()
    err_ref = (ref.double() - exact).abs().max().item()
    assert err <= factor * err_ref + 4 * EPS[dtype] * scale, (
        f"{what}: error {err:.3g}, reference error {err_ref:.3g}, scale {scale:.3g}")


def assert_same_gradients(reference: nn.Module, fused: nn.Module, rel: float = 1e-3) -> None:
    """Every parameter's gradient in ``fused`` is within ``rel`` of that tensor's largest reference
    gradient. Relative to each tensor's own scale, so that a tensor of tiny gradients (all of them,
    in an encoder whose signal vanishes) is compared as sharply as any other."""
    for (name, p_ref), p_fused in zip(reference.named_parameters(), fused.parameters()):
        scale = p_ref.grad.abs().max().item()
        err = (p_fused.grad - p_ref.grad).abs().max().item()
        assert scale > 0 and err <= rel * scale, f"{name}: gradient error {err:.3g} at scale {scale:.3g}"


def tiny_ca_net(classes: int = 3) -> nn.Module:
    """Two CA blocks between convs: trains like a segmentation net, in a fraction of the kernel calls."""
    return nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), CoordAttention(12),
        nn.Conv2d(12, 20, 3, padding=1), nn.BatchNorm2d(20), nn.ReLU(), CoordAttention(20),
        nn.Conv2d(20, classes, 1))


def deeplab_ca(classes: int = 3) -> nn.Module:
    """DeepLabV3 + mobilenet_v2_ca at OS 16 with a narrow decoder: the paper's 16 CA blocks."""
    return build_model("deeplabv3", "mobilenet_v2_ca", classes, output_stride=16, decoder_channels=32)


def train_losses(build: Callable[[], nn.Module], fused: bool, steps: int, *, size: int, batch: int,
                 lr: float = 0.05, device: str = "cpu", amp: str = "none", channels_last: bool = False,
                 bn_eval: bool = False, compile_backend: str | None = None) -> list[float]:
    """Losses of ``steps`` SGD steps (through ``seg.engine.loop.train_step``) on one fixed random batch.

    ``build`` must give a 3-class model.

    ``bn_eval`` freezes BatchNorm at its running statistics. A random-init DeepLabV3 with batch
    statistics turns a 1e-6 change of its input into O(1) changes of its logits, so two fp32
    runs that differ only in summation order cannot follow each other for long.
    """
    torch.manual_seed(0)
    model = build()
    use_fused(model, fused)
    fmt = memory_format(channels_last)
    model = model.to(device, memory_format=fmt).train(not bn_eval)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    step_model = torch.compile(model, fullgraph=True, backend=compile_backend) if compile_backend else model
    state = TrainState(step_model, optimizer, scheduler, torch.amp.GradScaler(device, enabled=False))
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=gen).to(device, memory_format=fmt)
    targets = images.argmax(1)  # the brightest channel: a labelling a small net learns in a few steps
    return [train_step(state, images, targets, amp=amp, aux_weight=0.0, grad_clip=None).item() for _ in range(steps)]
