"""Channel/spatial attention blocks that can be dropped into a backbone.

``CoordAttention`` follows Hou, Zhou and Feng, "Coordinate Attention for Efficient Mobile
Network Design", CVPR 2021 (arXiv 2103.02907), parameter for parameter like the authors'
``CoordAtt`` block, so its state dict loads with ``strict=True``. ``SqueezeExcite`` (Hu et al.,
CVPR 2018) and ``CBAM`` (Woo et al., ECCV 2018) are the baselines that paper compares against.

The SE and CBAM reductions are chosen so that 16 blocks at the CA places of MobileNetV2 add
about as many parameters as CA does (445,776): SE with reduction 20 adds 455,587 and
CBAM with reduction 20 adds 457,171 (reduction 21 would undershoot by ~3%, 20 overshoots by ~2%).
"""

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from seg.kernels import kernels_can_run
from seg.kernels.calibrate import prefers_kernel
from seg.kernels.cpu import kernels_for as cpu_kernels_for

# Devices where inference takes the lean path (_forward_inference) rather than the reference ops.
# It was built for CPUs; on a CUDA GPU its extra small ops (76 against 19 per block) cost launches,
# and seg.report times both there (its "CA lean eval" row) to keep this choice measured.
LEAN_EVAL_DEVICES = ("cpu",)
CA_REDUCTION = 32
CA_MIN_MIP = 8
SE_REDUCTION = 20
CBAM_REDUCTION = 20
MIN_HIDDEN = 8


