import json
import math

import pytest
import torch
from conftest import TINY_SIZES, TINY_TRAINER

import train
from generators import GPT
from generators.dimwise_head import DimwiseEmbedding, DimwiseHead, channel_permutation
from generators.heads import DEFAULT_HEADS, make_embedding, make_head
from sampling.ar import sample_ar
from scripts.extract_codes import extract
from scripts.fit_tokenbridge import fit as fit_script
from tokenizers_vis import from_pretrained
from tokenizers_vis.tokenbridge import DimwiseGaussianQuantizer, TokenBridge, gaussian_bins
from training.config import compose_config
from training.sample_folder import run as sample_run

pytestmark = pytest.mark.usefixtures("one_thread")  # shared CPUs: one thread is much faster

C, N, V = 4, 6, 16  # channels, 1D tokens, bins (4 bits) of the tiny models
TINY_1D = dict(
    image_size=16, patch_size=4, encoder="titok", size="tiny", width=32, depth=1, heads=2, num_tokens=N
)
TINY_CONV = dict(image_size=16, patch_size=4, encoder="conv", width=16, depth=1, num_tokens=None)
HEAD = dict(channel_width=16, channel_depth=2, channel_heads=2)


def tiny(variant="titok", **kwargs) -> TokenBridge:
    torch.manual_seed(0)
    base = TINY_1D if variant == "titok" else TINY_CONV
    return TokenBridge(**{**base, "latent_channels": C, "bits": 4, **kwargs})


def images(batch=4, seed=1):
    return torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def standard_quantizer(bits: int, channels: int = 1) -> DimwiseGaussianQuantizer:
    quantizer = DimwiseGaussianQuantizer(channels, bits)
    quantizer.set_statistics(torch.zeros(channels), torch.ones(channels))  # latent units = normalised units
    return quantizer


# ---- the Gaussian bins


