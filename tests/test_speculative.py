"""Speculative sampling and LANTERN (sampling/speculative.py), and scripts/sample.py with every fast sampler.

Distribution tests: a tiny GPT over 4 codes x 4 tokens (256 sequences) whose exact sequence distribution is
enumerated from its own logits (with the same guidance / temperature / top-k), against a few thousand
sequences sampled in one batch (which also exercises rows accepting different numbers of drafts); a
deliberately wrong acceptance rule (accept every draft) must fail the same test.
"""

import copy
import itertools
import json

import pytest
import torch
from scipy.stats import chi2
from torch import nn

import sampling.engine as engine
from generators import GPT
from sampling import (
    filter_logits,
    guided_logits,
    latent_neighbours,
    relaxed_target,
    sample_speculative,
    tokenizer_neighbours,
)
from sampling.engine import Rows
from tokenizers_vis.quantizers import nearest_codes

pytestmark = pytest.mark.usefixtures("one_thread")

V, N, C = 4, 4, 2
ROWS = 4000  # sequences per distribution test, sampled as one batch


def tiny_gpt(seed=0, head_scale=3.0, vocab=V, num_tokens=N, **kwargs) -> GPT:
    """Random weights, peaked but context-dependent distributions (the head is scaled up)."""
    torch.manual_seed(seed)
    model = GPT(vocab, num_tokens, C, size="tiny", width=32, depth=1, heads=2, **kwargs)
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.3)
    model.head.proj.weight.data *= head_scale
    return model.eval()


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def sequence_probabilities(model, label=1, cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0):
    """Probability of each of the V^N sequences (in itertools.product order) under the model's own
    guided, filtered next-token distributions, by enumeration."""
    vocab, num_tokens = model.config["vocab_size"], model.num_tokens
    sequences = torch.tensor(list(itertools.product(range(vocab), repeat=num_tokens)))  # (V^N, N)
    labels = torch.full((len(sequences),), label)
    logits = model.logits(model.forward_prefix(sequences[:, :-1], labels)).float()  # (V^N, N, V)
    if cfg_scale != 1.0:
        null = torch.full_like(labels, model.null_class)
        uncond = model.logits(model.forward_prefix(sequences[:, :-1], null)).float()
        logits = guided_logits(logits, uncond, cfg_scale)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    return probs.gather(-1, sequences[..., None]).squeeze(-1).prod(-1)


def chi_square_pvalue(tokens, probabilities, vocab=V):
    """Pearson's test of sampled sequences (B, N) against their exact probabilities; cells expecting
    fewer than 5 samples are pooled into one. A sequence of probability 0 is an immediate failure."""
    num_tokens = tokens.shape[1]
    index = (tokens * vocab ** torch.arange(num_tokens - 1, -1, -1)).sum(-1)
    counts = torch.bincount(index, minlength=vocab**num_tokens).double()
    expected = probabilities.double() * len(tokens)
    assert counts[expected == 0].sum() == 0, "sampled a sequence of probability 0"
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    cells = expected > 0
    statistic = ((observed - expected)[cells] ** 2 / expected[cells]).sum().item()
    return chi2.sf(statistic, int(cells.sum()) - 1)


def record_rollbacks(monkeypatch, models):
    """Log, after every cache truncation of each model, its per-row lengths and keys/values, with the
    running rows (output ids, committed tokens) that the sampler's last host synchronisation left."""
    log = []
    advance = Rows.advance

    def logged_advance(self, passes):
        kept = advance(self, passes)
        log.append(("rows", list(self.ids), self.tokens[..., 0].clone()))  # one slot per position
        return kept

    monkeypatch.setattr(Rows, "advance", logged_advance)
    for name, model in models.items():
        truncate = model.truncate_cache

        def logged_truncate(lengths, model=model, truncate=truncate, name=name):
            truncate(lengths)
            cache = model.cache
            log.append((name, cache.lengths.clone(), cache.k.clone(), cache.v.clone()))

        monkeypatch.setattr(model, "truncate_cache", logged_truncate)
    return log


