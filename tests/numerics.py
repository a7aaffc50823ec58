"""Models in well-conditioned states, and comparisons at an output's scale: for tests that compare two
implementations' numbers (kernels against PyTorch ops, exports against eager, one process against another)."""

import contextlib
from typing import Iterator

import torch

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
