"""``FastCoordAttention``: CA's inference fast paths (CPU) and its Triton path (CUDA), and the BN fold
cache that it and ``seg.kernels.fast_block.FastExpandedConv`` share. Models get them through
``seg.kernels.fast``'s rewrites; the overview is there.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from seg.kernels import kernels_can_run
from seg.kernels.calibrate import prefers_kernel
from seg.kernels.cpu import kernels_for as cpu_kernels_for
from seg.modeling.attention import CoordAttention

# Devices where inference takes the lean path rather than the reference ops. It was built for
# CPUs; on an H200 it was no faster than the reference (docs/performance.md), so CUDA runs the reference.
LEAN_EVAL_DEVICES = ("cpu",)


def has_forward_hooks(modules: Iterable[nn.Module]) -> bool:
    """Whether any of ``modules`` has forward (pre-)hooks, which a fused path would skip."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def cached_fold(owner: nn.Module, attr: str, sources: list[torch.Tensor],
                fold: Callable[[list[torch.Tensor]], tuple]) -> tuple:
    """``fold(sources)``, cached in ``owner.<attr>`` until a source changes.

    The cache is a plain attribute, not a buffer, so the state dict keeps the official layout.
    It is keyed on each source tensor's storage address and version counter: in-place writes
    (``load_state_dict``, optimizer steps, ``with no_grad(): w.mul_()``) bump the version, and
    ``.to()``/``.half()`` swap the storage. The cache holds the old storages alive, so an address
    cannot be reused by a new tensor while it is being compared. Writes through ``.data``
    bypass the version counter; ``train()``/``eval()`` clear the cache for those. Traced and
    compiled graphs fold afresh, so the fold is recorded as graph ops, not hidden constants;
    so do weights created under ``torch.inference_mode``, which have no version counter.
    """
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or any(t.is_inference() for t in sources):
        return fold(sources)
    key = [(t.data_ptr(), t._version, t.dtype, t.device) for t in sources]
    cache = getattr(owner, attr, None)  # absent on modules pickled before it existed
    if cache is None or cache[0] != key:
        # detach() shares storage and version counter, which is what keeps the key unambiguous
        cache = (key, [t.detach() for t in sources], fold(sources))
        setattr(owner, attr, cache)
    return cache[2]


FOLD_CACHES = ("_fold_cache", "_projection_cache")  # what cached_fold fills here and in fast_block


def fold_caches(model: nn.Module) -> list[tuple]:
    """Every fold cached in ``model`` now. A CUDA graph captured while they were cached reads their
    memory (a graph holds no references), so whoever keeps the graph keeps these alive with it:
    ``train()``/``eval()`` and weight changes drop a module's cache, and its memory could be reused."""
    return [cache for m in model.modules() for name in FOLD_CACHES if (cache := getattr(m, name, None)) is not None]