@torch.no_grad()
def assert_rollbacks_equal_fresh_prefills(log, models, labels, guided=False):
    """Every logged row's cache, up to its own length, equals a fresh prefill + decode of that row's
    committed tokens (rows at different lengths were rolled back to different points)."""
    ids = tokens = None
    checked, lengths_seen = 0, set()
    for entry in log:
        if entry[0] == "rows":
            _, ids, tokens = entry
            continue
        name, lengths, k, v = entry
        model = models[name]
        halves = 2 if guided else 1
        for half in range(halves):
            for row, out in enumerate(ids):
                index = half * len(ids) + row
                length = int(lengths[index])
                label = labels[out : out + 1] if half == 0 else torch.full((1,), model.null_class)
                model.setup_cache(1)
                model.prefill(label)
                if length > 1:
                    model.decode(tokens[row : row + 1, : length - 1])
                assert torch.allclose(model.cache.k[:, 0, :, :length], k[:, index, :, :length], atol=1e-5)
                assert torch.allclose(model.cache.v[:, 0, :, :length], v[:, index, :, :length], atol=1e-5)
                checked += 1
        lengths_seen.add(tuple(lengths.tolist()))
    for model in models.values():
        model.clear_cache()
    assert checked and any(len(set(lengths)) > 1 for lengths in lengths_seen), "no ragged rollback was logged"


@pytest.fixture(scope="module")
def models():
    """Target and a different, less peaked draft, both over a 2x2 grid (2D RoPE)."""
    return tiny_gpt(0, 3.0, grid=(2, 2)), tiny_gpt(1, 1.5, grid=(2, 2))


# ---- latent neighbours


def test_latent_neighbours_are_nearest_first_and_exclude_the_code():
    line = torch.tensor([[0.0], [1.0], [3.0], [7.0], [8.0]])
    assert latent_neighbours(line, 2).tolist() == [[1, 2], [0, 2], [1, 0], [4, 2], [3, 2]]
    chunked = nearest_codes(line, 4, include_self=False, chunk=2)  # the function latent_neighbours calls
    assert chunked.tolist() == latent_neighbours(line, 4).tolist()
    angles = torch.tensor([0.0, 0.1, 1.5, 3.0])
    circle = torch.stack([angles.cos(), angles.sin()], -1) * torch.tensor([[1.0], [9.0], [0.1], [5.0]])
    assert latent_neighbours(circle, 1, metric="cosine").flatten().tolist() == [1, 0, 1, 2]  # scale-free
    vectors = torch.randn(50, 3, generator=seeded())
    near = latent_neighbours(vectors, 49)
    assert (near != torch.arange(50)[:, None]).all()
    assert (near.sort(-1).values == torch.tensor([[j for j in range(50) if j != i] for i in range(50)])).all()
    with pytest.raises(ValueError):
        latent_neighbours(line, 5)
    with pytest.raises(ValueError, match="metric"):
        latent_neighbours(line, 1, metric="manhattan")


def test_tokenizer_neighbours_are_cached_beside_the_export(tiny_exports):
    tokenizer = tiny_exports / "tokenizer"
    first = tokenizer_neighbours(tokenizer, 1000)  # capped at V - 1 = 15
    path = tokenizer / "neighbours_k15_euclidean.safetensors"
    assert first.shape == (16, 15) and path.is_file()
    stamp = path.stat().st_mtime_ns
    assert torch.equal(tokenizer_neighbours(tokenizer, 15), first) and path.stat().st_mtime_ns == stamp
    from tokenizers_vis import from_pretrained

    model = from_pretrained(tokenizer)
    assert torch.equal(first, latent_neighbours(model.code_vectors(), 15))
    with torch.no_grad():  # a re-exported tokenizer with other codes: the cached file is stale
        model.quantizer.codebook.weight.copy_(torch.randn(16, 4, generator=seeded(7)))
    fresh = tokenizer_neighbours(tokenizer, 15, tokenizer=model)
    assert torch.equal(fresh, latent_neighbours(model.code_vectors(), 15)) and not torch.equal(fresh, first)
    assert tokenizer_neighbours(tokenizer, 3, "cosine").shape == (16, 3)


# ---- LANTERN's relaxed target


def random_case(seed, batch=200, vocab=12, k=6, zeros=False):
    g = seeded(seed)
    logits = 3 * torch.randn(batch, vocab, generator=g)
    if zeros:  # filtered tokens (top-k) have probability 0
        logits = filter_logits(logits, top_k=5)
    p = logits.softmax(-1)
    x = torch.randint(vocab, (batch,), generator=g)
    others = torch.stack([torch.randperm(vocab - 1, generator=g) for _ in range(vocab)])[:, :k]  # (V, k)
    neighbours = others + (others >= torch.arange(vocab)[:, None]).long()  # skip the code itself
    return p, x, neighbours


