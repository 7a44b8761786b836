"""training/budget.py: the demo's plan fits its budget and compresses the full recipe's schedule."""

import pytest

from training.budget import (
    FULL_GENERATOR_STEPS,
    FULL_TOKENIZER_STEPS,
    MIN_TOKENIZER_STEPS,
    generator_overrides,
    plan,
    tokenizer_overrides,
)


@pytest.mark.parametrize("step_s", [0.2, 0.3, 0.45, 0.6])
def test_the_estimate_fits_the_budget_and_scales_with_the_machine(step_s):
    chosen = plan(900, step_s, step_s / 6)
    assert chosen.estimate_s <= 900 * 1.001
    assert MIN_TOKENIZER_STEPS <= chosen.tokenizer_steps <= FULL_TOKENIZER_STEPS
    slower = plan(900, 2 * step_s, step_s / 3)
    assert slower.tokenizer_steps < chosen.tokenizer_steps or chosen.tokenizer_steps == MIN_TOKENIZER_STEPS


def test_a_fast_machine_gets_the_full_recipe_and_no_more():
    chosen = plan(3600, 0.05, 0.01)
    assert (chosen.tokenizer_steps, chosen.generator_steps) == (FULL_TOKENIZER_STEPS, FULL_GENERATOR_STEPS)
    assert chosen.estimate_s < 3600


def test_a_budget_too_small_keeps_a_minimum_and_says_so_in_the_estimate():
    chosen = plan(60, 0.5, 0.1)
    assert chosen.tokenizer_steps == MIN_TOKENIZER_STEPS and chosen.estimate_s > 60


def test_schedules_are_compressed_with_the_steps():
    overrides = dict(o.split("=") for o in tokenizer_overrides(1000))
    assert overrides["trainer.max_steps"] == "1000" and overrides["module.loss.gan_start_step"] == "500"
    assert (
        overrides["trainer.val_check_interval"]
        == overrides["callbacks.checkpoint.every_n_train_steps"]
        == "250"
    )
    assert dict(o.split("=") for o in generator_overrides(400))["module.warmup_steps"] == "40"
    with pytest.raises(ValueError):
        plan(0, 0.1, 0.1)
