import json

import pytest
import torch
from conftest import TINY_SIZES, TINY_TRAINER
from hydra.utils import instantiate

import train
from tokenizers_vis import OneDPiece, TiTok, Tokens, from_pretrained
from training.config import compose_config

pytestmark = pytest.mark.usefixtures("one_thread")  # shared CPUs: one thread is much faster

TINY = dict(
    image_size=16, patch_size=4, codebook_size=32, code_dim=8, size="tiny", width=32, depth=1, heads=2
)
N = 6


def tiny(tail_drop="batch", num_tokens=N, **kwargs) -> OneDPiece:
    torch.manual_seed(0)
    return OneDPiece(tail_drop=tail_drop, num_tokens=num_tokens, **TINY, **kwargs)


def images(batch=4, seed=1):
    return torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def perturb(codes: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Change the codes where `positions` (B, N) is True to other codes."""
    return torch.where(positions, (codes + 1 + torch.arange(codes.shape[1]) % 7) % 32, codes)


def test_is_a_titok_registered_as_onedpiece():
    model = tiny()
    assert isinstance(model, TiTok) and model.registry_name == "onedpiece"
    assert model.config["tail_drop"] == "batch" and model.config["min_tokens"] == 1
    assert (
        OneDPiece.from_preset("S-256", width=32, depth=1, image_size=16, patch_size=4).token_spec.num_tokens
        == 256
    )


def test_decoder_accepts_every_prefix_length():
    model = tiny().eval()
    x = images()
    tokens = model.encode(x)
    assert tokens.lengths is None and tokens.data.shape == (4, N)
    with torch.no_grad():
        outputs = [model.decode(tokens, num_tokens=k) for k in range(1, N + 1)]
    assert all(out.shape == x.shape for out in outputs)
    assert not torch.allclose(outputs[0], outputs[-1])
    assert torch.allclose(outputs[-1], model.decode(tokens), atol=1e-6)


@pytest.mark.parametrize("min_tokens", [1, 3])
def test_batch_mode_draws_one_k_per_batch_covering_the_range(min_tokens):
    model = tiny("batch", min_tokens=min_tokens).train()
    seen_by_decoder = []
    model.decoder.register_forward_hook(lambda m, args, out: seen_by_decoder.append(args[0].shape[1]))
    x, drawn = images(3), []
    with torch.no_grad():
        for _ in range(120):
            reconstructions, _, stats = model(x)
            assert reconstructions.shape == x.shape
            k = int(stats["lengths"][0])
            assert (stats["lengths"] == k).all() and float(stats["kept_tokens"]) == k  # one k per batch
            drawn.append(k)
    assert seen_by_decoder == drawn  # the decoder saw exactly the first k tokens
    assert set(drawn) == set(range(min_tokens, N + 1))


@pytest.mark.parametrize("tail_drop", ["batch", "sample"])
def test_full_length_prob_keeps_every_token_that_often_and_still_draws_every_length(tail_drop):
    def draws(model):  # 2000 draws, one per batch in batch mode
        rows = 1 if tail_drop == "batch" else 4
        return torch.cat([model.draw_lengths(4)[:rows] for _ in range(2000 // rows)])

    mixed, uniform = draws(tiny(tail_drop, full_length_prob=0.5)), draws(tiny(tail_drop))
    # P(k = N) = 0.5 + 0.5 / N with full_length_prob 0.5; 1 / N under the uniform rule
    assert (mixed == N).float().mean().item() == pytest.approx(0.5 + 0.5 / N, abs=0.04)
    assert (uniform == N).float().mean().item() == pytest.approx(1 / N, abs=0.04)
    assert set(mixed.tolist()) == set(uniform.tolist()) == set(range(1, N + 1))
    with pytest.raises(ValueError, match="full_length_prob=1"):
        tiny(full_length_prob=1)


def test_sample_mode_draws_k_per_image():
    model = tiny("sample").train()
    x, drawn, mixed = images(8), set(), 0
    with torch.no_grad():
        for _ in range(40):
            reconstructions, _, stats = model(x)
            assert reconstructions.shape == x.shape and stats["lengths"].shape == (8,)
            assert float(stats["kept_tokens"]) == pytest.approx(stats["lengths"].float().mean().item())
            drawn |= set(stats["lengths"].tolist())
            mixed += len(set(stats["lengths"].tolist())) > 1
    assert drawn == set(range(1, N + 1))
    assert mixed >= 35  # different lengths within a batch (8 draws from 6 values are rarely all equal)


@pytest.mark.parametrize("tail_drop", ["batch", "sample", "none"])
def test_eval_mode_and_none_mode_decode_all_tokens(tail_drop):
    model = tiny(tail_drop)
    x = images()
    for training in [True, False] if tail_drop == "none" else [False]:
        model.train(training)
        with torch.no_grad():
            reconstructions, _, stats = model(x)
            full = model.decode(Tokens("categorical", stats["codes"]))
        assert (stats["lengths"] == N).all() and float(stats["kept_tokens"]) == N
        assert torch.allclose(reconstructions, full, atol=1e-5)


def test_dropped_tail_tokens_have_no_influence_and_kept_ones_do():
    model = tiny("sample").eval()
    tokens = model.encode(images())
    lengths = torch.tensor([2, 5, 6, 1])
    tail = torch.arange(N)[None] >= lengths[:, None]  # (B, N)
    with torch.no_grad():
        reference = model.decode(Tokens("categorical", tokens.data, lengths))
        tail_changed = model.decode(Tokens("categorical", perturb(tokens.data, tail), lengths))
        last_kept = torch.arange(N)[None] == (lengths - 1)[:, None]
        head_changed = model.decode(Tokens("categorical", perturb(tokens.data, last_kept), lengths))
    assert torch.equal(tail_changed, reference)  # exactly: hidden keys get zero attention weight
    for row in range(4):
        assert not torch.allclose(head_changed[row], reference[row], atol=1e-4)


def test_row_lengths_decoding_equals_decoding_each_row_at_its_prefix():
    model = tiny("sample").eval()
    tokens = model.encode(images())
    lengths = torch.tensor([1, 3, 6, 4])
    with torch.no_grad():
        together = model.decode(Tokens("categorical", tokens.data, lengths))
        separately = torch.cat(
            [
                model.decode(Tokens("categorical", tokens.data[i : i + 1]), num_tokens=int(k))
                for i, k in enumerate(lengths)
            ]
        )
        capped = model.decode(Tokens("categorical", tokens.data, lengths), num_tokens=2)
        capped_reference = model.decode(Tokens("categorical", tokens.data, lengths.clamp(max=2)))
        same_length = model.decode(Tokens("categorical", tokens.data, torch.full((4,), 3)))
    assert torch.allclose(together, separately, atol=1e-5)
    assert torch.allclose(capped, capped_reference, atol=1e-6)
    assert torch.allclose(same_length, model.decode(tokens, num_tokens=3), atol=1e-6)
    with pytest.raises(ValueError, match="lengths must lie in 1..6"):
        model.decode(Tokens("categorical", tokens.data, torch.tensor([0, 1, 2, 3])))


def test_decoder_key_mask_hides_nothing_at_full_length():
    # The masked path (rows of different lengths) and the plain path are one decoder: with every latent
    # visible the mask must change nothing.
    model = tiny().eval()
    latents = model.quantizer.lookup(model.encode(images()).data)  # (B, N, D)
    with torch.no_grad():
        for k in (1, 4, N):
            expected = model.decoder(latents[:, :k])
            assert torch.allclose(model.decoder(latents[:, :k], torch.full((4,), k)), expected, atol=1e-5)


@pytest.mark.parametrize("tail_drop", ["batch", "sample"])
def test_reconstruction_gradient_skips_dropped_tokens_and_reaches_the_encoder(tail_drop):
    model = tiny(tail_drop).train()
    captured = {}

    def keep_encoder_output(module, args, output):
        output.retain_grad()
        captured["z"] = output

    model.encoder.to_code.register_forward_hook(keep_encoder_output)
    torch.manual_seed(3)
    x = images(8)
    reconstructions, losses, stats = model(x)
    reconstructions.pow(2).mean().backward(retain_graph=True)  # reconstruction only, no quantiser losses
    grad = captured["z"].grad.norm(dim=-1)  # (B, N)
    kept = torch.arange(N)[None] < stats["lengths"][:, None]
    assert (grad[~kept] == 0).all()  # a dropped token gets no reconstruction gradient...
    assert (grad[kept] > 0).all()  # ...a kept one does, through the straight-through estimator
    assert model.encoder.patch_embed.weight.grad.abs().sum() > 0
    # The quantiser losses still cover all N tokens, so the encoder keeps learning the dropped ones too.
    captured["z"].grad = None
    sum(losses.values()).backward()
    assert (captured["z"].grad.norm(dim=-1) > 0).all()


def test_invalid_options_fail_loudly():
    with pytest.raises(ValueError, match="tail_drop='bogus'"):
        tiny("bogus")
    with pytest.raises(ValueError, match="min_tokens=0"):
        tiny(min_tokens=0)
    with pytest.raises(ValueError, match="min_tokens=7"):
        tiny(min_tokens=7)


def test_save_and_from_pretrained_round_trip(tmp_path):
    model = tiny("sample", min_tokens=2).eval()
    folder = model.save_pretrained(tmp_path / "export")
    meta = json.loads((folder / "config.json").read_text())
    assert meta["model_type"] == "onedpiece" and meta["tail_drop"] == "sample"
    loaded = from_pretrained(folder)
    assert type(loaded) is OneDPiece and loaded.config == model.config and loaded.min_tokens == 2
    assert loaded.token_spec == model.token_spec
    x = images()
    tokens = model.encode(x)
    tokens.lengths = torch.tensor([1, 2, 3, 6])
    with torch.no_grad():
        assert torch.equal(model.reconstruct(x), loaded.reconstruct(x))
        assert torch.equal(model.decode(tokens), loaded.decode(tokens))


@pytest.mark.parametrize(
    ("name", "size"),
    [("onedpiece_s256_imagenet", "S"), ("onedpiece_b256_imagenet", "B"), ("onedpiece_l256_imagenet", "L")],
)
def test_imagenet_recipes_compose_at_the_published_sizes(name, size):
    cfg = compose_config([f"+experiment={name}"])
    assert cfg.name == name and cfg.tokenizer._target_ == "tokenizers_vis.onedpiece.OneDPiece"
    assert (cfg.tokenizer.size, cfg.tokenizer.num_tokens, cfg.tokenizer.tail_drop) == (size, 256, "batch")
    assert (cfg.tokenizer.codebook_size, cfg.tokenizer.code_dim, cfg.data.resolution) == (4096, 12, 256)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.module.lr == 1e-4
    with torch.device("meta"):  # the published size, without allocating its weights
        tokenizer = instantiate(cfg.tokenizer)
    assert isinstance(tokenizer, OneDPiece) and tokenizer.config["image_size"] == 256
    assert len(tokenizer.decoder.trunk.blocks) == {"S": 8, "B": 12, "L": 24}[size]


def test_quickstart_trains_and_exports_a_onedpiece(tmp_path):
    cfg = compose_config(
        [
            "+experiment=onedpiece_quickstart",
            *TINY_SIZES,
            f"paths.run_dir={tmp_path / 'run'}",
            *TINY_TRAINER,
        ]
    )
    # titok_quickstart's sizes, token count and steps, plus per-image tail drop, and no GAN
    titok = compose_config(["+experiment=titok_quickstart"])
    for key in ("num_tokens", "patch_size", "code_dim"):
        assert cfg.tokenizer[key] == titok.tokenizer[key]
    assert compose_config(["+experiment=onedpiece_quickstart"]).trainer.max_steps == titok.trainer.max_steps
    assert cfg.tokenizer.num_tokens == 32 and cfg.tokenizer.full_length_prob == 0.8
    assert cfg.module.loss.gan_weight == 0.0
    metrics = train.run(cfg)
    assert metrics["steps"] == 4
    export = from_pretrained(tmp_path / "run" / "export")
    assert type(export) is OneDPiece and export.config["tail_drop"] == "sample"
    assert export.token_spec.num_tokens == 32 and export.config["full_length_prob"] == 0.8
