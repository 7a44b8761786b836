"""Fit a pipeline into a wall-clock budget: measured step times in, per-stage step counts and schedules out.

`make demo` runs the whole pipeline (tokenizer, codes, GPT, samples, evaluation) in a budget (15 minutes by
default) on whatever machine it finds. A short probe measures what a training step costs here; the plan
gives the training stages what the fixed work (extraction, sampling, evaluation, process start-ups) leaves,
split as the full recipe splits it, and never more steps than the full recipe. Schedules scale with the
steps (the GAN starts half-way, four validations, a checkpoint at each), so a shorter run is the same recipe
compressed, not the first minutes of the long one.

The fixed work is expressed in tokenizer steps: `FIXED_STEPS` is what extraction, sampling, evaluation and
the start-ups cost, measured on the reference machine divided by its tokenizer step time there, so on a
machine twice as slow it takes twice as long. A plan is an estimate; the demo prints it beside the measured
time of every stage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

FULL_TOKENIZER_STEPS, FULL_GENERATOR_STEPS = 2800, 2000  # titok_quickstart, gpt_quickstart
MIN_TOKENIZER_STEPS, MIN_GENERATOR_STEPS = 300, 200  # below these the demo shows nothing worth seeing
TOKENIZER_SHARE = 0.73  # of the training time: the full recipe's split (11 of 15 training minutes)
# Extraction of 20k crops, 3 x 510 samples, rFID, the floor, 3 gFIDs, photos-net on first use and the
# start-ups, in tokenizer steps of the same machine. Calibrated on the reference machine (2-core Xeon, probe
# 0.229 s per tokenizer step): that work took 85 s, plus about 60 s for photos-net in a fresh clone.
FIXED_STEPS = 650.0
# Validation, the GAN's discriminator steps, start-up and data loading add this share to a training stage's
# probed step time (reference machine, two runs: the tokenizer took 0.236-0.269 s per step against 0.229-0.237
# probed, the GPT 0.110-0.121 s against 0.105-0.139).
OVERHEAD = 0.12


@dataclass
class Plan:
    budget_s: float
    tokenizer_step_s: float
    generator_step_s: float
    fixed_s: float
    tokenizer_steps: int
    generator_steps: int
    estimate_s: float

    def as_dict(self) -> dict:
        return asdict(self)


def plan(budget_s: float, tokenizer_step_s: float, generator_step_s: float, fixed_steps: float = FIXED_STEPS):
    """Step counts for both training stages so that the pipeline's estimate fits `budget_s`."""
    if budget_s <= 0 or tokenizer_step_s <= 0 or generator_step_s <= 0:
        raise ValueError(f"budget {budget_s}s and step times must be > 0")
    fixed = fixed_steps * tokenizer_step_s
    training = max(budget_s - fixed, 0.0) / (1 + OVERHEAD)
    tokenizer_steps = int(TOKENIZER_SHARE * training / tokenizer_step_s)
    generator_steps = int((1 - TOKENIZER_SHARE) * training / generator_step_s)
    tokenizer_steps = min(FULL_TOKENIZER_STEPS, max(MIN_TOKENIZER_STEPS, tokenizer_steps))
    generator_steps = min(FULL_GENERATOR_STEPS, max(MIN_GENERATOR_STEPS, generator_steps))
    estimate = fixed + (1 + OVERHEAD) * (
        tokenizer_steps * tokenizer_step_s + generator_steps * generator_step_s
    )
    return Plan(
        budget_s, tokenizer_step_s, generator_step_s, fixed, tokenizer_steps, generator_steps, estimate
    )


def round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def generator_overrides(steps: int) -> list[str]:
    """A quickstart's schedule compressed to `steps`: 4 validations with a checkpoint at each, warm-up 100
    steps or a tenth of the run (gpt_quickstart)."""
    interval = round_to(steps / 4, 10)
    return [
        f"trainer.max_steps={steps}",
        f"module.warmup_steps={min(100, steps // 10)}",
        f"trainer.val_check_interval={interval}",
        f"callbacks.checkpoint.every_n_train_steps={interval}",
    ]


def tokenizer_overrides(steps: int) -> list[str]:
    """titok_quickstart's schedule compressed the same way, its GAN starting half-way as in the recipe."""
    return [*generator_overrides(steps), f"module.loss.gan_start_step={steps // 2}"]
