"""Speculative Jacobi Decoding and GSD (sampling/jacobi.py), on the tiny models of test_speculative.py."""

import copy

import pytest
import torch
from scipy.stats import chi2
from test_speculative import (
    ROWS,
    V,
    assert_rollbacks_equal_fresh_prefills,
    chi_square_pvalue,
    record_rollbacks,
    seeded,
    sequence_probabilities,
    tiny_gpt,
)

import sampling.engine as engine
import sampling.jacobi as jacobi
from sampling import latent_neighbours, sample_jacobi
from sampling.jacobi import copy_left_source

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def target():
    return tiny_gpt(0, 3.0, grid=(2, 2))  # 4 codes, 2x2 tokens: 256 sequences


SETTINGS = {
    "uniform": dict(init="uniform", window=3),
    "copy_left": dict(init="copy_left", window=2),
    "cfg": dict(init="uniform", cfg_scale=2.0),
    "copy_left_top_k": dict(init="copy_left", temperature=0.8, top_k=3),
}


@pytest.mark.parametrize("name", SETTINGS)
def test_sjd_matches_the_target_distribution(target, name):
    settings = SETTINGS[name]
    result = sample_jacobi(target, torch.ones(ROWS, dtype=torch.long), generator=seeded(2), **settings)
    guidance = {k: v for k, v in settings.items() if k not in ("init", "window")}
    assert chi_square_pvalue(result.tokens, sequence_probabilities(target, 1, **guidance)) > 1e-3
    stats = result.stats
    assert 0 < stats["acceptance_rate"] < 1 and stats["row_passes_min"] < stats["row_passes_max"]
    assert stats["model_batch"] == ROWS * (2 if "cfg_scale" in settings else 1)
    assert stats["tokens_per_pass"] == 4 / stats["passes_per_row"]


REUSE = {
    "uniform": dict(init="uniform", window=3),
    "copy_left_cfg": dict(init="copy_left", window=3, cfg_scale=2.0),
    "uniform_top_k": dict(init="uniform", window=2, temperature=0.8, top_k=3),
}


@pytest.mark.parametrize("name", REUSE)
def test_draft_reuse_matches_the_target_distribution(target, name):
    settings = REUSE[name]
    labels = torch.ones(ROWS, dtype=torch.long)
    result = sample_jacobi(target, labels, generator=seeded(3), reuse_drafts=True, **settings)
    guidance = {k: v for k, v in settings.items() if k not in ("init", "window")}
    assert chi_square_pvalue(result.tokens, sequence_probabilities(target, 1, **guidance)) > 1e-3
    if settings["init"] == "uniform":  # a copy_left draft (one-hot q) is never kept
        plain = sample_jacobi(target, labels, generator=seeded(3), **settings)
        assert result.stats["acceptance_rate"] > plain.stats["acceptance_rate"]  # confident drafts kept


def marginal_pvalue(tokens, probs):
    """Pearson's test of every position's token counts (B, N) against its probabilities (N, V), summed."""
    statistic, dof = 0.0, 0
    for position in range(tokens.shape[1]):
        counts = torch.bincount(tokens[:, position], minlength=probs.shape[1]).double()
        expected = probs[position].double() * len(tokens)
        statistic += ((counts - expected) ** 2 / expected).sum().item()
        dof += probs.shape[1] - 1
    return chi2.sf(statistic, dof)


@pytest.mark.parametrize("rule", ["mixture", "naive"])
def test_draft_reuse_needs_the_mixture_law(rule, monkeypatch):
    """On a model whose next-token law ignores the context (zero token embeddings: p_i depends on the
    position only, so every sequence's tokens are independent with known marginals), reuse with the
    mixture q' passes a per-position chi-square; keeping drafts but scoring them as if drawn from this
    pass's p (the naive rule) commits kept drafts too often and fails the same test."""
    model = tiny_gpt(0, 1.5, vocab=V, num_tokens=8, grid=(2, 4))
    with torch.no_grad():
        model.embed.table.weight.zero_()
        labels = torch.ones(1, dtype=torch.long)
        probs = model.logits(model.forward_prefix(torch.zeros(1, 7, dtype=torch.long), labels))[0].softmax(-1)
    if rule == "naive":
        original = jacobi.reused_drafts
        monkeypatch.setattr(jacobi, "reused_drafts", lambda p, q, d, f: (original(p, q, d, f)[0], p))
    result = sample_jacobi(
        model, torch.ones(ROWS, dtype=torch.long), window=4, generator=seeded(3), reuse_drafts=True
    )
    pvalue = marginal_pvalue(result.tokens, probs)
    assert pvalue > 1e-3 if rule == "mixture" else pvalue < 1e-6


def test_ragged_batches_match_each_rows_distribution(target):
    """Two classes in one batch, with and without guidance: rows finish after different numbers of passes
    and each class follows its own distribution."""
    labels = torch.tensor([0, 1]).repeat(ROWS)
    for settings in (dict(), dict(cfg_scale=2.0)):
        result = sample_jacobi(target, labels, window=3, generator=seeded(5), **settings)
        for label in (0, 1):
            rows = result.tokens[labels == label]
            assert chi_square_pvalue(rows, sequence_probabilities(target, label, **settings)) > 1e-3
        assert result.stats["row_passes_max"] - result.stats["row_passes_min"] >= 2


