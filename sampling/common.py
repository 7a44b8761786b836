"""What every sampler shares: the result type, classifier-free guidance, logit filtering and sampling.

Samplers (ar.py, later speculative, LANTERN, Jacobi) all return a `SampleResult` whose `stats` hold at least

    forward_passes    model calls; a doubled guidance batch [conditional; null] run as one call counts once
    tokens_per_pass   mean new tokens per forward pass per row (1.0 for plain decoding)
    wall_time         seconds, including the device synchronisation at the end

so one benchmark compares them on equal terms.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

CFG_SCHEDULES = ("constant", "linear")


@dataclass
class SampleResult:
    tokens: torch.Tensor  # (B, N) long
    labels: torch.Tensor  # (B,) the conditions the rows were sampled for
    stats: dict = field(default_factory=dict)


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, scale) -> torch.Tensor:
    """Classifier-free guidance on logits: uncond + scale * (cond - uncond); scale 1 gives `cond`. One
    kernel (torch.lerp) where the written-out form takes three: it runs once per pass of every sampler."""
    if not isinstance(scale, torch.Tensor):
        scale = float(scale)
    return torch.lerp(uncond, cond, scale)


def cfg_scale_at(step: int, num_tokens: int, scale: float, schedule: str = "constant") -> float:
    """Guidance scale for the token at index `step` (0-based) of `num_tokens`.

    constant: `scale` everywhere. linear: 1 + (scale - 1) * step / num_tokens, a ramp from no guidance at the
    first token towards `scale` at the last (MUSE's linearly increasing guidance; Token-Shuffle's ramp in
    METHODS.md with f = 1): early tokens, which fix the layout, stay diverse; later ones get full guidance.
    """
    if schedule == "constant":
        return scale
    if schedule == "linear":
        return 1.0 + (scale - 1.0) * step / num_tokens
    raise ValueError(f"cfg schedule {schedule!r}; expected one of {CFG_SCHEDULES}")


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


def compile_step(step, device: torch.device):
    """torch.compile a sampler's step: a decode step or a whole draft-and-verify pass, on static KV caches
    (`setup_cache(static=True)`) with its random numbers drawn outside, so every call of one window size
    has the same shapes and no generator inside. On CUDA with mode "reduce-overhead": CUDA graphs replay
    the whole step in one launch. Shapes that change (a batch whose finished rows left) compile again once,
    after which dynamo treats that dimension as dynamic."""
    mode = "reduce-overhead" if torch.device(device).type == "cuda" else "default"
    # Every sampler variant (gamma, delta, window, drafter kind, batch size) is one more graph of the same
    # function; dynamo's default of 8 per function would fall back to eager mid-benchmark.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    return torch.compile(step, mode=mode)


def batch_seed(seed: int, start: int) -> int:
    """The seed of the batch whose first sample has global index `start`: a sample does not depend on how
    the work was split into batches or ranks (scripts/sample.py, scripts/bench_decoding.py)."""
    return seed * 1_000_003 + start


def class_balanced_labels(num_samples: int, num_classes: int) -> torch.Tensor:
    """0, 1, ..., C-1, 0, 1, ...: every class equally represented (up to one when C does not divide)."""
    return torch.arange(num_samples) % num_classes
