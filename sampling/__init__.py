"""Samplers: (generator, conditions, settings) -> SampleResult (tokens + stats), one file per method."""

from .ar import sample_ar
from .common import (
    CFG_SCHEDULES,
    SampleResult,
    batch_seed,
    cfg_scale_at,
    class_balanced_labels,
    filter_logits,
    guided_logits,
    sample_logits,
    sample_probs,
)
from .jacobi import JACOBI_INITS, sample_jacobi
from .speculative import (
    ACCEPTANCE_RULES,
    NEIGHBOUR_METRICS,
    latent_neighbours,
    relaxed_target,
    sample_speculative,
    tokenizer_neighbours,
)

__all__ = [
    "ACCEPTANCE_RULES",
    "CFG_SCHEDULES",
    "JACOBI_INITS",
    "NEIGHBOUR_METRICS",
    "SampleResult",
    "batch_seed",
    "cfg_scale_at",
    "class_balanced_labels",
    "filter_logits",
    "guided_logits",
    "latent_neighbours",
    "relaxed_target",
    "sample_ar",
    "sample_jacobi",
    "sample_logits",
    "sample_probs",
    "sample_speculative",
    "tokenizer_neighbours",
]
