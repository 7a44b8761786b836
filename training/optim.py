"""Optimiser and schedule helpers shared by the training modules."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the weight matrices of Linear and Conv layers only.

    Biases, norms, embeddings, position embeddings, learned tokens and codebooks are not decayed: shrinking
    them toward zero has no regularising meaning and hurts (nanoGPT and LlamaGen do the same).
    """
    decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)):
            decay.add(id(module.weight))
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0},
    ]


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.1):
    """LambdaLR factor: linear warm-up to 1, then cosine decay to `min_ratio` at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers (e.g. usage counts) are copied."""
    for ema_p, p in zip(ema.parameters(), model.parameters(), strict=True):
        ema_p.lerp_(p.detach().to(ema_p.dtype), 1 - decay)
    for ema_b, b in zip(ema.buffers(), model.buffers(), strict=True):
        ema_b.copy_(b)


def step_without_counting(optimizer) -> None:
    """Step a LightningOptimizer without advancing `trainer.global_step`.

    Under manual optimisation Lightning counts every `optimizer.step()` as a global step, so a GAN's
    discriminator step would make `trainer.max_steps` count half as many tokenizer steps and shift every
    step-based schedule. The manual loop increments its counter through these two hooks; silencing them
    for this one call keeps the discriminator step out of the count while the strategy and precision
    plugin still run as usual.
    """
    before, after = optimizer._on_before_step, optimizer._on_after_step
    optimizer._on_before_step = optimizer._on_after_step = lambda: None
    try:
        optimizer.step()
    finally:
        optimizer._on_before_step, optimizer._on_after_step = before, after