def test_bins_are_equiprobable_under_a_standard_normal():
    bits = 6
    normals = torch.randn(200_000, 1, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(standard_quantizer(bits).quantize(normals).flatten(), minlength=2**bits) / 200_000
    assert freq.shape == (64,)
    # binomial std of one bin's frequency: sqrt(p (1 - p) / n) = 2.8e-4; 6 std
    assert (freq - 1 / 64).abs().max() < 6 * math.sqrt(1 / 64 * 63 / 64 / 200_000)


def test_bin_values_lie_inside_their_bins_and_are_truncated_normal_means():
    edges, values = gaussian_bins(6)
    assert edges.shape == (65,) and values.shape == (64,)
    assert edges[0] == -3 and edges[-1] == 3 and (edges[1:] > edges[:-1]).all()
    assert ((values > edges[:-1]) & (values < edges[1:])).all()
    assert torch.allclose(values, -values.flip(0), atol=1e-6)  # symmetric
    for k in (0, 10, 40):  # the clamped outer bin [-3, q_1] and two inner bins, by quadrature
        z = torch.linspace(float(edges[k]), float(edges[k + 1]), 100_001, dtype=torch.float64)
        density = torch.exp(-0.5 * z**2)
        mean = torch.trapezoid(z * density, z) / torch.trapezoid(density, z)
        assert abs(float(values[k]) - float(mean)) < 1e-5


def test_error_shrinks_as_bits_grow_and_indices_round_trip():
    generator = torch.Generator().manual_seed(0)
    center, scale = torch.tensor([0.5, -2.0, 0.0]), torch.tensor([0.3, 2.0, 7.0])
    latents = center + scale * torch.randn(20_000, 3, generator=generator)  # (M, C) in latent units
    errors = []
    for bits in (2, 4, 6, 8):
        quantizer = DimwiseGaussianQuantizer(3, bits)
        quantizer.set_statistics(latents.mean(0), latents.std(0))
        bins = quantizer.quantize(latents)
        assert bins.dtype == torch.long and bins.min() >= 0 and bins.max() < 2**bits
        errors.append(((quantizer.dequantize(bins) - latents) / scale).pow(2).mean().item())
        every = torch.arange(2**bits)[:, None].expand(-1, 3)  # every bin of every channel
        assert torch.equal(quantizer.quantize(quantizer.dequantize(every)), every)  # dequantise -> quantise
    assert all(a > 3 * b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 2e-3  # at 8 bits, mostly the clipping of the 0.27% of values beyond 3 std


def test_fixed_range_is_the_official_mapping_and_needs_no_fit():
    quantizer = DimwiseGaussianQuantizer(2, 6, quant_range=5.0)
    assert quantizer.is_fitted
    x = torch.tensor([[-5.0, 5.0], [0.01, -0.01], [-9.0, 9.0]])
    bins = quantizer.quantize(x)
    assert bins.tolist() == [[0, 63], [32, 31], [0, 63]]  # [-5, 5] -> [-3, 3]; beyond clamps
    assert torch.allclose(quantizer.dequantize(bins[:1]), 5 / 3 * gaussian_bins(6)[1][[0, 63]])
    quantizer.set_statistics(torch.ones(2), torch.ones(2))  # measuring does not change a fixed range
    assert torch.equal(quantizer.quantize(x), bins)


# ---- the tokenizer, both variants


@pytest.mark.parametrize("variant", ["titok", "conv"])
def test_shapes_spec_encode_decode(variant):
    model = tiny(variant).eval()
    num_tokens, grid = (N, None) if variant == "titok" else (16, (4, 4))
    spec = model.token_spec
    assert (spec.kind, spec.num_tokens, spec.grid, spec.vocab_size, spec.token_dim) == (
        "dimwise",
        num_tokens,
        grid,
        V,
        C,
    )
    x = images()
    reconstructions, losses, stats = model(x)
    assert reconstructions.shape == x.shape and set(losses) == {"kl"}
    assert stats["codes"].shape == (4, num_tokens, C) and stats["codes"].max() < V  # provisional bins
    with pytest.raises(RuntimeError, match="not fitted"):
        model.encode(x)
    model.fit_quantizer(model.encode_latents(x))
    tokens = model.encode(x)
    assert tokens.kind == "dimwise" and tokens.grid == grid
    assert tokens.data.shape == (4, num_tokens, C) and tokens.data.dtype == torch.long
    assert model.decode(tokens).shape == x.shape
    assert torch.equal(model(x)[2]["codes"], tokens.data)  # once fitted, stats hold the real bins
    if variant == "titok":
        assert model.decode(tokens, num_tokens=2).shape == x.shape  # prefixes decode
    else:
        with pytest.raises(ValueError, match="whole grids"):
            model.decode(tokens, num_tokens=2)


def test_conv_variant_checks_its_token_count():
    with pytest.raises(ValueError, match="num_tokens"):
        TokenBridge(**{**TINY_CONV, "num_tokens": 7})
    assert TokenBridge(**{**TINY_CONV, "num_tokens": 16}).config["num_tokens"] == 16


def test_kl_term_value_and_gradient():
    model = tiny(kl_weight=0.5).train()
    x = images()
    _, losses, stats = model(x)
    mean, logvar = model.posterior(x)
    expected = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum((1, 2)).mean()
    assert torch.allclose(losses["kl"], 0.5 * expected) and torch.allclose(stats["kl"], expected)
    losses["kl"].backward()
    grad = model.encoder.to_code.weight.grad  # (2C, width): rows 0..C-1 mean, C..2C-1 logvar
    assert grad[:C].abs().sum() > 0 and grad[C:].abs().sum() > 0
    assert all(p.grad is None for p in model.decoder.parameters())  # the KL term does not touch the decoder


def test_training_samples_the_posterior_and_eval_uses_the_mean():
    model, x = tiny(), images()
    model.train()
    assert not torch.equal(model(x)[0], model(x)[0])
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])
    assert torch.allclose(model(x)[0], model.decode_latents(model.encode_latents(x)))


