"""Parameter and FLOP counts, and the table of them for the README (``python -m seg.complexity``).

FLOPs are torch's ``FlopCounterMode`` counts: 2 per multiply-add of convolutions and matrix
products (so MACs = FLOPs / 2, the unit of the paper's "MAdds"); elementwise work such as
BN, activations, pooling and the attention gates' products is not counted.
"""

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

TABLE_ENCODERS = ("mobilenet_v2", "resnet50", "resnet101")
TABLE_ATTENTIONS = ("", "_se", "_cbam", "_ca")
TABLE_SIZE = 512


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_size: tuple[int, ...] = (1, 3, 512, 512)) -> int:
    """FLOPs (2 per multiply-add) of one eval-mode forward pass on a zero input of ``input_size``."""
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(torch.zeros(input_size))
    finally:
        model.train(was_training)
    return counter.get_total_flops()


def complexity_table(num_classes: int = 21, size: int = TABLE_SIZE) -> str:
    """Markdown table for DeepLabV3 (OS 16, rates 6/12/18, separable ASPP) on every encoder."""
    from seg.models import build_model  # the table needs smp models; the counters do not

    rows = [
        "| encoder | encoder params (M) | model params (M) | GFLOPs | GMACs |",
        "|---|---:|---:|---:|---:|",
    ]
    for base in TABLE_ENCODERS:
        for suffix in TABLE_ATTENTIONS:
            model = build_model(
                "deeplabv3", base + suffix, num_classes, output_stride=16,
                decoder_atrous_rates=(6, 12, 18), aspp_separable=True,
            )
            flops = count_flops(model, (1, 3, size, size))
            rows.append(
                f"| {base + suffix} | {count_params(model.encoder) / 1e6:.3f} "
                f"| {count_params(model) / 1e6:.3f} | {flops / 1e9:.2f} | {flops / 2e9:.2f} |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    print(complexity_table())
