"""Parameter and FLOP counts, and the tables of them for the README (``python -m seg.tools.complexity``
for our named encoders, ``python -m seg.tools.complexity --timm`` for attention attached to timm backbones).

FLOPs are torch's ``FlopCounterMode`` counts: 2 per multiply-add of convolutions and matrix
products (so MACs = FLOPs / 2, the unit of the paper's "MAdds"); elementwise work such as
BN, activations, pooling and the attention gates' products is not counted.
"""

import argparse

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

TABLE_ENCODERS = ("mobilenet_v2", "resnet50", "resnet101")
TABLE_ATTENTIONS = ("", "_se", "_cbam", "_ca")
TABLE_SIZE = 512
TIMM_TABLE_ENCODERS = ("tu-mobilenetv3_large_100", "tu-efficientnet_b0", "tu-resnet50d", "tu-regnety_008")
TIMM_TABLE_ATTENTIONS = (None, "none", "se", "cbam", "ca")  # None: the backbone as timm builds it


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_size: tuple[int, ...] = (1, 3, 512, 512)) -> int:
    """FLOPs (2 per multiply-add) of one eval-mode forward pass on a zero input of ``input_size``."""
    return _count_flops(model, input_size, device="cpu")


def count_flops_on_meta(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """``count_flops`` with meta tensors: shapes only, nothing computed, so big inputs cost no time."""
    return _count_flops(model, input_size, device="meta")


def _count_flops(model: nn.Module, input_size: tuple[int, ...], device: str) -> int:
    # On meta, the model runs with meta stand-ins for its tensors swapped in (functional_call), not on
    # a meta copy: deep-copying a DeepLab took about as long as tracing it.
    state = {name: torch.empty_like(t, device="meta")
             for name, t in (*model.named_parameters(remove_duplicate=False),
                             *model.named_buffers(remove_duplicate=False))} if device == "meta" else {}
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            functional_call(model, state, (torch.zeros(input_size, device=device),))
    finally:
        model.train(was_training)  # also drops the folds CA's fast paths cached from the meta tensors
    return counter.get_total_flops()


def _deeplab(encoder: str, num_classes: int, attention: str | None = None) -> nn.Module:
    from seg.modeling.models import build_model  # the tables need smp models; the counters do not

    return build_model("deeplabv3", encoder, num_classes, output_stride=16, decoder_atrous_rates=(6, 12, 18),
                       aspp_separable=True, attention=attention)


def complexity_table(num_classes: int = 21, size: int = TABLE_SIZE) -> str:
    """Markdown table for DeepLabV3 (OS 16, rates 6/12/18, separable ASPP) on every encoder."""
    rows = [
        "| encoder | encoder params (M) | model params (M) | GFLOPs | GMACs |",
        "|---|---:|---:|---:|---:|",
    ]
    for base in TABLE_ENCODERS:
        for suffix in TABLE_ATTENTIONS:
            model = _deeplab(base + suffix, num_classes)
            flops = count_flops(model, (1, 3, size, size))
            rows.append(
                f"| {base + suffix} | {count_params(model.encoder) / 1e6:.3f} "
                f"| {count_params(model) / 1e6:.3f} | {flops / 1e9:.2f} | {flops / 2e9:.2f} |"
            )
    return "\n".join(rows)


def timm_attention_table(encoders: tuple[str, ...] = TIMM_TABLE_ENCODERS, num_classes: int = 21,
                         size: int = TABLE_SIZE) -> str:
    """Markdown table: DeepLabV3 (as above) on timm backbones, as built and with each attention attached.

    "attention params" are the new blocks' own; "vs as built" is the net change against the backbone
    as timm builds it, so where that backbone has SE already, the SE it replaces is subtracted.
    """
    rows = [
        "| encoder | attention | blocks | attention params | vs as built | encoder params (M) | model params (M) "
        "| GFLOPs |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for encoder in encoders:
        for attention in TIMM_TABLE_ATTENTIONS:
            model = _deeplab(encoder, num_classes, attention)
            report = model.attention_report
            counts = (report.count, f"{report.new_params:,}", f"{report.added_params:+,}") if report else ("",) * 3
            flops = count_flops_on_meta(model, (1, 3, size, size))
            rows.append(
                f"| {encoder} | {attention or 'as built'} | {' | '.join(map(str, counts))} "
                f"| {count_params(model.encoder) / 1e6:.3f} | {count_params(model) / 1e6:.3f} | {flops / 1e9:.2f} |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m seg.tools.complexity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timm", action="store_true", help="the table of attention attached to timm backbones "
                        "(default: the table of our named encoders)")
    print(timm_attention_table() if parser.parse_args(argv).timm else complexity_table())


if __name__ == "__main__":
    main()