def test_tiny_continuous_tokenizer_overfits_a_batch():
    model = tiny().train()
    low = torch.rand(8, 3, 4, 4, generator=torch.Generator().manual_seed(5)) * 2 - 1
    x = torch.nn.functional.interpolate(low, size=16, mode="bilinear")  # smooth images: learnable quickly
    mean_predictor = (x - x.mean(0, keepdim=True)).pow(2).mean().item()  # a decoder ignoring the latents
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def eval_loss():  # decoding the posterior mean
        model.eval()
        with torch.no_grad():
            loss = (model(x)[0] - x).pow(2).mean().item()
        model.train()
        return loss

    history = [eval_loss()]
    for step in range(120):
        reconstructions, losses, _ = model(x)
        loss = (reconstructions - x).pow(2).mean() + losses["kl"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in (29, 119):
            history.append(eval_loss())
    assert history[1] < 0.6 * history[0], history  # 30 steps: the loss goes down
    assert history[2] < 0.7 * mean_predictor, (history, mean_predictor)  # the latents carry each image


def test_fit_from_batches_reports_psnr_and_export_keeps_the_bins(tmp_path):
    model = tiny()
    before = model.state_dict()["quantizer.center"].clone()
    model.save_pretrained(tmp_path / "unfitted")
    assert not from_pretrained(tmp_path / "unfitted").quantizer.is_fitted
    batches = [{"image": images(4, seed)} for seed in range(3)]
    report = model.fit_quantizer(batches, max_images=10, check_images=6)
    assert report["images"] == 10 and report["latents"] == 10 * N
    assert report["psnr_quantized"] <= report["psnr_continuous"] + 0.05
    assert not torch.equal(model.quantizer.center, before) and model.training  # mode restored
    model.save_pretrained(tmp_path / "fitted")
    meta = json.loads((tmp_path / "fitted" / "config.json").read_text())
    assert meta["quantizer"]["fitted"] and meta["token_spec"]["kind"] == "dimwise"
    loaded = from_pretrained(tmp_path / "fitted")
    for name in ("edges", "values", "center", "scale", "fitted"):
        assert torch.equal(getattr(loaded.quantizer, name), getattr(model.quantizer, name)), name
    model.eval()
    x = images(2, seed=9)
    assert torch.equal(loaded.encode(x).data, model.encode(x).data)


# ---- the dimwise head


def tiny_head(order="natural", **kwargs) -> DimwiseHead:
    torch.manual_seed(0)
    head = DimwiseHead(24, V, C, channel_order=order, **{**HEAD, **kwargs})
    with torch.no_grad():  # GPT's init (std 0.02) would make every logit nearly flat: test sharper maps
        for p in head.parameters():
            p.normal_(0, 0.3)
    return head


@pytest.mark.parametrize("order", ["natural", "reversed", [2, 0, 3, 1]])
def test_teacher_forced_logits_equal_cached_step_by_step_logits(order):
    head = tiny_head(order).eval()
    hidden = torch.randn(5, 24)
    targets = torch.randint(V, (5, C))
    teacher = head.logits(hidden, targets)  # (5, C, V), natural channel order
    bins, stepped = head.decode_channels(hidden, None, 1.0, lambda logits, step: targets[:, head.order[step]])
    assert torch.equal(bins, targets)
    assert torch.allclose(stepped, teacher, atol=1e-5)
    # The first channel predicted depends on the condition only; the others on the channels before them.
    first = int(channel_permutation(order, C)[0])
    other = head.logits(hidden, targets.roll(1, dims=0))
    assert torch.allclose(other[:, first], teacher[:, first], atol=1e-6)
    assert not torch.allclose(other, teacher, atol=1e-3)


def test_head_loss_backward_and_embedding():
    head = tiny_head()
    hidden = torch.randn(2, 3, 24, requires_grad=True)
    targets = torch.randint(V, (2, 3, C))
    loss = head.loss(hidden, targets)
    assert loss.shape == () and loss.item() > 0
    logits = head.logits(hidden, targets)  # (2, 3, C, V)
    manual = torch.nn.functional.cross_entropy(logits.flatten(0, 2), targets.flatten())
    assert torch.allclose(loss, manual, atol=1e-6)  # averaged over channels and positions
    loss.backward()
    assert hidden.grad.abs().sum() > 0
    assert all(p.grad is not None for name, p in head.named_parameters()), "every head weight is trained"
    embedding = make_embedding("dimwise", V, 24, token_dim=C, **HEAD)
    assert isinstance(embedding, DimwiseEmbedding) and embedding(targets).shape == (2, 3, 24)
    assert DEFAULT_HEADS["dimwise"] == "dimwise" and isinstance(make_head("dimwise", 24, V, C), DimwiseHead)
    with pytest.raises(ValueError, match="channel_order"):
        DimwiseHead(24, V, C, channel_order=[0, 1, 1, 2])


def test_guidance_scale_one_is_unguided_and_guidance_applies_at_every_channel():
    head = tiny_head().eval()
    cond, uncond = torch.randn(6, 24), torch.randn(6, 24)
    draw = lambda h, u, s: head.sample(h, u, s, generator=torch.Generator().manual_seed(3))  # noqa: E731
    assert torch.equal(draw(cond, uncond, 1.0), draw(cond, None, 1.0))
    bins = head.sample(cond, uncond, 3.0, top_k=1)  # greedy: argmax of the guided logits at every channel
    l_c, l_u = head.logits(cond, bins), head.logits(uncond, bins)  # both streams saw the same bins
    assert torch.equal(bins, (l_u + 3.0 * (l_c - l_u)).argmax(-1))
    assert not torch.equal(bins, head.sample(cond, None, 1.0, top_k=1))


def test_tiny_gpt_trains_and_samples_dimwise_tokens(tmp_path):
    torch.manual_seed(0)
    options = dict(channel_order="reversed", **HEAD)
    gpt = GPT(
        V,
        N,
        3,
        size="tiny",
        width=32,
        depth=1,
        heads=2,
        token_kind="dimwise",
        token_dim=C,
        head_options=options,
    )
    tokens, labels = torch.randint(V, (4, N, C)), torch.tensor([0, 1, 2, 0])
    gpt.loss(tokens, labels).backward()
    assert gpt.embed.table.weight.grad is not None and gpt.head.out_proj.grad is not None
    gpt.eval()
    results = [
        sample_ar(gpt, labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(0), use_cache=cache)
        for cache in (True, False)
    ]
    assert results[0].tokens.shape == (4, N, C)
    assert results[0].tokens.min() >= 0 and results[0].tokens.max() < V
    assert torch.equal(results[0].tokens, results[1].tokens)
    gpt.save_pretrained(tmp_path / "gpt")
    assert from_pretrained(tmp_path / "gpt").config["head_options"]["channel_order"] == "reversed"


# ---- end to end: train.py (fitted export), codes, stage 2 on dimwise tokens, samples, the fit script


def test_quickstarts_train_fit_extract_and_sample(tmp_path):
    sizes = [o for o in TINY_SIZES if not o.startswith("tokenizer.codebook_size")]  # no codebook here
    stage1 = compose_config(
        [
            "+experiment=tokenbridge_quickstart",
            *sizes,
            "tokenizer.num_tokens=4",
            "tokenizer.latent_channels=3",
        ]
        + ["tokenizer.bits=3", "tokenizer.fit_images=40", f"paths.run_dir={tmp_path / 'tok'}", *TINY_TRAINER]
    )
    metrics = train.run(stage1)
    assert metrics["steps"] == 4 and 1 <= metrics["perplexity"] <= 8
    tokenizer_path = tmp_path / "tok" / "export"
    tokenizer = from_pretrained(tokenizer_path)
    assert type(tokenizer) is TokenBridge and tokenizer.quantizer.is_fitted  # fitted by train.py
    refit = compose_config(
        [f"tokenizer_path={tokenizer_path}", f"out={tmp_path / 'refit'}", "num_images=24", "batch_size=8"]
        + ["data.resolution=16", "check_images=8"],
        config_name="fit_tokenbridge",
    )
    assert fit_script(refit)["images"] == 24 and from_pretrained(tmp_path / "refit").quantizer.is_fitted
    codes = tmp_path / "codes"
    extract(
        compose_config(
            [f"tokenizer_path={tokenizer_path}", f"out={codes}", "num_samples=48", "batch_size=24"],
            config_name="extract_codes",
        )
    )
    stage2 = compose_config(
        [
            "+experiment=gpt_tokenbridge_quickstart",
            f"data.codes_dir={codes}",
            f"module.tokenizer_path={tokenizer_path}",
        ]
        + ["data.batch_size=8", "generator.width=32", "generator.depth=1", "generator.heads=2"]
        + ["generator.num_tokens=4", "generator.token_dim=3", "generator.vocab_size=8"]
        + ["generator.head_options.channel_width=16", "module.warmup_steps=2", "module.grid_classes=2"]
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
