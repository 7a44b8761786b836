import math

import pytest
import torch
from torch import nn

from generators import GPT
from generators.heads import CategoricalHead
from sampling import (
    SampleResult,
    cfg_scale_at,
    class_balanced_labels,
    filter_logits,
    guided_logits,
    sample_ar,
    sample_logits,
    sample_probs,
)

V, N, C = 16, 8, 4


def tiny_gpt(**kwargs) -> GPT:
    torch.manual_seed(0)
    model = GPT(V, N, C, size="tiny", width=32, depth=2, heads=2, **kwargs)
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.3)  # peaked, context-dependent distributions
    return model.eval()


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def spy(model):
    """Record (method, rows) for every model call the sampler makes."""
    calls = []

    def recorder(name):
        method = getattr(model, name)

        def record(*args):
            calls.append((name, args[0].shape[0]))
            return method(*args)

        return record

    for name in ("prefill", "decode", "forward_prefix"):
        setattr(model, name, recorder(name))
    return calls


# ---- shared helpers


def test_guided_logits_convention():
    cond, uncond = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    assert torch.equal(guided_logits(cond, uncond, 1.0), cond)
    assert torch.equal(guided_logits(cond, uncond, 0.0), uncond)
    assert torch.equal(guided_logits(cond, uncond, 3.0), torch.tensor([4.0, -2.0]))  # u + 3 (c - u)


def test_cfg_schedules():
    assert [cfg_scale_at(t, 8, 4.0, "constant") for t in (0, 5)] == [4.0, 4.0]
    assert [cfg_scale_at(t, 8, 4.0, "linear") for t in (0, 2, 4, 8)] == [1.0, 1.75, 2.5, 4.0]
    with pytest.raises(ValueError, match="schedule"):
        cfg_scale_at(0, 8, 4.0, "cosine")
    # Token-Shuffle's ramp: full scale after a quarter of the positions, then constant
    assert [cfg_scale_at(t, 8, 4.0, "linear", ramp=0.25) for t in (0, 1, 2, 5)] == [1.0, 2.5, 4.0, 4.0]
    steps = cfg_scale_at(torch.arange(8), 8, 4.0, "linear", ramp=0.25)
    assert steps.tolist() == [1.0, 2.5, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    with pytest.raises(ValueError, match="cfg_ramp"):
        cfg_scale_at(0, 8, 4.0, "linear", ramp=0.0)


def test_temperature_divides_logits():
    logits = torch.tensor([[1.0, 2.0, 4.0]])
    assert torch.allclose(filter_logits(logits, temperature=2.0), logits / 2)
    assert filter_logits(logits, temperature=0.5).softmax(-1)[0, 2] > logits.softmax(-1)[0, 2]
    with pytest.raises(ValueError):
        filter_logits(logits, temperature=0.0)


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.randn(4, 50, generator=seeded())
    out = filter_logits(logits, top_k=7)
    kept = torch.isfinite(out)
    assert (kept.sum(-1) == 7).all()
    assert torch.equal(kept, torch.zeros_like(kept).scatter_(-1, logits.topk(7).indices, True))
    assert torch.equal(out[kept], logits[kept])
    ties = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0]])
    assert torch.isfinite(filter_logits(ties, top_k=2)).sum() == 2  # exactly k, even on ties
    assert torch.equal(filter_logits(ties, top_k=0), ties) and torch.equal(filter_logits(ties, top_k=9), ties)


def _kept_by_top_p(probs, p, **kwargs):
    logits = torch.tensor(probs).log()
    return set(torch.isfinite(filter_logits(logits, top_p=p, **kwargs)).nonzero().flatten().tolist())


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = [0.125, 0.5, 0.0625, 0.25, 0.0625]  # sorted: 1 (0.5), 3 (0.25), 0 (0.125), 2 and 4
    assert _kept_by_top_p(probs, 0.3) == {1}
    assert _kept_by_top_p(probs, 0.5) == {1}  # boundary: 0.5 reaches p exactly
    assert _kept_by_top_p(probs, 0.51) == {1, 3}
    assert _kept_by_top_p(probs, 0.75) == {1, 3}  # boundary
    assert _kept_by_top_p(probs, 0.76) == {1, 3, 0}
    assert _kept_by_top_p(probs, 1.0) == {0, 1, 2, 3, 4}
    assert _kept_by_top_p(probs, 1e-9) == {1}  # never fewer than one
    # top-k first, then top-p on the renormalised survivors: 0.5 / 0.75 = 0.67
    assert _kept_by_top_p(probs, 0.6, top_k=2) == {1}
    assert _kept_by_top_p(probs, 0.7, top_k=2) == {1, 3}
    batched = filter_logits(torch.tensor([probs, probs[::-1]]).log(), top_p=0.75)
    assert torch.isfinite(batched).sum(-1).tolist() == [2, 2]