def lantern_by_hand(p, x, neighbours, delta=0.0, lam=None):
    """The rule written out one row at a time: walk B_k(x) nearest first while the moved mass fits."""
    out = p.clone()
    for row in range(len(p)):
        moved, limit = 0.0, delta if lam is None else (lam - 1) * p[row, x[row]].item()
        for y in neighbours[x[row]].tolist():
            if moved + p[row, y].item() > limit + 1e-7:
                break
            moved += p[row, y].item()
            out[row, y] = 0
        out[row, x[row]] += moved
    return out


@pytest.mark.parametrize("zeros", [False, True])
def test_relaxed_target_stays_within_delta(zeros):
    for seed in range(5):
        p, x, neighbours = random_case(seed, zeros=zeros)
        p_x = p.gather(-1, x[:, None]).squeeze(-1)
        for delta in (0.0, 0.01, 0.1, 0.3):
            relaxed = relaxed_target(p, x, neighbours, delta)
            tv = 0.5 * (relaxed - p).abs().sum(-1)
            assert (relaxed >= 0).all() and torch.allclose(relaxed.sum(-1), torch.ones(len(p)))
            assert (tv <= delta + 1e-6).all()
            moved = relaxed.gather(-1, x[:, None]).squeeze(-1) - p_x
            assert torch.allclose(moved, tv, atol=1e-6)  # all the moved mass lands on x
            assert torch.allclose(relaxed, lantern_by_hand(p, x, neighbours, delta=delta), atol=1e-6)
        assert torch.equal(relaxed_target(p, x, neighbours, 0.0), p)
        for lam in (1.0, 2.0, 5.0):  # LANTERN++
            relaxed = relaxed_target(p, x, neighbours, lam=lam)
            tv = 0.5 * (relaxed - p).abs().sum(-1)
            assert (tv <= (lam - 1) * p_x + 1e-6).all() and torch.allclose(
                relaxed.sum(-1), torch.ones(len(p))
            )
            assert torch.allclose(relaxed, lantern_by_hand(p, x, neighbours, lam=lam), atol=1e-6)
        assert torch.equal(relaxed_target(p, x, neighbours, lam=1.0), p)


def test_relaxed_target_worked_example():
    p = torch.tensor([0.4, 0.05, 0.1, 0.2, 0.25])
    neighbours = torch.tensor([[1, 2, 3, 4], [0, 2, 3, 4], [1, 0, 3, 4], [4, 2, 1, 0], [3, 2, 1, 0]])
    # x = 0: neighbours 1 (0.05), 2 (0.1, cumulative 0.15), 3 (cumulative 0.35)
    assert torch.allclose(
        relaxed_target(p, torch.tensor(0), neighbours, 0.2), torch.tensor([0.55, 0, 0, 0.2, 0.25])
    )
    assert torch.allclose(
        relaxed_target(p, torch.tensor(0), neighbours, 0.1), torch.tensor([0.45, 0, 0.1, 0.2, 0.25])
    )
    # LANTERN++ with lambda 2: moved mass <= p(x) = 0.05 for x = 1: neighbour 0 (0.4) is already too much
    assert torch.equal(relaxed_target(p, torch.tensor(1), neighbours, lam=2.0), p)
    # x = 4: bound 0.25; neighbour 3 (0.2) fits, then 2 (cumulative 0.3) does not
    assert torch.allclose(
        relaxed_target(p, torch.tensor(4), neighbours, lam=2.0), torch.tensor([0.4, 0.05, 0.1, 0, 0.45])
    )


# ---- exact speculative sampling


SETTINGS = {
    "plain": dict(),
    "cfg": dict(cfg_scale=2.0),
    "temperature_top_k": dict(temperature=0.8, top_k=3),
}


@pytest.mark.parametrize("name", SETTINGS)
def test_speculative_sampling_matches_the_target_distribution(models, name):
    target, draft = models
    settings = SETTINGS[name]
    labels = torch.ones(ROWS, dtype=torch.long)
    result = sample_speculative(target, draft, labels, gamma=3, generator=seeded(1), **settings)
    assert chi_square_pvalue(result.tokens, sequence_probabilities(target, 1, **settings)) > 1e-3
    stats = result.stats
    assert 0 < stats["acceptance_rate"] < 1
    assert stats["row_passes_min"] < stats["row_passes_max"]  # rows accepted different lengths
    assert stats["model_batch"] == ROWS * (2 if "cfg_scale" in settings else 1)
    assert stats["forward_passes"] == stats["row_passes_max"] and stats["draft_forward_passes"] >= 1
    assert stats["tokens_per_pass"] == N / stats["passes_per_row"]


