"""Samplers: (generator, conditions, settings) -> SampleResult (tokens + stats), one file per method."""

from .ar import sample_ar
from .common import (
    CFG_SCHEDULES,
    SampleResult,
    cfg_scale_at,
    class_balanced_labels,
    filter_logits,
    guided_logits,
    sample_logits,
)

__all__ = [
    "CFG_SCHEDULES",
    "SampleResult",
    "cfg_scale_at",
    "class_balanced_labels",
    "filter_logits",
    "guided_logits",
    "sample_ar",
    "sample_logits",
]
