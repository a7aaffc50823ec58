"""The CA kernels as ``torch.library`` custom ops, with autograd and fake (meta) implementations.

Two forward ops bracket the small PyTorch path of ``CoordAttention``:

- ``seg::ca_pool(x) -> pooled`` (N, C, H + W): the H row means, then the W column means, which is
  the reference's ``cat([x_h, x_w], dim=2)`` without the trailing 1. Its gradient is the mean's
  broadcast, written by ``seg::ca_pool_backward``.
- ``seg::ca_gate(x, a_h, a_w) -> x * a_h * a_w`` for strips a_h (N, C, H), a_w (N, C, W). Its
  gradient, ``seg::ca_gate_backward``, makes one pass over (grad, x) that writes grad_x and
  reduces both strip gradients.

Why two ops and not one with the pooling's gradient folded into grad_x: that gradient depends on
the small convs' backward, which autograd runs after the gate's backward and before the pool's,
so no single op sees both. Autograd adds the two grad_x contributions instead.

Fake implementations give the shapes, dtypes and strides, so ``torch.compile(fullgraph=True)``
traces each op as one node. Double backward is not supported.

``pool`` and ``gate`` are what ``CoordAttention`` calls: the custom ops under ``torch.compile``,
and in eager the same kernels through plain ``autograd.Function``s. A custom op's eager call goes
through the dispatcher into Python twice and checks its outputs: about 0.1 ms of CPU per call,
measured with the kernels stubbed out, which made the fused block slower than the reference on
an H200 in eager (see docs/kernels.md and docs/performance.md).
"""

import torch
from torch import Tensor

from seg.kernels import coord_attention as kernels


def _is_channels_last(x: Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _pool(x: Tensor) -> Tensor:
    sum_h, sum_w = kernels.strip_sums(x)
    return torch.cat([sum_h / x.shape[3], sum_w / x.shape[2]], dim=2).to(x.dtype)


def _pool_backward(grad: Tensor, height: int, channels_last: bool) -> Tensor:
    n, c, length = grad.shape
    width = length - height
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((n, c, height, width), dtype=grad.dtype, device=grad.device, memory_format=fmt)
    return kernels.broadcast_sum(grad[:, :, :height] / width, grad[:, :, height:] / height, out)


@torch.library.custom_op("seg::ca_pool", mutates_args=())
def ca_pool(x: Tensor) -> Tensor:
    """Strip means of x (N, C, H, W): (N, C, H + W), row means then column means, in x's dtype."""
    return _pool(x)


@ca_pool.register_fake
def _(x: Tensor) -> Tensor:
    n, c, h, w = x.shape
    return x.new_empty((n, c, h + w))


@torch.library.custom_op("seg::ca_pool_backward", mutates_args=())
def ca_pool_backward(grad: Tensor, height: int, channels_last: bool) -> Tensor:
    """The pooling's gradient: ``grad`` (N, C, H + W) spread evenly over each row and column."""
    return _pool_backward(grad, height, channels_last)


@ca_pool_backward.register_fake
def _(grad: Tensor, height: int, channels_last: bool) -> Tensor:
    n, c, length = grad.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((n, c, height, length - height), dtype=grad.dtype, device=grad.device, memory_format=fmt)


def _pool_setup(ctx, inputs: tuple, output: Tensor) -> None:
    (x,) = inputs
    ctx.height, ctx.channels_last = x.shape[2], _is_channels_last(x)


def _pool_grad(ctx, grad: Tensor) -> Tensor:
    return ca_pool_backward(grad, ctx.height, ctx.channels_last)


ca_pool.register_autograd(_pool_grad, setup_context=_pool_setup)


@torch.library.custom_op("seg::ca_gate", mutates_args=())
def ca_gate(x: Tensor, a_h: Tensor, a_w: Tensor) -> Tensor:
    """``x * a_h[..., None] * a_w[..., None, :]`` for x (N, C, H, W), a_h (N, C, H), a_w (N, C, W)."""
    return kernels.gate(x, a_h, a_w)


@ca_gate.register_fake
def _(x: Tensor, a_h: Tensor, a_w: Tensor) -> Tensor:
    return torch.empty_like(x, dtype=kernels.gate_dtype(x, a_h, a_w))


@torch.library.custom_op("seg::ca_gate_backward", mutates_args=())
def ca_gate_backward(grad: Tensor, x: Tensor, a_h: Tensor, a_w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``ca_gate`` for (x, a_h, a_w) from one read of (grad, x)."""
    return kernels.gate_grads(grad, x, a_h, a_w)


@ca_gate_backward.register_fake
def _(grad: Tensor, x: Tensor, a_h: Tensor, a_w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # The strip gradients come out contiguous whatever the strips' strides (they are summed anew).
    return torch.empty_like(x), a_h.new_empty(a_h.shape), a_w.new_empty(a_w.shape)


def _gate_setup(ctx, inputs: tuple, output: Tensor) -> None:
    # x, not the output: the output cannot give back x where a gate is 0.
    ctx.save_for_backward(*inputs)


def _gate_grad(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return ca_gate_backward(grad, *ctx.saved_tensors)


ca_gate.register_autograd(_gate_grad, setup_context=_gate_setup)


class _PoolFunction(torch.autograd.Function):
    """``ca_pool`` for eager autograd, without the custom op's dispatch."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        _pool_setup(ctx, (x,), None)
        return _pool(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        return _pool_backward(grad, ctx.height, ctx.channels_last)


class _GateFunction(torch.autograd.Function):
    """``ca_gate`` for eager autograd, without the custom op's dispatch."""

    @staticmethod
    def forward(ctx, x: Tensor, a_h: Tensor, a_w: Tensor) -> Tensor:
        _gate_setup(ctx, (x, a_h, a_w), None)
        return kernels.gate(x, a_h, a_w)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return kernels.gate_grads(grad, *ctx.saved_tensors)


def pool(x: Tensor) -> Tensor:
    """``ca_pool(x)``: the custom op while compiling, an ``autograd.Function`` in eager."""
    return ca_pool(x) if torch.compiler.is_compiling() else _PoolFunction.apply(x)


def gate(x: Tensor, a_h: Tensor, a_w: Tensor) -> Tensor:
    """``ca_gate(x, a_h, a_w)``: the custom op while compiling, an ``autograd.Function`` in eager."""
    return ca_gate(x, a_h, a_w) if torch.compiler.is_compiling() else _GateFunction.apply(x, a_h, a_w)