def test_ragged_batches_match_each_rows_distribution(models):
    """A draft that agrees with the target on class 0 only: class-0 rows accept every draft and finish in
    two passes while class-1 rows reject most, in the same batch; each class still follows its own target
    distribution."""
    target, _ = models
    draft = copy.deepcopy(target)
    with torch.no_grad():
        draft.class_embed.weight[1] += 2.0 * torch.randn(
            draft.class_embed.weight.shape[1], generator=seeded(9)
        )
    labels = torch.tensor([0, 1]).repeat(ROWS)
    result = sample_speculative(target, draft, labels, gamma=3, generator=seeded(2))
    for label in (0, 1):
        rows = result.tokens[labels == label]
        assert chi_square_pvalue(rows, sequence_probabilities(target, label)) > 1e-3, label
    assert result.stats["row_passes_min"] == 2 and result.stats["row_passes_max"] >= 4
    assert result.stats["forward_passes"] == result.stats["row_passes_max"]


def test_accepting_every_draft_fails_the_same_test(models, monkeypatch):
    target, draft = models
    monkeypatch.setattr(engine, "accepts", lambda p_x, q_x, u: torch.ones_like(u, dtype=torch.bool))
    result = sample_speculative(
        target, draft, torch.ones(ROWS, dtype=torch.long), gamma=3, generator=seeded(1)
    )
    assert result.stats["acceptance_rate"] == 1.0
    assert chi_square_pvalue(result.tokens, sequence_probabilities(target, 1)) < 1e-6


def test_the_draft_itself_fails_the_test(models):
    """Sanity check of the test's power: the draft's own distribution is far from the target's."""
    target, draft = models
    labels = torch.ones(ROWS, dtype=torch.long)
    result = sample_speculative(draft, copy.deepcopy(draft), labels, generator=seeded(1))
    assert result.stats["acceptance_rate"] > 0.99  # a model drafting for itself: p = q
    assert chi_square_pvalue(result.tokens, sequence_probabilities(target, 1)) < 1e-6


def test_lantern_with_delta_zero_is_exact_speculative(models):
    target, draft = models
    labels = torch.tensor([0, 1] * 200)
    neighbours = latent_neighbours(torch.randn(V, 3, generator=seeded(2)), 3)
    exact = sample_speculative(target, draft, labels, gamma=3, generator=seeded(4), cfg_scale=1.5)
    lantern = sample_speculative(
        target,
        draft,
        labels,
        gamma=3,
        generator=seeded(4),
        cfg_scale=1.5,
        acceptance="lantern",
        neighbours=neighbours,
    )
    assert torch.equal(exact.tokens, lantern.tokens)
    assert exact.stats["acceptance_rate"] == lantern.stats["acceptance_rate"]
    plus = sample_speculative(
        target,
        draft,
        labels,
        gamma=3,
        generator=seeded(4),
        cfg_scale=1.5,
        acceptance="lantern",
        lantern_lambda=1.0,
        neighbours=neighbours,
    )
    assert torch.equal(exact.tokens, plus.tokens)
    rates = {}
    for name, relaxation in {
        "delta": dict(lantern_delta=0.5),
        "all": dict(lantern_delta=1.0),
        "++": dict(lantern_lambda=3.0),
    }.items():
        result = sample_speculative(
            target,
            draft,
            labels,
            gamma=3,
            generator=seeded(4),
            cfg_scale=1.5,
            acceptance="lantern",
            neighbours=neighbours,
            **relaxation,
        )
        rates[name] = result.stats["acceptance_rate"]
    assert (
        rates["delta"] > exact.stats["acceptance_rate"] and rates["++"] > exact.stats["acceptance_rate"] + 0.1
    )
    assert rates["all"] > 0.95  # delta = 1 moves every neighbour's mass: p~(x) = 1 (V = 4, k = 3)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_cache_rollback_equals_a_fresh_prefill(models, monkeypatch, cfg_scale):
    target, draft = copy.deepcopy(models[0]), copy.deepcopy(models[1])
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1] * 4)
    log = record_rollbacks(monkeypatch, {"target": target, "draft": draft})
    sample_speculative(target, draft, labels, gamma=3, generator=seeded(3), cfg_scale=cfg_scale)
    monkeypatch.undo()
    guided = cfg_scale != 1.0
    assert_rollbacks_equal_fresh_prefills(log, {"target": target, "draft": draft}, labels, guided)


