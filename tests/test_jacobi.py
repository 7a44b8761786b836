"""Speculative Jacobi Decoding and GSD (sampling/jacobi.py), on the tiny models of test_speculative.py."""

import pytest
import torch
from test_speculative import (
    ROWS,
    V,
    assert_cache_equals_fresh_prefill,
    chi_square_pvalue,
    record_truncations,
    seeded,
    sequence_probabilities,
    tiny_gpt,
)

import sampling.speculative as speculative
from sampling import latent_neighbours, sample_jacobi
from sampling.jacobi import _init_drafts, _left_index
from sampling.speculative import _Rows

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
    assert 0 < stats["acceptance_rate"] < 1 and stats["max_lead"] > 0
    assert stats["model_batch"] == ROWS * (2 if "cfg_scale" in settings else 1)
    assert stats["tokens_per_pass"] == 4 / stats["forward_passes"]


@pytest.mark.parametrize("init", ["uniform", "copy_left"])
def test_accepting_every_draft_fails_the_same_test(target, init, monkeypatch):
    monkeypatch.setattr(speculative, "_acceptance_ratio", lambda p_x, q_x: torch.ones_like(p_x))
    result = sample_jacobi(target, torch.ones(ROWS, dtype=torch.long), init=init, generator=seeded(2))
    assert result.stats["acceptance_rate"] == 1.0
    assert chi_square_pvalue(result.tokens, sequence_probabilities(target, 1)) < 1e-6


def test_copy_left_copies_the_left_token_or_the_one_above():
    assert [_left_index(i, (2, 3)) for i in range(1, 6)] == [0, 1, 0, 3, 4]  # 3 starts row 1: above is 0
    assert [_left_index(i, None) for i in range(1, 6)] == [0, 1, 2, 3, 4]
    rows = _Rows(2, 6, "cpu")
    rows.tokens[:, :3] = torch.tensor([[1, 2, 3], [1, 2, 3]])
    rows.count = torch.tensor([3, 2])  # row 1 has not committed token 2: its slot 0 holds the draft
    drafts, q = torch.tensor([[0, 0, 0], [7, 0, 0]]), torch.zeros(2, 3, 8)
    _init_drafts(rows, 2, drafts, q, 1, "copy_left", (2, 3), None)  # slots 1, 2 = tokens 3, 4
    assert drafts.tolist() == [[0, 1, 1], [7, 1, 1]]  # token 3 copies token 0 (above), token 4 copies 3
    assert torch.equal(q[:, 1:], torch.nn.functional.one_hot(drafts[:, 1:], 8).float())
    rows.count = torch.tensor([3, 3])
    _init_drafts(rows, 2, drafts, q, 2, "copy_left", None, None)  # 1D: token 4 copies token 3 = slot 1
    assert drafts[:, 2].tolist() == [1, 1]
    _init_drafts(rows, 2, drafts, q, 0, "uniform", None, seeded())
    assert torch.allclose(q, torch.full_like(q, 1 / 8))


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


def test_cache_rollback_equals_a_fresh_prefill(target):
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1] * 8)
    log = []
    record_truncations(target, log)
    try:
        result = sample_jacobi(target, labels, window=3, generator=seeded(4))
    finally:
        del target.truncate_cache
    assert_cache_equals_fresh_prefill(target, labels, result.tokens, log)


@pytest.mark.parametrize("init", ["uniform", "copy_left"])
def test_rows_finish_with_exactly_the_requested_tokens(init):
    model = tiny_gpt(0, 4.0, vocab=8, num_tokens=12, grid=(3, 4)).train()
    labels = torch.arange(64) % 2
    result = sample_jacobi(model, labels, num_tokens=10, window=4, init=init, generator=seeded(5))
    assert result.tokens.shape == (64, 10) and ((result.tokens >= 0) & (result.tokens < 8)).all()
    assert result.stats["max_lead"] > 0 and result.stats["forward_passes"] <= 10
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
