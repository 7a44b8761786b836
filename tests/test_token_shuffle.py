"""Token-Shuffle (generators/token_shuffle.py): the window layout, the model, and every sampler on it."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from test_speculative import chi_square_pvalue, seeded
from torch import nn

import sampling.jacobi as jacobi
from generators import GPT
from generators.logits import filter_logits, guided_logits
from generators.token_shuffle import shuffle_tokens, unshuffle_tokens
from sampling import sample_ar, sample_jacobi, sample_speculative

ROWS = 30000  # samples per chi-square test: 4096 sequences of 12 binary tokens


@pytest.mark.parametrize("grid", [(4, 4), (4, 6), (8, 8), (2, 4)])
def test_shuffle_then_unshuffle_is_the_identity_for_every_s(grid):
    tokens = torch.randperm(grid[0] * grid[1]).repeat(3, 1)  # (3, h*w), every entry distinct
    for s in [s for s in range(1, min(grid) + 1) if grid[0] % s == 0 and grid[1] % s == 0]:
        windows = shuffle_tokens(tokens, grid, s)
        assert windows.shape == (3, grid[0] * grid[1] // s**2, s * s)
        assert torch.equal(unshuffle_tokens(windows, grid, s), tokens)


def test_a_window_holds_its_s_by_s_block_in_raster_order():
    grid = (4, 6)
    tokens = torch.arange(24)[None]  # token (r, c) = 6 r + c
    windows = shuffle_tokens(tokens, grid, 2)  # (1, 6, 4): a 2 x 3 grid of windows
    assert windows[0, 0].tolist() == [0, 1, 6, 7]
    assert windows[0, 1].tolist() == [2, 3, 8, 9]
    assert windows[0, 3].tolist() == [12, 13, 18, 19]  # second row of windows


def shuffled_gpt(seed=0, shuffle=2, grid=(2, 6), vocab=2, width=32, head_scale=3.0):
    """Random weights with peaked, context-dependent distributions (as test_speculative's tiny_gpt)."""
    torch.manual_seed(seed)
    num_tokens = grid[0] * grid[1]
    model = GPT(vocab, num_tokens, 2, grid=grid, size="tiny", width=width, depth=1, heads=2, shuffle=shuffle)
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.3)
    model.head.proj.weight.data *= head_scale
    return model.eval()


def test_shuffle_1_is_the_plain_gpt():
    torch.manual_seed(0)
    plain = GPT(16, 16, 3, grid=(4, 4), size="tiny", width=32, depth=1, heads=2)
    torch.manual_seed(0)
    same = GPT(16, 16, 3, grid=(4, 4), size="tiny", width=32, depth=1, heads=2, shuffle=1)
    assert plain.state_dict().keys() == same.state_dict().keys()
    assert all(
        torch.equal(a, b)
        for a, b in zip(plain.state_dict().values(), same.state_dict().values(), strict=True)
    )
    tokens, labels = torch.randint(16, (2, 16)), torch.tensor([0, 2])
    assert torch.equal(plain.eval().loss(tokens, labels), same.eval().loss(tokens, labels))
    assert plain.num_positions == same.num_positions == 16


def test_a_shuffled_gpt_runs_s_squared_fewer_positions_on_the_window_grid():
    model = shuffled_gpt(shuffle=2, grid=(4, 8), vocab=16)
    assert model.num_positions == 8 and model.position_grid == (2, 4) and model.head.token_shape == (4,)
    assert model.rope.num_positions == 8 + 1  # class + one row per window
    hidden = model(model.sequence_tokens(torch.randint(16, (3, 32))), torch.tensor([0, 1, 1]))
    assert hidden.shape == (3, 8, 32) and model.logits(hidden).shape == (3, 8, 4, 16)