def has_forward_hooks(modules: Iterable[nn.Module]) -> bool:
    """Whether any of ``modules`` has forward (pre-)hooks, which a fused path would skip."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


class CoordAttention(nn.Module):
    """Coordinate attention: a gate factorised into a height strip and a width strip.

    Args:
        channels: input (and output) channels C.
        reduction: C is squeezed to ``mip = max(8, C // reduction)`` channels in between.
        fused: pool and gate with the Triton kernels of ``seg.kernels`` where they can run (CUDA,
            or CPU under ``TRITON_INTERPRET=1``); elsewhere the reference code runs regardless.
        inplace: at inference (eval, no grad), gate the input tensor itself instead of a new one.
            Only for an input nothing else reads afterwards, as after MobileNetV2's in-place ReLU6.
    """

    def __init__(self, channels: int, reduction: int = CA_REDUCTION, fused: bool = False,
                 inplace: bool = False) -> None:
        super().__init__()
        self.fused = fused  # plain attributes, not state: the state dict stays the official one
        self.inplace = inplace
        self.lean_eval_devices = LEAN_EVAL_DEVICES
        self._fold_cache: tuple | None = None  # see _folded_weights
        mip = max(CA_MIN_MIP, channels // reduction)
        self.conv1 = nn.Conv2d(channels, mip, kernel_size=1)
        # One BN over both strips: its batch statistics pool H + W positions per sample.
        self.bn1 = nn.BatchNorm2d(mip)
        self.act = nn.Hardswish()
        self.conv_h = nn.Conv2d(mip, channels, kernel_size=1)
        self.conv_w = nn.Conv2d(mip, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # TorchScript skips this block: it cannot compile Triton
            if self.fused and kernels_can_run(x):
                return self._forward_fused(x)
        if (torch.jit.is_scripting() or self.training or torch.is_grad_enabled() or self._has_hooks()
                or x.device.type not in self.lean_eval_devices):
            return self._forward_reference(x)
        # A hook on this block is handed x: gating x in place would show it the gated map.
        return self._forward_inference(x, self.inplace and not has_forward_hooks([self]))

    def _forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's op order; training needs it (BN's batch statistics pool both strips)."""
        h, w = x.shape[2], x.shape[3]
        x_h = x.mean(dim=3, keepdim=True)  # (N, C, H, 1)
        x_w = x.mean(dim=2, keepdim=True).transpose(2, 3)  # (N, C, W, 1)
        y = self.act(self.bn1(self.conv1(torch.cat([x_h, x_w], dim=2))))
        y_h, y_w = torch.split(y, [h, w], dim=2)
        a_h = torch.sigmoid(self.conv_h(y_h))  # (N, C, H, 1)
        # A 1x1 conv commutes with the transpose, so transpose the small output, not the input.
        a_w = torch.sigmoid(self.conv_w(y_w)).transpose(2, 3)  # (N, C, 1, W)
        out = x * a_h
        if out.requires_grad:
            return out * a_w
        # Inference: gate in place. Same op order as ``x * a_h * a_w`` (bit-identical), but one
        # full-size tensor instead of two; each fresh large CPU tensor costs an allocation plus
        # page faults, and ``x * (a_h * a_w)`` would also build a full-size gate. Autograd must
        # not see this: ``a_w``'s gradient needs ``out`` before the in-place write.
        return out.mul_(a_w)

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` with the full-size pooling and gating each done by one kernel."""
        from seg.kernels.ops import gate, pool  # imports Triton: only when a kernel will run

        h, w = x.shape[2], x.shape[3]
        y = self.act(self.bn1(self.conv1(pool(x).unsqueeze(3))))  # (N, mip, H + W, 1)
        y_h, y_w = torch.split(y, [h, w], dim=2)
        a_h = torch.sigmoid(self.conv_h(y_h))  # (N, C, H, 1)
        a_w = torch.sigmoid(self.conv_w(y_w))  # (N, C, W, 1), no transpose: the op takes strips
        return gate(x, a_h.flatten(2), a_w.flatten(2))

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
        ``seg.encoders.mobilenet_v2.ExpandedConv`` goes further and fuses CA into its neighbours.
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
    def _has_hooks(self) -> bool:
        # Hooks on the sub-layers (e.g. seg.visualize's gate maps on conv_h/conv_w) must see them run.
        return has_forward_hooks(self.children())

    @torch.jit.unused
    def _folded_weights(self) -> tuple[torch.Tensor, ...]:
        """``(w1, b1, wh, bh, ww, bw)`` as matmul operands, BN folded into conv1; cached between calls
        (the PyTorch-ops path only: the C++ kernels read the weights themselves on every call).

        The cache is a plain attribute, not a buffer, so the state dict keeps the official layout.
        It is keyed on each source tensor's storage address and version counter: in-place writes
        (``load_state_dict``, optimizer steps, ``with no_grad(): w.mul_()``) bump the version, and
        ``.to()``/``.half()`` swap the storage. The cache holds the old storages alive, so an address
        cannot be reused by a new tensor while it is being compared. Writes through ``.data``
        bypass the version counter; ``train()``/``eval()`` clear the cache for those. Traced and
        compiled graphs fold afresh, so the fold is recorded as graph ops, not hidden constants;
        so do weights created under ``torch.inference_mode``, which have no version counter.
        """
        sources = self._fold_sources()
        if torch.jit.is_tracing() or torch.compiler.is_compiling() or any(t.is_inference() for t in sources):
            return self._fold(sources)
        key = [(t.data_ptr(), t._version, t.dtype, t.device) for t in sources]
        cache = getattr(self, "_fold_cache", None)  # absent on modules pickled before it existed
        if cache is None or cache[0] != key:
            # detach() shares storage and version counter, which is what keeps the key unambiguous
            cache = (key, [t.detach() for t in sources], self._fold(sources))
            self._fold_cache = cache
        return cache[2]

    def _fold_sources(self) -> list[torch.Tensor]:
        bn = self.bn1
        return [self.conv1.weight, self.conv1.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                self.conv_h.weight, self.conv_h.bias, self.conv_w.weight, self.conv_w.bias]

    def _fold(self, sources: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        w1, b1, gamma, beta, mean, var, wh, bh, ww, bw = (t.detach() for t in sources)
        scale = gamma * torch.rsqrt(var + self.bn1.eps)
        return (w1.flatten(1) * scale[:, None], ((b1 - mean) * scale + beta)[:, None],
                wh.flatten(1), bh[:, None], ww.flatten(1), bw[:, None])

    def train(self, mode: bool = True) -> "CoordAttention":
        self._fold_cache = None
        return super().train(mode)


class _ChannelMLP(nn.Sequential):
    """1x1 conv -> ReLU -> 1x1 conv, the shared MLP of SE and CBAM."""

    def __init__(self, channels: int, reduction: int) -> None:
        hidden = max(MIN_HIDDEN, channels // reduction)
        super().__init__(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: a per-channel sigmoid gate from global average pooling.

    Args:
        channels: input (and output) channels C.
        reduction: the MLP's hidden width is ``max(8, C // reduction)``.
    """

    def __init__(self, channels: int, reduction: int = SE_REDUCTION) -> None:
        super().__init__()
        self.fc = _ChannelMLP(channels, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc(x.mean(dim=(2, 3), keepdim=True)))


class CBAM(nn.Module):
    """Convolutional block attention: a channel gate, then a spatial gate.

    Args:
        channels: input (and output) channels C.
        reduction: the shared MLP's hidden width is ``max(8, C // reduction)``.
        kernel_size: size of the conv that maps [mean, max] over channels to the spatial gate.
    """

    def __init__(
        self, channels: int, reduction: int = CBAM_REDUCTION, kernel_size: int = 7
    ) -> None:
        super().__init__()
        self.mlp = _ChannelMLP(channels, reduction)
        # No BN after the spatial conv (unlike the CBAM code): it would fail on 1x1 maps at batch 1.
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(x.mean(dim=(2, 3), keepdim=True))
        mx = self.mlp(x.amax(dim=(2, 3), keepdim=True))
        x = x * torch.sigmoid(avg + mx)
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(pooled))


ATTENTIONS: dict[str, type[nn.Module]] = {
    "ca": CoordAttention,
    "se": SqueezeExcite,
    "cbam": CBAM,
    "none": nn.Identity,
}


def make_attention(name: str, channels: int) -> nn.Module:
    """Build the attention block called ``name`` ("ca", "se", "cbam" or "none") for ``channels``."""
    if name not in ATTENTIONS:
        raise ValueError(f"unknown attention {name!r}; expected one of {sorted(ATTENTIONS)}")
    if name == "none":
        return nn.Identity()
    return ATTENTIONS[name](channels)