def test_sample_logits_is_seeded_and_keeps_shape():
    logits = torch.randn(3, 5, V)
    a, b = sample_logits(logits, seeded(1)), sample_logits(logits, seeded(1))
    assert a.shape == (3, 5) and a.dtype == torch.long and torch.equal(a, b)
    one_hot = torch.full((4, V), float("-inf")).index_fill_(1, torch.tensor([3]), 0.0)
    assert (sample_logits(one_hot) == 3).all()


@pytest.mark.parametrize(
    "weights", [[0.5, 0.0, 0.2, 0.3, 0.0], [2.0, 0.0, 1.0, 1.0, 6.0]], ids=["probs", "weights"]
)
def test_sample_probs_draws_each_token_with_its_weight(weights):
    weights = torch.tensor(weights)
    draws = sample_probs(weights.expand(20_000, 5), seeded(3))  # one draw per row
    statistic, dof = chi_square(draws, weights / weights.sum())  # zero-weight tokens must never appear
    assert statistic < CHI2_999[dof], statistic
    assert sample_probs(weights.expand(2, 3, 5), seeded(3)).shape == (2, 3)


def test_class_balanced_labels():
    assert class_balanced_labels(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert torch.bincount(class_balanced_labels(1000, 10)).tolist() == [100] * 10


# ---- sample_ar on a GPT


@torch.no_grad()
def test_scale_one_is_conditional_sampling_without_doubling():
    model, labels = tiny_gpt(), torch.tensor([0, 1, 3])
    calls = spy(model)
    result = sample_ar(model, labels, cfg_scale=1.0, generator=seeded(5))
    assert {rows for _, rows in calls} == {3} and result.stats["model_batch"] == 3

    reference, g = torch.zeros(3, 0, dtype=torch.long), seeded(5)  # conditional sampling, written out
    for _ in range(N):
        probs = model.logits(model.forward_prefix(reference, labels)[:, -1]).softmax(-1)
        reference = torch.cat([reference, sample_probs(probs, g)[:, None]], 1)
    assert torch.equal(result.tokens, reference)

    calls.clear()
    guided = sample_ar(model, labels, cfg_scale=4.0, generator=seeded(5))
    assert {rows for _, rows in calls} == {6} and guided.stats["forward_passes"] == N


@pytest.mark.parametrize(
    "settings",
    [
        dict(),
        dict(cfg_scale=3.0),
        dict(cfg_scale=3.0, cfg_schedule="linear", temperature=0.8, top_k=6, top_p=0.9),
    ],
)
def test_cached_and_uncached_sampling_agree(settings):
    model, labels = tiny_gpt(grid=(2, 4)), torch.tensor([0, 1, 2, 3, C])
    cached = sample_ar(model, labels, generator=seeded(3), use_cache=True, **settings)
    recomputed = sample_ar(model, labels, generator=seeded(3), use_cache=False, **settings)
    assert torch.equal(cached.tokens, recomputed.tokens)
    assert len(set(cached.tokens.flatten().tolist())) > 1


@pytest.mark.parametrize("use_cache", [True, False])
def test_shorter_sequences_and_stats(use_cache):
    model, labels = tiny_gpt().train(), torch.tensor([2, 0])
    result = sample_ar(model, labels, num_tokens=5, generator=seeded(), use_cache=use_cache)
    assert isinstance(result, SampleResult)
    assert result.tokens.shape == (2, 5) and result.tokens.dtype == torch.long
    assert torch.equal(result.labels, labels)
    assert result.stats["forward_passes"] == 5 and result.stats["tokens_per_pass"] == 1.0
    assert result.stats["wall_time"] > 0
    assert model.training and model.cache is None  # mode restored, cache released
    with pytest.raises(ValueError):
        sample_ar(model, labels, num_tokens=N + 1)


# ---- sample_ar on a model whose distributions are known


class FixedLogits(nn.Module):
    """The sampler's model protocol with context-free logits: `cond` for real classes, `uncond` for null."""

    num_tokens, num_positions, null_class = 3, 3, 9

    def __init__(self, cond, uncond):
        super().__init__()
        self.table = nn.Parameter(torch.stack([torch.tensor(cond), torch.tensor(uncond)]))  # (2, V)
        self.head = TableHead(self.table)
        self.rows = None

    def setup_cache(self, batch_size, max_len=None):
        pass

    def clear_cache(self):
        pass

    def prefill(self, labels):
        self.rows = (labels == self.null_class).long()[:, None]  # (B, 1): the "hidden state"
        return self.rows

    def decode(self, tokens):
        return self.rows.expand(-1, tokens.shape[1])

    def forward_prefix(self, tokens, labels):
        return (labels == self.null_class).long()[:, None].expand(-1, 1 + tokens.shape[1])

    def image_tokens(self, sequence):
        return sequence


class TableHead(CategoricalHead):
    """The categorical head's sampling rule over fixed logits: hidden is a row index into the table."""

    def __init__(self, table):
        nn.Module.__init__(self)
        self.table = table

    def forward(self, hidden):
        return self.table[hidden]  # (..., V)


def chi_square(tokens, probs):
    counts = torch.bincount(tokens.flatten(), minlength=len(probs)).double()
    expected = counts.sum() * probs.double()
    support = expected > 0
    assert counts[~support].sum() == 0, "sampled a token of probability 0"
    return (((counts - expected)[support]) ** 2 / expected[support]).sum().item(), int(support.sum()) - 1


# 99.9% quantiles of chi-square with 1..4 degrees of freedom
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}