class FastCoordAttention(CoordAttention):
    """``CoordAttention`` with its fast paths; made by :func:`optimize_for_inference` or :func:`use_fused`.

    Attributes (plain, not state): ``fused`` (Triton kernels where they can run), ``inplace`` (at
    inference, gate the input itself: only for an input nothing else reads afterwards, as after
    MobileNetV2's in-place ReLU6), ``lean_eval_devices``.
    """

    fused: bool = False
    inplace: bool = False
    lean_eval_devices: tuple[str, ...] = LEAN_EVAL_DEVICES
    _fold_cache: tuple | None = None  # see _folded_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return super().forward(x)
        if self.fused and kernels_can_run(x):
            return self._forward_fused(x)
        if (self.training or torch.is_grad_enabled() or has_forward_hooks(self.children())
                or x.device.type not in self.lean_eval_devices):
            # hooks on the sub-layers (e.g. seg.utils.visualize's gate maps on conv_h/conv_w) must see them run
            return super().forward(x)
        # A hook on this block is handed x: gating x in place would show it the gated map.
        return self._forward_inference(x, self.inplace and not has_forward_hooks([self]))

    @torch.jit.unused
    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` with the full-size pooling and gating each done by one kernel."""
        from seg.kernels.ops import gate  # imports Triton: only when a kernel will run

        return gate(x, *self.gate_strips(x))

    @torch.jit.unused
    def gate_strips(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate's strips a_h (N, C, H) and a_w (N, C, W) of x, pooled by the Triton kernel."""
        from seg.kernels.ops import pool

        h, w = x.shape[2], x.shape[3]
        y = self.act(self.bn1(self.conv1(pool(x).unsqueeze(3))))  # (N, mip, H + W, 1)
        y_h, y_w = torch.split(y, [h, w], dim=2)
        a_h = torch.sigmoid(self.conv_h(y_h))  # (N, C, H, 1)
        a_w = torch.sigmoid(self.conv_w(y_w))  # (N, C, W, 1), no transpose: the op takes strips
        return a_h.flatten(2), a_w.flatten(2)

    @torch.jit.unused
    def _forward_inference(self, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        """Eval, no grad: the same function in fewer, cheaper ops (equal to the reference within 1e-5).

        Every op on the tiny strips is a dispatch, often an OpenMP parallel region, so the reference's
        dozen small ops (cat, two 1x1 convs through mkldnn/slow_conv2d, BN, split, transposes) cost
        more than their arithmetic. On CPU (contiguous fp32) all of it is one C++ call of
        ``seg.kernels.cpu``, which applies BN from its running statistics to conv1's small output.
        Elsewhere, BN is folded into conv1, and conv1 runs on each strip separately (it acts per
        position, and BN at eval per channel), so there is no cat or split; the 1x1 convs are
        matmuls on (N, C, L) strips with in-place bias adds and activations. Inside MobileNetV2,
        ``seg.modeling.encoders.mobilenet_v2.ExpandedConv`` goes further and fuses CA into its neighbours.
        """
        kernels = cpu_kernels_for(x)
        if kernels is not None:
            # On CPU, one C++ call: it pools in one read of x and gates in one read and write,
            # where PyTorch takes two of each, and skips the small ops' Python dispatch. Which is
            # faster depends on the CPU and the shape, so it is measured once per shape.
            def kernel(t: torch.Tensor) -> torch.Tensor:
                return kernels.forward(t, self._fold_sources(), self.bn1.eps, t if inplace else torch.empty_like(t))

            if prefers_kernel(("CA", tuple(x.shape)), kernel, lambda t: self._forward_ops(t, inplace), x):
                return kernel(x)
        return self._forward_ops(x, inplace)

    @torch.jit.unused
    def _forward_ops(self, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        """``_forward_inference`` in PyTorch ops (any device, and what ONNX export records)."""
        w1, b1, wh, bh, ww, bw = self._folded_weights()
        x_h = x.mean(dim=3)  # (N, C, H)
        x_w = x.mean(dim=2)  # (N, C, W)
        # (K, C) @ (N, C, L) broadcasts over N, in eager and as one ONNX MatMul alike
        y_h = F.hardswish(torch.matmul(w1, x_h).add_(b1), inplace=True)
        y_w = F.hardswish(torch.matmul(w1, x_w).add_(b1), inplace=True)
        a_h = torch.matmul(wh, y_h).add_(bh).sigmoid_().unsqueeze(3)  # (N, C, H, 1)
        a_w = torch.matmul(ww, y_w).add_(bw).sigmoid_().unsqueeze(2)  # (N, C, 1, W)
        # Gating the input itself skips allocating (and page-faulting) a full-size output; only
        # allowed when the owner said the input is a private intermediate (``inplace=True``).
        out = x.mul_(a_h) if inplace else x * a_h
        return out.mul_(a_w)

    @torch.jit.unused
    def _folded_weights(self) -> tuple[torch.Tensor, ...]:
        """``(w1, b1, wh, bh, ww, bw)`` as matmul operands, BN folded into conv1; cached between calls
        (the PyTorch-ops path only: the C++ kernels read the weights themselves on every call)."""
        return cached_fold(self, "_fold_cache", self._fold_sources(), self._fold)

    def _fold_sources(self) -> list[torch.Tensor]:
        bn = self.bn1
        return [self.conv1.weight, self.conv1.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                self.conv_h.weight, self.conv_h.bias, self.conv_w.weight, self.conv_w.bias]

    def _fold(self, sources: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        w1, b1, gamma, beta, mean, var, wh, bh, ww, bw = (t.detach() for t in sources)
        scale = gamma * torch.rsqrt(var + self.bn1.eps)
        return (w1.flatten(1) * scale[:, None], ((b1 - mean) * scale + beta)[:, None],
                wh.flatten(1), bh[:, None], ww.flatten(1), bw[:, None])

    def train(self, mode: bool = True) -> "FastCoordAttention":
        self._fold_cache = None
        return super().train(mode)
