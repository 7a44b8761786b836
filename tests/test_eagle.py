"""The EAGLE drafter (generators/eagle.py), its training module and exact speculative decoding with it."""

import copy

import pytest
import torch
from test_speculative import ROWS, N, chi_square_pvalue, seeded, sequence_probabilities, tiny_gpt

import sampling.engine as engine
import sampling.speculative as speculative
from generators import EagleDrafter
from sampling import sample_speculative
from tokenizers_vis.base import from_pretrained
from training.eagle_module import EagleModule

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def target():
    return tiny_gpt(0, 3.0, grid=(2, 2))  # 4 codes, 2x2 tokens


def drafter_for(target, seed=0):
    torch.manual_seed(seed)
    drafter = EagleDrafter.for_target(target)
    for p in drafter.parameters():  # larger weights than the 0.02 init: drafts that depend on the features
        torch.nn.init.normal_(p, std=0.3)
    return drafter.eval()


@torch.no_grad()
def test_cached_drafting_matches_teacher_forcing(target):
    drafter = drafter_for(target)
    tokens = torch.randint(4, (3, N), generator=seeded(1))
    features = torch.randn(3, N, target.width, generator=seeded(2))
    full = drafter(tokens, features)  # (B, N, D)
    drafter.setup_cache(3)
    steps = [drafter.decode(tokens[:, :2], features[:, :2])]
    drafter.truncate_cache(torch.tensor([1, 2, 2]))  # rows roll back to different pairs
    window = torch.stack([tokens[0, 1:3], tokens[1, 2:4], tokens[2, 2:4]])
    window_features = torch.stack([features[0, 1:3], features[1, 2:4], features[2, 2:4]])
    ragged = drafter.decode(window, window_features)
    assert torch.allclose(steps[0], full[:, :2], atol=1e-5)
    assert torch.allclose(ragged[0], full[0, 1:3], atol=1e-5)
    assert torch.allclose(ragged[1:], full[1:, 2:4], atol=1e-5)


def test_export_round_trip_and_binding(target, tmp_path):
    drafter = drafter_for(target)
    drafter.save_pretrained(tmp_path / "eagle")
    loaded = from_pretrained(tmp_path / "eagle").bind(target)
    tokens, features = torch.randint(4, (2, N)), torch.randn(2, N, target.width)
    with torch.no_grad():
        assert torch.allclose(loaded(tokens, features), drafter(tokens, features))
    assert not any(k.startswith(("embed", "head")) for k in loaded.state_dict())  # the target's, not stored
    other = tiny_gpt(0, 3.0, vocab=8, grid=(2, 2))
    with pytest.raises(ValueError, match="vocab_size=4"):
        loaded.bind(other)
    with pytest.raises(RuntimeError, match="bind"):
        from_pretrained(tmp_path / "eagle")(tokens, features)


SETTINGS = {"plain": dict(), "cfg": dict(cfg_scale=2.0), "temperature_top_k": dict(temperature=0.8, top_k=3)}


@pytest.mark.parametrize("name", SETTINGS)
def test_speculative_decoding_with_eagle_matches_the_target(target, name):
    settings = SETTINGS[name]
    labels = torch.ones(ROWS, dtype=torch.long)
    result = sample_speculative(target, drafter_for(target), labels, gamma=3, generator=seeded(1), **settings)
    assert chi_square_pvalue(result.tokens, sequence_probabilities(target, 1, **settings)) > 1e-3
    stats = result.stats
    assert 0 < stats["acceptance_rate"] < 1 and stats["row_passes_min"] < stats["row_passes_max"]
    assert stats["draft_forward_passes"] == 3 * (stats["forward_passes"] - 1)  # gamma calls per pass


def test_accepting_every_eagle_draft_fails_the_same_test(target, monkeypatch):
    monkeypatch.setattr(engine, "accepts", lambda p_x, q_x, u: torch.ones_like(u, dtype=torch.bool))
    labels = torch.ones(ROWS, dtype=torch.long)
    result = sample_speculative(target, drafter_for(target), labels, gamma=3, generator=seeded(1))
    assert chi_square_pvalue(result.tokens, sequence_probabilities(target, 1)) < 1e-6


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
@torch.no_grad()
def test_drafts_read_the_targets_true_features(cfg_scale, monkeypatch):
    """The first draft of every pass comes from the drafter on the committed tokens' true target features:
    its q equals the teacher-forced drafter's prediction on the committed prefix."""
    target = tiny_gpt(0, 3.0, vocab=8, num_tokens=12, grid=(3, 4))
    drafter = drafter_for(target)
    log = []
    propose = speculative.EagleDraft.propose

    def logged(self, rows, gamma, generator):
        drafts, q = propose(self, rows, gamma, generator)
        log.append((rows.tokens[..., 0].clone(), rows.count.clone(), q[:, 0].clone()))  # one slot each
        return drafts, q

    monkeypatch.setattr(speculative.EagleDraft, "propose", logged)
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    sample_speculative(target, drafter, labels, gamma=3, generator=seeded(4), cfg_scale=cfg_scale)
    monkeypatch.undo()
    checked = 0
    for tokens, count, q in log:
        # rows finish and leave: match the logged rows by their committed prefix
        for row in range(len(count)):
            n = int(count[row])
            prefix = tokens[row : row + 1, :n]
            expected = None
            for label in labels.unique():
                stack = [label[None], torch.tensor([target.null_class])] if cfg_scale != 1 else [label[None]]
                feats = torch.cat([target.forward_prefix(prefix[:, : n - 1], lab) for lab in stack])
                predicted = drafter(torch.cat([prefix] * len(stack)), feats)[:, -1:]  # predicts token n
                guided = engine.GuidedModel(target, label[None], 12, cfg_scale=cfg_scale)
                candidate = guided.probs(predicted, n)[0, 0]
                if torch.allclose(candidate, q[row], atol=1e-5):
                    expected = candidate
            assert expected is not None, (n, row)
            checked += 1
    assert checked > 10


def test_training_moves_the_drafter_towards_the_target(target, tmp_path):
    """A few optimiser steps on samples of the target raise the expected acceptance of its drafts; the
    target's weights stay frozen and out of the drafter's parameters."""
    folder = target.save_pretrained(tmp_path / "target")
    module = EagleModule(str(folder), lr=3e-3, warmup_steps=1)
    labels = torch.arange(256) % 2
    with torch.no_grad():
        tokens = sample_speculative(target, copy.deepcopy(target), labels, generator=seeded(0)).tokens
    before = module.losses(tokens, labels, noise=False)
    optimizer = torch.optim.AdamW(module.drafter.parameters(), lr=3e-3)
    frozen = {k: v.clone() for k, v in module.target.state_dict().items()}
    for _ in range(60):
        optimizer.zero_grad()
        loss = module.losses(tokens, labels, noise=True)["loss"]
        loss.backward()
        optimizer.step()
    after = module.losses(tokens, labels, noise=False)
    assert after["acceptance"] > before["acceptance"] + 0.05 and after["loss"] < before["loss"]
    assert all(torch.equal(v, module.target.state_dict()[k]) for k, v in frozen.items())
    assert all(p.grad is None for p in module.target.parameters())
    assert {id(p) for p in module.drafter.parameters()}.isdisjoint(id(p) for p in module.target.parameters())
