import pytest
import torch
from conftest import TINY_SIZES, TINY_TRAINER

import train
from generators import GPT
from generators.binary_heads import (
    BernoulliHead,
    BitEmbedding,
    GroupedBitEmbedding,
    GroupedBitHead,
    bits_to_groups,
    groups_to_bits,
)
from generators.heads import DEFAULT_HEADS, make_head
from sampling.ar import sample_ar
from sampling.common import filter_logits, sample_logits
from scripts.extract_codes import extract
from tokenizers_vis import Tokens, from_pretrained
from tokenizers_vis.binary import BinaryTiTok
from tokenizers_vis.quantizers import BinaryQuantizer
from training.config import compose_config
from training.sample_folder import run as sample_run

pytestmark = pytest.mark.usefixtures("one_thread")  # shared CPUs: one thread is much faster

K, N = 8, 6
TINY = dict(image_size=16, patch_size=4, size="tiny", width=32, depth=1, heads=2, num_tokens=N, num_bits=K)


def tiny(**kwargs) -> BinaryTiTok:
    torch.manual_seed(0)
    return BinaryTiTok(**{**TINY, **kwargs})


def images(batch=4, seed=1):
    return torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---- quantiser


def test_training_mode_samples_bernoulli_bits():
    quantizer = BinaryQuantizer(K).train()
    z = torch.zeros(4, 64, K)  # p = 0.5 everywhere
    first, second = quantizer(z), quantizer(z)
    assert first.codes.dtype == torch.long and set(first.codes.unique().tolist()) == {0, 1}
    assert not torch.equal(first.codes, second.codes)  # stochastic
    assert abs(first.codes.float().mean().item() - 0.5) < 0.05
    assert torch.equal(first.quantized.detach(), first.codes.float())
    assert torch.allclose(first.probs, torch.full_like(z, 0.5))


def test_eval_mode_thresholds_at_one_half():
    quantizer = BinaryQuantizer(K, temperature=0.5).eval()
    z = torch.randn(4, N, K)
    out, again = quantizer(z), quantizer(z)
    assert torch.equal(out.codes, again.codes)  # deterministic
    assert torch.equal(out.codes, (torch.sigmoid(z / 0.5) > 0.5).long())
    assert torch.equal(out.codes, (z > 0).long())


@pytest.mark.parametrize("deterministic", [False, True])
def test_straight_through_gradient_is_that_of_the_probabilities(deterministic):
    quantizer = BinaryQuantizer(K, temperature=2.0, deterministic=deterministic).train()
    z = torch.randn(3, N, K, requires_grad=True)
    out = quantizer(z)
    if deterministic:  # thresholds in training too
        assert torch.equal(out.codes, (z > 0).long())
        assert torch.equal(out.codes, quantizer(z).codes)
    upstream = torch.randn(3, N, K)
    (out.quantized * upstream).sum().backward()
    p = torch.sigmoid(z.detach() / 2.0)
    assert torch.allclose(z.grad, upstream * p * (1 - p) / 2.0, atol=1e-6)


def test_stats_and_optional_entropy_term():
    z = torch.randn(4, N, K)
    z[..., 0] = -20.0  # channel 0 is always off
    out = BinaryQuantizer(K).eval()(z)
    assert out.losses == {}  # entropy_weight 0 by default: no extra loss
    assert out.stats["usage"] <= (K - 1) / K and 0 < out.stats["bit_entropy"] < 1
    assert 1 <= out.stats["perplexity"] <= 2
    z.requires_grad_(True)
    out = BinaryQuantizer(K, entropy_weight=0.1).train()(z)
    assert out.losses["entropy"].shape == () and out.losses["entropy"] >= -0.1 * 0.6932
    out.losses["entropy"].backward()
    assert z.grad.abs().sum() > 0


# ---- tokenizer


def test_tokens_shapes_spec_and_prefix_decoding():
    model = tiny().eval()
    x = images()
    tokens = model.encode(x)
    assert tokens.kind == "binary" and tokens.data.shape == (4, N, K) and tokens.data.dtype == torch.long
    spec = model.token_spec
    assert (spec.kind, spec.num_tokens, spec.vocab_size, spec.token_dim) == ("binary", N, 2, K)
    with torch.no_grad():
        reconstructions, losses, stats = model(x)
        assert torch.equal(stats["codes"], tokens.data)
        assert torch.allclose(model.decode(tokens), reconstructions, atol=1e-5)
        assert model.decode(tokens, num_tokens=2).shape == x.shape
        flipped = Tokens("binary", 1 - tokens.data)
        assert not torch.allclose(model.decode(flipped), reconstructions)
    with pytest.raises(NotImplementedError, match="no codebook"):
        model.code_vectors()
    with pytest.raises(ValueError, match="decodes bits"):
        model.decode(Tokens("binary", tokens.data[..., :3]))
    assert (
        BinaryTiTok.from_preset("B-128", width=32, heads=4, depth=1, image_size=16, patch_size=4).config[
            "num_tokens"
        ]
        == 128
    )


