"""Optimiser and learning-rate schedule: SGD or AdamW; poly decay with linear warmup, or timm's cosine, per iteration."""

from __future__ import annotations

from torch import nn
from torch.optim import SGD, AdamW, Optimizer
from timm.scheduler import create_scheduler_v2
from torch.optim.lr_scheduler import LambdaLR

WARMUP_START_FACTOR = 0.1
# Used when no weight decay is given. SGD: the DeepLab / CA-paper value. AdamW decouples the decay
# from the gradient scale, so 4e-5 would be negligible there; 1e-2 is PyTorch's AdamW default.
DEFAULT_WEIGHT_DECAY = {"sgd": 4e-5, "adamw": 1e-2}


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    *,
    momentum: float = 0.9,
    weight_decay: float | None = None,
    encoder_lr_mult: float = 1.0,
) -> Optimizer:
    """One parameter group for the encoder (at ``lr * encoder_lr_mult``) and one for the rest.

    ``momentum`` is SGD's; AdamW keeps its default betas. ``weight_decay`` None means
    ``DEFAULT_WEIGHT_DECAY[name]``.

    Norm weights and biases get no weight decay: decaying BN's affine parameters only fights
    the normalisation, and it is the usual convention for DeepLab training.

    The decoder's groups come first, so ``param_groups[0]`` carries the base ``lr`` (what training logs).
    """
    if name not in DEFAULT_WEIGHT_DECAY:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {sorted(DEFAULT_WEIGHT_DECAY)}")
    weight_decay = DEFAULT_WEIGHT_DECAY[name] if weight_decay is None else weight_decay
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for param_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_encoder = ".encoder." in f".{param_name}"
        decays = param.ndim > 1
        groups.setdefault((is_encoder, decays), []).append(param)
    param_groups = [
        {
            "params": params,
            "lr": lr * (encoder_lr_mult if is_encoder else 1.0),
            "weight_decay": weight_decay if decays else 0.0,
        }
        for (is_encoder, decays), params in sorted(groups.items())
    ]
    if name == "sgd":
        return SGD(param_groups, lr=lr, momentum=momentum, nesterov=False)
    return AdamW(param_groups, lr=lr)


def poly_warmup_factor(iteration: int, total: int, warmup: int = 0, power: float = 0.9) -> float:
    """LR multiplier at ``iteration``: linear from 0.1 to 1 over ``warmup`` steps, then (1 - t/total)^power."""
    if iteration < warmup:
        return WARMUP_START_FACTOR + (1.0 - WARMUP_START_FACTOR) * iteration / warmup
    return max(0.0, 1.0 - iteration / total) ** power


class CosineByIteration:
    """timm's cosine schedule (linear warmup from 0.1x, then cosine to 0) stepped once per iteration,
    behind the ``step()`` / ``state_dict()`` face of ``LambdaLR`` that the loop and checkpoints use."""

    def __init__(self, optimizer: Optimizer, total_iters: int, warmup_iters: int = 0) -> None:
        base_lr = optimizer.param_groups[0]["lr"]
        self.scheduler, _ = create_scheduler_v2(
            optimizer, sched="cosine", num_epochs=total_iters, warmup_epochs=warmup_iters,
            warmup_lr=WARMUP_START_FACTOR * base_lr, min_lr=0.0, step_on_epochs=False, updates_per_epoch=1)
        self.updates = 0

    def step(self) -> None:
        self.updates += 1
        self.scheduler.step_update(self.updates)

    def state_dict(self) -> dict:
        return {"updates": self.updates}  # the schedule is a function of the count; the rest is config

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]
        self.scheduler.step_update(self.updates)


def build_scheduler(optimizer: Optimizer, total_iters: int, warmup_iters: int = 0, power: float = 0.9,
                    schedule: str = "poly") -> LambdaLR | CosineByIteration:
    """Poly (or cosine) schedule with linear warmup; call ``step()`` once per iteration."""
    if schedule == "cosine":
        return CosineByIteration(optimizer, total_iters, warmup_iters)
    return LambdaLR(optimizer, lambda it: poly_warmup_factor(it, total_iters, warmup_iters, power))