def test_rows_finish_with_exactly_the_requested_tokens():
    target = tiny_gpt(0, 2.0, vocab=8, num_tokens=12)
    draft = copy.deepcopy(target)  # a good draft: the target with a perturbed head
    draft.head.proj.weight.data += 0.3 * torch.randn(draft.head.proj.weight.shape, generator=seeded(6))
    target.train()
    labels = torch.arange(64) % C
    result = sample_speculative(target, draft, labels, num_tokens=10, gamma=3, generator=seeded(5))
    assert result.tokens.shape == (64, 10) and ((result.tokens >= 0) & (result.tokens < 8)).all()
    assert result.stats["row_passes_min"] < result.stats["row_passes_max"]  # rows advanced independently
    assert result.stats["forward_passes"] < 10  # fewer target passes than tokens
    assert target.training and not draft.training  # modes restored
    assert target.cache is None and draft.cache is None
    single = sample_speculative(target, draft, labels[:1], num_tokens=1, generator=seeded(5))
    assert single.tokens.shape == (1, 1) and single.stats["forward_passes"] == 1


def test_bad_arguments_are_errors(models):
    target, draft = models
    labels = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="acceptance"):
        sample_speculative(target, draft, labels, acceptance="greedy")
    with pytest.raises(ValueError, match="neighbours"):
        sample_speculative(target, draft, labels, acceptance="lantern", lantern_delta=0.1)
    with pytest.raises(ValueError, match="vocab_size"):
        sample_speculative(target, tiny_gpt(vocab=8), labels)
    with pytest.raises(ValueError, match="another module"):
        sample_speculative(target, target, labels)
    with pytest.raises(ValueError, match="gamma"):
        sample_speculative(target, draft, labels, gamma=0)
    with pytest.raises(ValueError, match="num_tokens"):
        sample_speculative(target, draft, labels, num_tokens=N + 1)


# ---- scripts/sample.py with every fast sampler


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory):
    """Exported tiny tokenizer (16 codes, 4 tokens, 16x16 images), generator and draft, untrained."""
    from tokenizers_vis.titok import TiTok

    root = tmp_path_factory.mktemp("exports")
    torch.manual_seed(0)
    tokenizer = TiTok(
        16, 8, size="tiny", width=32, depth=1, heads=2, num_tokens=4, codebook_size=16, code_dim=4
    )
    tokenizer.save_pretrained(root / "tokenizer")
    tiny_gpt(0, 2.0, vocab=16).save_pretrained(root / "generator")
    tiny_gpt(1, 1.0, vocab=16).save_pretrained(root / "draft")
    return root


@pytest.mark.parametrize("sampler", ["speculative", "lantern", "sjd", "gsd"])
def test_sample_script_runs_every_fast_sampler(tiny_exports, tmp_path, sampler):
    from training.config import compose_config
    from training.sample_folder import run

    overrides = [
        f"generator_path={tiny_exports / 'generator'}",
        f"tokenizer_path={tiny_exports / 'tokenizer'}",
        f"out={tmp_path / 'samples'}",
        "num_samples=6",
        "batch_size=3",
        f"sampler={sampler}",
        "sampler.cfg_scale=2.0",
    ]
    if sampler in ("speculative", "lantern"):
        overrides.append(f"sampler.drafter_path={tiny_exports / 'draft'}")
    if sampler in ("sjd", "gsd"):
        overrides.append("sampler.window=2")
    summary = run(compose_config(overrides, config_name="sample"))
    assert len(list((tmp_path / "samples" / "images").glob("*.png"))) == 6
    written = json.loads((tmp_path / "samples" / "stats.json").read_text())
    assert written["sampler"] == sampler and written["sampler_stats"] == summary["sampler_stats"]
    stats = written["sampler_stats"]
    assert 0 <= stats["acceptance_rate"] <= 1 and stats["model_batch"] == 6
    assert stats["forward_passes"] <= N and stats["tokens_per_pass"] >= 1
    assert ("draft_forward_passes" in stats) == (sampler in ("speculative", "lantern"))
    if sampler in ("lantern", "gsd"):
        assert list((tiny_exports / "tokenizer").glob("neighbours_k*_euclidean.safetensors"))


def test_sample_script_names_a_missing_draft(tiny_exports, tmp_path):
    from training.config import compose_config
    from training.sample_folder import run

    overrides = [
        f"generator_path={tiny_exports / 'generator'}",
        f"tokenizer_path={tiny_exports / 'tokenizer'}",
        f"out={tmp_path / 'samples'}",
        "sampler=speculative",
    ]
    with pytest.raises(FileNotFoundError, match="sampler.drafter_path"):
        run(compose_config(overrides, config_name="sample"))