def test_gradient_reaches_the_encoder_through_the_bits():
    model = tiny().train()
    reconstructions, losses, _ = model(images())
    (reconstructions - images()).pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} gets no gradient"


def test_export_round_trip(tmp_path):
    model = tiny(temperature=0.7).eval()
    model.save_pretrained(tmp_path / "export")
    loaded = from_pretrained(tmp_path / "export")
    assert type(loaded) is BinaryTiTok and loaded.config == model.config
    assert loaded.token_spec == model.token_spec
    x = images(2)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x).data, model.encode(x).data)
        assert torch.equal(loaded.reconstruct(x), model.reconstruct(x))


def test_tiny_tokenizer_overfits_a_batch():
    model = tiny().train()
    low = torch.rand(8, 3, 4, 4, generator=torch.Generator().manual_seed(5)) * 2 - 1
    x = torch.nn.functional.interpolate(low, size=16, mode="bilinear")  # smooth images: learnable quickly
    mean_predictor = (x - x.mean(0, keepdim=True)).pow(2).mean().item()  # what a decoder ignoring bits gets
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def eval_loss():
        model.eval()
        with torch.no_grad():
            loss = (model(x)[0] - x).pow(2).mean().item()
        model.train()
        return loss

    history = [eval_loss()]
    for step in range(100):
        reconstructions, losses, stats = model(x)
        loss = (reconstructions - x).pow(2).mean() + sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 0:
            first_prob_entropy = stats["prob_entropy"]
        if step in (29, 99):
            history.append(eval_loss())
    assert history[1] < 0.7 * history[0]  # 30 steps: the loss goes down
    assert history[2] < 0.85 * mean_predictor  # 100 steps: the bits carry information about each image
    assert stats["prob_entropy"] < 0.8 * first_prob_entropy  # the Bernoulli noise makes the bits confident


# ---- heads