COND, UNCOND = [1.0, 0.5, 0.0, -1.0, 2.0], [0.0, 1.0, 0.5, 0.0, 0.0]


@pytest.mark.parametrize(
    "settings, expected",
    [
        (dict(), torch.tensor(COND).softmax(-1)),
        (dict(temperature=2.0), (torch.tensor(COND) / 2).softmax(-1)),
        (dict(top_k=3), torch.tensor([1.0, 0.5, -math.inf, -math.inf, 2.0]).softmax(-1)),
        (
            dict(cfg_scale=2.0),
            (torch.tensor(UNCOND) + 2 * (torch.tensor(COND) - torch.tensor(UNCOND))).softmax(-1),
        ),
    ],
    ids=["plain", "temperature", "top_k", "cfg"],
)
@pytest.mark.parametrize("use_cache", [True, False])
def test_sampling_reproduces_the_model_distribution(settings, expected, use_cache):
    model = FixedLogits(COND, UNCOND)
    labels = torch.zeros(1500, dtype=torch.long)  # 1500 rows x 3 tokens = 4500 draws
    result = sample_ar(model, labels, generator=seeded(11), use_cache=use_cache, **settings)
    statistic, dof = chi_square(result.tokens, expected)
    assert statistic < CHI2_999[dof], f"chi-square {statistic:.1f} with {dof} degrees of freedom"


def test_generate_returns_decoded_images_for_any_registered_sampler():
    from generators import GPT
    from sampling import SAMPLERS, generate
    from tokenizers_vis import TiTok

    torch.manual_seed(0)
    tokenizer = TiTok(16, 8, "tiny", width=16, depth=1, heads=2, num_tokens=4, codebook_size=16).eval()
    gpt = GPT(16, 4, 3, size="tiny", width=16, depth=1, heads=2).eval()
    result = generate(gpt, tokenizer, labels=[0, 1, 2], cfg_scale=2.0, seed=3)
    assert result.images.shape == (3, 3, 16, 16) and result.tokens.data.shape == (3, 4)
    assert torch.equal(result.images, tokenizer.decode(result.tokens))  # the sampled tokens, decoded
    again = generate(gpt, tokenizer, labels=torch.tensor([0, 1, 2]), cfg_scale=2.0, seed=3)
    assert torch.equal(again.tokens.data, result.tokens.data)  # seeded
    assert len(result.pil()) == 3 and result.pil()[0].size == (16, 16)
    jacobi = generate(gpt, tokenizer, labels=[0, 1], sampler="sjd", window=2)
    assert jacobi.stats["forward_passes"] >= 1 and "ar" in SAMPLERS
    with pytest.raises(ValueError, match="sampler.name='nope'; choose one of"):
        generate(gpt, tokenizer, labels=[0], sampler="nope")
