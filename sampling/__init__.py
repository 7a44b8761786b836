"""Samplers: (generator, conditions, settings) -> SampleResult (tokens + stats), one file per method
(ar, speculative incl. LANTERN, jacobi incl. GSD) on one decoding engine (engine.py); the registry of
samplers by name (registry.py) and `generate`, class labels to decoded images in one call (generate.py)."""

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
from .generate import Generated, generate
from .jacobi import JACOBI_INITS, sample_jacobi
from .registry import SAMPLERS, get_sampler, sampler_inputs
from .speculative import (
    ACCEPTANCE_RULES,
    NEIGHBOUR_METRICS,
    latent_neighbours,
    relaxed_target,
    sample_speculative,
    tokenizer_neighbours,
)

__all__ = [
    "SAMPLERS",
    "Generated",
    "generate",
    "get_sampler",
    "sampler_inputs",
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