def test_bits_groups_round_trip():
    bits = torch.randint(0, 2, (3, 5, 12))
    for b in (1, 2, 3, 4, 6, 12):
        groups = bits_to_groups(bits, b)
        assert groups.shape == (3, 5, 12 // b) and 0 <= groups.min() and groups.max() < 2**b
        assert torch.equal(groups_to_bits(groups, b), bits)
    assert bits_to_groups(torch.tensor([1, 0, 1, 1]), 2).tolist() == [1, 3]  # first bit least significant
    all_values = torch.arange(256)
    assert torch.equal(bits_to_groups(groups_to_bits(all_values[:, None], 8), 8)[:, 0], all_values)


def test_bernoulli_head_shapes_and_loss():
    assert DEFAULT_HEADS["binary"] == "bernoulli"
    assert isinstance(make_head("binary", 16, 2, K), BernoulliHead)
    head, embed = BernoulliHead(16, 2, K), BitEmbedding(2, 16, K)
    assert head.token_shape == (K,)
    targets = torch.randint(0, 2, (2, 5, K))
    assert embed(targets).shape == (2, 5, 16)
    hidden = torch.randn(2, 5, 16)
    loss = head.loss(hidden, targets)
    logits = head(hidden)
    expected = -(targets * logits.sigmoid().log() + (1 - targets) * (1 - logits.sigmoid()).log())
    assert torch.allclose(loss, expected.sum(-1).mean(), atol=1e-5)  # nats per token
    with torch.no_grad():
        head.proj.weight.zero_()
    assert torch.allclose(head.loss(hidden, targets), torch.tensor(K * 0.693147), atol=1e-4)
    with pytest.raises(ValueError, match="vocab_size must be 2"):
        BernoulliHead(16, 4, K)


def test_bernoulli_head_guidance_and_temperature():
    torch.manual_seed(0)
    head = BernoulliHead(16, 2, K)
    cond, uncond = torch.randn(3, 16), torch.randn(3, 16)

    def draw(*args, **kwargs):
        return head.sample(*args, generator=torch.Generator().manual_seed(7), **kwargs)

    bits = draw(cond, uncond, 3.0, 0.5)
    assert bits.shape == (3, K) and set(bits.unique().tolist()) <= {0, 1}
    logits = head(uncond) + 3.0 * (head(cond) - head(uncond))
    noise = torch.rand(3, K, generator=torch.Generator().manual_seed(7))
    assert torch.equal(bits, (noise < torch.sigmoid(logits / 0.5)).long())
    assert torch.equal(draw(cond, uncond, 1.0), draw(cond))  # scale 1 is conditional sampling
    assert torch.equal(draw(cond, top_k=1, top_p=0.1), draw(cond))  # ignored


def test_grouped_head_shapes_loss_and_sampling():
    head, embed = GroupedBitHead(16, 2, K, group_bits=4), GroupedBitEmbedding(2, 16, K, group_bits=4)
    assert head.token_shape == (K,) and head(torch.randn(3, 16)).shape == (3, 2, 16)
    targets = torch.randint(0, 2, (2, 5, K))
    assert embed(targets).shape == (2, 5, 16)
    # The embedding is the sum of one table per group.
    groups = bits_to_groups(targets, 4)
    table = embed.table.weight
    assert torch.allclose(embed(targets), table[groups[..., 0]] + table[16 + groups[..., 1]])
    hidden = torch.randn(2, 5, 16)
    loss = head.loss(hidden, targets)
    assert loss.shape == ()
    logits = head(hidden)  # (2, 5, 2, 16)
    expected = -logits.log_softmax(-1).gather(-1, groups[..., None]).squeeze(-1).sum(-1).mean()
    assert torch.allclose(loss, expected, atol=1e-5)
    cond, uncond = torch.randn(3, 16), torch.randn(3, 16)
    bits = head.sample(cond, uncond, 2.0, 0.8, 5, 0.9, torch.Generator().manual_seed(1))
    guided = head(uncond) + 2.0 * (head(cond) - head(uncond))
    draws = sample_logits(filter_logits(guided, 0.8, 5, 0.9), torch.Generator().manual_seed(1))
    assert torch.equal(bits, groups_to_bits(draws, 4)) and bits.shape == (3, K)
    same = [head.sample(cond, u, 1.0, generator=torch.Generator().manual_seed(2)) for u in (uncond, None)]
    assert torch.equal(*same)
    with pytest.raises(ValueError, match="group_bits=3 must divide token_dim=8"):
        GroupedBitHead(16, 2, K, group_bits=3)


# ---- a tiny GPT with each head


@pytest.mark.parametrize(("head", "options"), [("bernoulli", {}), ("grouped_bits", {"group_bits": 4})])
def test_gpt_with_binary_heads_trains_samples_and_exports(head, options, tmp_path):
    torch.manual_seed(0)
    model = GPT(
        vocab_size=2,
        num_tokens=N,
        num_classes=3,
        size="tiny",
        width=32,
        depth=1,
        heads=2,
        token_kind="binary",
        token_dim=K,
        head=head,
        head_options=options,
    )
    tokens, labels = torch.randint(0, 2, (4, N, K)), torch.tensor([0, 1, 2, 0])
    loss = model.loss(tokens, labels)
    loss.backward()
    assert loss.shape == () and loss.item() > 0
    assert all(p.grad is not None for p in model.parameters())  # embedding, backbone and head

    def run(**kwargs):
        return sample_ar(model, labels, generator=torch.Generator().manual_seed(3), **kwargs).tokens

    sampled = run(cfg_scale=3.0, temperature=0.9)
    assert sampled.shape == (4, N, K) and set(sampled.unique().tolist()) <= {0, 1}
    assert torch.equal(run(), run(use_cache=False))  # the KV cache path embeds bits like the full pass
    assert torch.equal(run(cfg_scale=3.0), run(cfg_scale=3.0, use_cache=False))
    assert torch.equal(run(cfg_scale=1.0), run())

    model.save_pretrained(tmp_path / "gpt")
    loaded = from_pretrained(tmp_path / "gpt")
    assert type(loaded.head) is type(model.head)
    with torch.no_grad():
        assert torch.equal(loaded.eval().loss(tokens, labels), model.eval().loss(tokens, labels))


# ---- end to end: stage 1 through train.py, codes, stage 2 on binary tokens, samples


def test_quickstarts_train_extract_and_sample(tmp_path):
    sizes = [o for o in TINY_SIZES if not o.startswith("tokenizer.codebook_size")]  # no codebook here
    stage1 = compose_config(
        ["+experiment=binary_quickstart", *sizes, "tokenizer.num_tokens=4", "tokenizer.num_bits=6"]
        + [f"paths.run_dir={tmp_path / 'tok'}", *TINY_TRAINER]
    )
    metrics = train.run(stage1)
    assert metrics["steps"] == 4 and 1 <= metrics["perplexity"] <= 2  # pooled 0/1 histogram
    tokenizer_path = tmp_path / "tok" / "export"
    assert type(from_pretrained(tokenizer_path)) is BinaryTiTok
    codes = tmp_path / "codes"
    extract(
        compose_config(
            [f"tokenizer_path={tokenizer_path}", f"out={codes}", "num_samples=48", "batch_size=24"],
            config_name="extract_codes",
        )
    )
    stage2 = compose_config(
        [
            "+experiment=gpt_binary_quickstart",
            f"data.codes_dir={codes}",
            f"module.tokenizer_path={tokenizer_path}",
        ]
        + ["data.batch_size=8", "generator.width=32", "generator.depth=1", "generator.heads=2"]
        + ["generator.num_tokens=4", "generator.token_dim=6", "generator.head=grouped_bits"]
        + ["+generator.head_options.group_bits=3", "module.warmup_steps=2", "module.grid_classes=2"]
        + ["module.grid_samples_per_class=2", f"paths.run_dir={tmp_path / 'gpt'}", *TINY_TRAINER]
    )
    assert train.run(stage2)["steps"] == 4
    samples = compose_config(
        [f"generator_path={tmp_path / 'gpt' / 'export'}", f"tokenizer_path={tokenizer_path}"]
        + [f"out={tmp_path / 'samples'}", "num_samples=4", "batch_size=4"],
        config_name="sample",
    )
    summary = sample_run(samples)
    assert summary["num_samples"] == 4 and (tmp_path / "samples" / "images" / "000003.png").is_file()
