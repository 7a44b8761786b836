import pytest
import torch

from generators import GPT
from training.generator_module import TRUNCATE_RULES, GeneratorModule, draw_length


def tiny_module(label_dropout: float = 0.1, truncate: str = "none") -> GeneratorModule:
    gpt = GPT(
        vocab_size=8,
        num_tokens=8,
        num_classes=3,
        size="tiny",
        width=32,
        depth=1,
        heads=2,
        label_dropout=label_dropout,
    )
    return GeneratorModule(gpt, truncate=truncate)


def test_training_step_drops_labels_once_at_the_configured_rate():
    torch.manual_seed(0)
    module = tiny_module(label_dropout=0.5).train()
    seen = []
    module.generator.class_embed.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    batch = {"tokens": torch.randint(8, (4000, 8)), "label": torch.zeros(4000, dtype=torch.long)}
    module.training_step(batch, 0)
    null_share = (torch.cat(seen) == module.generator.null_class).float().mean().item()
    assert abs(null_share - 0.5) < 0.03  # dropped twice it would be 0.75


@pytest.mark.parametrize("rule", TRUNCATE_RULES)
def test_draw_length_support(rule):
    generator = torch.Generator().manual_seed(0)
    drawn = {draw_length(rule, 32, generator) for _ in range(2000)}
    expected = {"none": {32}, "uniform": set(range(1, 33)), "pow2": {1, 2, 4, 8, 16, 32}}[rule]
    assert drawn == expected
    assert {draw_length("pow2", 24, generator) for _ in range(500)} == {1, 2, 4, 8, 16, 24}


def test_truncated_training_sees_prefixes_only():
    torch.manual_seed(0)
    module = tiny_module(truncate="uniform").train()
    lengths = []
    module.generator.embed.register_forward_hook(lambda m, args, out: lengths.append(args[0].shape[1] + 1))
    batch = {"tokens": torch.randint(8, (4, 8)), "label": torch.zeros(4, dtype=torch.long)}
    for _ in range(200):
        module.training_step(batch, 0)
    assert set(lengths) == set(range(1, 9))


def test_unknown_truncate_rule_is_an_error():
    with pytest.raises(ValueError, match="module.truncate"):
        tiny_module(truncate="sometimes")
