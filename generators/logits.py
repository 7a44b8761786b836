"""Guidance, filtering and drawing on logits: the arithmetic a head needs to sample its tokens, and every
sampler in sampling/ uses (re-exported there), so it lives below both."""

from __future__ import annotations

import torch


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, scale) -> torch.Tensor:
    """Classifier-free guidance on logits: uncond + scale * (cond - uncond); scale 1 gives `cond`. One
    kernel (torch.lerp) where the written-out form takes three: it runs once per pass of every sampler."""
    if not isinstance(scale, torch.Tensor):
        scale = float(scale)
    return torch.lerp(uncond, cond, scale)


def filter_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """logits (..., V) -> temperature-scaled logits with filtered entries set to -inf.

    Order: divide by `temperature`; top-k keeps exactly the k largest (ties broken by index, as torch.topk;
    0 or >= V keeps all); top-p keeps the smallest set of most probable tokens whose cumulative probability
    reaches p, never fewer than one (a cumulative mass within 1e-6 of p counts as reaching it, so float
    rounding does not add a token at an exact boundary; 1.0 keeps all).
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}; expected > 0")
    if top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"top_k={top_k}, top_p={top_p}; expected top_k >= 0 and 0 < top_p <= 1")
    if temperature != 1.0:
        logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep.scatter_(-1, logits.topk(top_k, dim=-1).indices, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.float().softmax(dim=-1)  # (..., V), descending
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
        drop_sorted = mass_before >= top_p - 1e-6
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_probs(
    probs: torch.Tensor, generator: torch.Generator | None = None, uniform: torch.Tensor | None = None
) -> torch.Tensor:
    """One draw per row from probabilities or any non-negative weights (..., V) -> long (...).

    Inverse-CDF sampling: the first token whose cumulative weight exceeds u * total, u ~ U[0, 1) (drawn
    from `generator`, or given: `uniform` (...), so a compiled pass needs no generator). A token of weight 0
    has an empty interval and is never drawn. Four kernels and no input validation, where
    torch.multinomial checks its input and draws V exponentials per row (5-20x slower on small rows, the
    cost that matters between a sampler's forward passes).
    """
    cumulative = probs.float().cumsum(dim=-1)  # (..., V)
    if uniform is None:
        uniform = torch.rand(probs.shape[:-1], device=probs.device, generator=generator)
    threshold = uniform[..., None] * cumulative[..., -1:]
    drawn = torch.searchsorted(cumulative, threshold, right=True)  # (..., 1)
    return drawn.clamp_(max=probs.shape[-1] - 1).squeeze(-1)  # u * total rounding up to total: rare


def sample_logits(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw from softmax(logits) per row: logits (..., V) -> tokens long (...)."""
    return sample_probs(logits.float().softmax(dim=-1), generator)
