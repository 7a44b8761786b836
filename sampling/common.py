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

from generators.logits import filter_logits, guided_logits, sample_logits, sample_probs  # noqa: F401  (re-exported for the samplers)

CFG_SCHEDULES = ("constant", "linear")


@dataclass
class SampleResult:
    tokens: torch.Tensor  # (B, N) long
    labels: torch.Tensor  # (B,) the conditions the rows were sampled for
    stats: dict = field(default_factory=dict)


def cfg_scale_at(step, num_tokens: int, scale: float, schedule: str = "constant", ramp: float = 1.0):
    """Guidance scale for the position at index `step` (0-based, an int or a tensor) of `num_tokens`.

    constant: `scale` everywhere. linear: 1 + (scale - 1) * min(1, step / (ramp * num_tokens)), a ramp from
    no guidance at the first position to `scale` after the fraction `ramp` of the sequence (Token-Shuffle's
    ramp, docs/METHODS.md, with f = ramp; ramp 1 is MUSE's linearly increasing guidance): early positions,
    which fix the layout, stay diverse; later ones get full guidance.
    """
    if not 0 < ramp <= 1:
        raise ValueError(f"cfg_ramp={ramp}; expected 0 < ramp <= 1 (the share of the sequence ramped over)")
    if schedule == "constant":
        return scale
    if schedule == "linear":
        progress = step / (ramp * num_tokens)
        progress = progress.clamp(max=1.0) if isinstance(progress, torch.Tensor) else min(1.0, progress)
        return 1.0 + (scale - 1.0) * progress
    raise ValueError(f"cfg schedule {schedule!r}; expected one of {CFG_SCHEDULES}")


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