@pytest.mark.parametrize("init", ["uniform", "copy_left"])
def test_accepting_every_draft_fails_the_same_test(target, init, monkeypatch):
    monkeypatch.setattr(engine, "accepts", lambda p_x, q_x, u: torch.ones_like(u, dtype=torch.bool))
    result = sample_jacobi(target, torch.ones(ROWS, dtype=torch.long), init=init, generator=seeded(2))
    assert result.stats["acceptance_rate"] == 1.0
    assert chi_square_pvalue(result.tokens, sequence_probabilities(target, 1)) < 1e-6


def left_chain_by_hand(index, known, grid):
    """Follow copy_left's rule one step at a time: left, or up from column 0, until a known token."""
    while index >= known:
        if grid is not None and index % grid[1] == 0 and index >= grid[1]:
            index -= grid[1]
        else:
            index -= 1
    return index


@pytest.mark.parametrize("grid", [None, (3, 4), (4, 2)], ids=["1d", "3x4", "4x2"])
def test_copy_left_source_follows_the_chain(grid):
    num_tokens = 12 if grid is None else grid[0] * grid[1]
    for known in range(1, num_tokens):
        index = torch.arange(known, num_tokens)[None]
        got = copy_left_source(index, torch.tensor([[known]]), grid)[0].tolist()
        assert got == [left_chain_by_hand(i, known, grid) for i in index[0].tolist()], known


def test_copy_left_drafts_copy_the_left_token_or_the_one_above(monkeypatch):
    """The first window's drafts, read off the first decode call, are what copy_left made them."""
    model = tiny_gpt(0, 3.0, grid=(2, 2))
    windows = []
    decode = model.decode

    def logged(tokens):
        windows.append(tokens.clone())
        return decode(tokens)

    monkeypatch.setattr(model, "decode", logged)
    result = sample_jacobi(
        model, torch.ones(50, dtype=torch.long), window=3, init="copy_left", generator=seeded()
    )
    first = windows[0]  # (B, 4): token 0, then drafts of tokens 1, 2, 3
    assert torch.equal(first[:, 1], first[:, 0])  # token 1 copies token 0 (left)
    assert torch.equal(first[:, 2], first[:, 0])  # token 2 (row 1, column 0) copies token 0 (above)
    assert torch.equal(first[:, 3], first[:, 2])  # token 3 copies token 2 (left)
    assert torch.equal(result.tokens[:, 0], first[:, 0])


def test_gsd_with_groups_of_one_is_sjd(target):
    labels = torch.tensor([0, 1] * 200)
    neighbours = latent_neighbours(torch.randn(V, 3, generator=seeded(1)), 3)
    sjd = sample_jacobi(target, labels, cfg_scale=1.5, generator=seeded(3))
    gsd = sample_jacobi(
        target, labels, cfg_scale=1.5, generator=seeded(3), grouped=True, neighbours=neighbours, group_size=1
    )
    assert torch.equal(sjd.tokens, gsd.tokens) and sjd.stats == {
        **gsd.stats,
        "wall_time": sjd.stats["wall_time"],
    }
    pairs = sample_jacobi(
        target, labels, cfg_scale=1.5, generator=seeded(3), grouped=True, neighbours=neighbours, group_size=2
    )
    assert pairs.stats["acceptance_rate"] > sjd.stats["acceptance_rate"]
    everything = sample_jacobi(
        target, labels, generator=seeded(3), grouped=True, neighbours=neighbours, group_size=V
    )
    assert everything.stats["acceptance_rate"] == 1.0  # a group of every code: sum p / sum q = 1


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_cache_rollback_equals_a_fresh_prefill(target, monkeypatch, cfg_scale):
    model = copy.deepcopy(target)
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1] * 4)
    log = record_rollbacks(monkeypatch, {"target": model})
    sample_jacobi(model, labels, window=3, generator=seeded(4), cfg_scale=cfg_scale)
    monkeypatch.undo()
    assert_rollbacks_equal_fresh_prefills(log, {"target": model}, labels, guided=cfg_scale != 1.0)


@pytest.mark.parametrize("init", ["uniform", "copy_left"])
def test_rows_finish_with_exactly_the_requested_tokens(init):
    model = tiny_gpt(0, 4.0, vocab=8, num_tokens=12, grid=(3, 4)).train()
    labels = torch.arange(64) % 2
    result = sample_jacobi(model, labels, num_tokens=10, window=4, init=init, generator=seeded(5))
    assert result.tokens.shape == (64, 10) and ((result.tokens >= 0) & (result.tokens < 8)).all()
    assert result.stats["row_passes_min"] < result.stats["row_passes_max"]
    assert result.stats["forward_passes"] <= 10
    assert model.training and model.cache is None
    many = sample_jacobi(model, labels[:3], num_tokens=3, window=16, init=init, generator=seeded(5))
    assert many.tokens.shape == (3, 3)  # the window is cut at the end of the sequence


def test_bad_arguments_are_errors(target):
    labels = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="init"):
        sample_jacobi(target, labels, init="random")
    with pytest.raises(ValueError, match="window"):
        sample_jacobi(target, labels, window=0)
    with pytest.raises(ValueError, match="neighbours"):
        sample_jacobi(target, labels, grouped=True)
    with pytest.raises(ValueError, match="group_size"):
        sample_jacobi(
            target, labels, grouped=True, neighbours=torch.zeros(V, 2, dtype=torch.long), group_size=4
        )