def test_teacher_forced_loss_is_the_mean_per_token_cross_entropy():
    """Every image token (r, c) is predicted by its window's position, slot (r % s, c % s), independently
    of the window's other tokens: the loss is the per-token cross-entropy averaged over all h * w."""
    s, grid, vocab = 2, (4, 6), 11
    model = shuffled_gpt(shuffle=s, grid=grid, vocab=vocab)
    tokens, labels = torch.randint(vocab, (3, 24)), torch.tensor([0, 1, 0])
    logits = model.logits(model(model.sequence_tokens(tokens), labels))  # (B, 6, 4, V)
    by_hand = []
    for r, c in itertools.product(range(grid[0]), range(grid[1])):
        window, slot = (r // s) * (grid[1] // s) + c // s, (r % s) * s + c % s
        by_hand.append(F.cross_entropy(logits[:, window, slot], tokens[:, r * grid[1] + c], reduction="none"))
    assert torch.allclose(model.loss(tokens, labels), torch.stack(by_hand).mean(), atol=1e-6)
    # and a token's loss does not depend on the other tokens of its window (they are not inputs)
    changed = tokens.clone()
    changed[:, 1] = (changed[:, 1] + 1) % vocab  # same window as token 0
    again = model.logits(model(model.sequence_tokens(changed), labels))
    assert torch.allclose(again[:, 0], logits[:, 0])


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_cached_and_uncached_sampling_give_the_same_tokens(cfg_scale):
    model = shuffled_gpt(shuffle=2, grid=(4, 4), vocab=8)
    labels = torch.tensor([0, 1, 1])
    cached = sample_ar(model, labels, cfg_scale=cfg_scale, generator=seeded(3))
    uncached = sample_ar(model, labels, cfg_scale=cfg_scale, generator=seeded(3), use_cache=False)
    assert cached.tokens.shape == (3, 16)  # the tokenizer's raster layout
    assert torch.equal(cached.tokens, uncached.tokens)
    assert cached.stats["forward_passes"] == 4  # one pass per window of 4 tokens


@torch.no_grad()
def sequence_probabilities(model, label=1, cfg_scale=1.0):
    """Probability of every image-token sequence (itertools.product order over the raster layout) under
    the shuffled model's own guided distributions, by enumeration: prod over windows and slots."""
    vocab = model.config["vocab_size"]
    images = torch.tensor(list(itertools.product(range(vocab), repeat=model.num_tokens)))  # (V^N, N)
    windows = model.sequence_tokens(images)  # (V^N, P, S)
    labels = torch.full((len(images),), label)
    logits = model.logits(model.forward_prefix(windows[:, :-1], labels)).float()  # (V^N, P, S, V)
    if cfg_scale != 1.0:
        null = torch.full_like(labels, model.null_class)
        logits = guided_logits(
            logits, model.logits(model.forward_prefix(windows[:, :-1], null)).float(), cfg_scale
        )
    probs = filter_logits(logits).softmax(-1)
    return probs.gather(-1, windows[..., None]).squeeze(-1).flatten(1).prod(-1)


SAMPLERS = {
    "ar": lambda model, labels, **kw: sample_ar(model, labels, **kw),
    "sjd_uniform": lambda model, labels, **kw: sample_jacobi(model, labels, window=2, **kw),
    "sjd_copy_left": lambda model, labels, **kw: sample_jacobi(
        model, labels, window=2, init="copy_left", **kw
    ),
    "sjd_reuse": lambda model, labels, **kw: sample_jacobi(model, labels, window=2, reuse_drafts=True, **kw),
    "speculative": lambda model, labels, **kw: sample_speculative(
        model, shuffled_gpt(seed=7, head_scale=1.0), labels, gamma=2, **kw
    ),
}


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_matches_the_enumerated_distribution(name, cfg_scale):
    """2 x 6 binary grid, s = 2: three windows of four tokens, 4096 sequences. The second window is drafted
    and tested slot by slot (SJD, speculative) or drawn directly (ar); the last is always drawn from p."""
    model = shuffled_gpt()
    labels = torch.ones(ROWS, dtype=torch.long)
    result = SAMPLERS[name](model, labels, cfg_scale=cfg_scale, generator=seeded(11))
    assert result.tokens.shape == (ROWS, 12)
    if name != "ar":
        assert 0.005 < result.stats["acceptance_rate"] < 0.95  # windows are both accepted and rejected
    assert chi_square_pvalue(result.tokens, sequence_probabilities(model, 1, cfg_scale), vocab=2) > 1e-3


def redraw_rejected_windows(verify):
    """A wrong rule: after a rejection the whole window is redrawn from p, discarding the slots that passed
    (a window would then be accepted only when all of its slots pass, and is otherwise a fresh draw)."""

    def wrong(p, q, drafts, limit, uniforms, relax=None, groups=None):
        first, new, tested = verify(p, q, drafts, limit, uniforms, relax, groups)
        rows = torch.arange(len(first))
        fresh = torch.multinomial(p[rows, first].flatten(0, 1), 1, generator=seeded(5)).view_as(new)
        return first, torch.where((first < limit)[:, None], fresh, new), tested

    return wrong


def test_a_wrong_window_rule_fails_the_same_test(monkeypatch):
    monkeypatch.setattr(jacobi, "verify", redraw_rejected_windows(jacobi.verify))
    model = shuffled_gpt()
    result = sample_jacobi(model, torch.ones(ROWS, dtype=torch.long), window=2, generator=seeded(11))
    assert chi_square_pvalue(result.tokens, sequence_probabilities(model, 1), vocab=2) < 1e-6


def test_settings_that_cannot_shuffle_are_one_line_errors():
    with pytest.raises(ValueError, match="needs grid tokens"):
        GPT(16, 16, 2, size="tiny", shuffle=2)
    with pytest.raises(ValueError, match="does not divide the token grid"):
        GPT(16, 12, 2, grid=(3, 4), size="tiny", shuffle=2)
    with pytest.raises(ValueError, match="categorical codes"):
        GPT(2, 16, 2, grid=(4, 4), size="tiny", shuffle=2, token_kind="binary", token_dim=4)
    model = shuffled_gpt(shuffle=2, grid=(4, 4), vocab=8)
    with pytest.raises(ValueError, match="generates all 16"):
        sample_ar(model, torch.zeros(1, dtype=torch.long), num_tokens=8)
    with pytest.raises(ValueError, match="draft shuffle=1 != the target's 2"):
        plain = GPT(8, 16, 2, grid=(4, 4), size="tiny", width=32, depth=1, heads=2)
        sample_speculative(model, plain, torch.zeros(1, dtype=torch.long))
