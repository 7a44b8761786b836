import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tokenizers_vis import FlexTok, Tokens, from_pretrained
from tokenizers_vis.flextok import (
    FLEXTOK_SIZES,
    apply_nested_dropout,
    encoder_attention_mask,
    patchify,
    powers_of_two,
    sample_keep_k,
)
from tokenizers_vis.losses import ReconstructionLoss
from training.config import compose_config

TINY = dict(
    image_size=16,
    first_stage="pixels",
    patch_size=4,
    size="tiny",
    width=32,
    depth=2,
    heads=2,
    decoder_width=32,
    decoder_depth=2,
    decoder_heads=2,
    num_registers=8,
    levels=[5, 4, 3],
    num_steps=3,
)


def tiny(**overrides) -> FlexTok:
    torch.manual_seed(0)
    return FlexTok(**{**TINY, **overrides})


def images(batch=2, size=16, seed=1):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def perturb_zero_init(model: FlexTok, seed=0):
    """AdaLN-zero starts the decoder as a constant: randomise the zero-initialised layers so tests see
    how the velocity depends on its inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.decoder.named_parameters():
            if "modulation" in name or "to_velocity" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """Randomly initialised timm ViT-Tiny weights standing in for a REPA teacher."""
    import timm

    path = tmp_path_factory.mktemp("weights") / "vit_tiny.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), path)
    return path


# ---- nested dropout ---------------------------------------------------------------------------------------


def test_nested_dropout_replaces_registers_after_keep_k_with_the_mask_token():
    registers = torch.randn(4, 8, 5)
    mask = torch.randn(5)
    keep = torch.tensor([0, 1, 5, 8])
    out = apply_nested_dropout(registers, keep, mask)
    for b, k in enumerate(keep.tolist()):
        assert torch.equal(out[b, :k], registers[b, :k])
        assert torch.equal(out[b, k:], mask.expand(8 - k, 5))
    # Inside the model: codes -> projection -> mask, so a masked register no longer depends on its code.
    model = tiny()
    vectors = model.quantizer.indices_to_codes(torch.randint(0, 60, (2, 8)))
    embedded = model.decoder.embed_registers(vectors, torch.tensor([3, 8]))
    assert torch.equal(embedded[0, 3:], model.decoder.mask_token.detach().expand(5, -1))
    assert not torch.equal(embedded[1, 3:], model.decoder.mask_token.detach().expand(5, -1))


def test_keep_k_rules_have_the_right_support():
    n, draws = 32, 4000
    uniform = sample_keep_k(draws, n, "uniform", generator=seeded())
    pow2 = sample_keep_k(draws, n, "pow2", generator=seeded())
    ceil = sample_keep_k(draws, n, "pow2_ceil", generator=seeded())
    assert set(uniform.tolist()) == set(range(1, n + 1))
    assert set(pow2.tolist()) == set(ceil.tolist()) == {1, 2, 4, 8, 16, 32}
    # pow2 is uniform over the 6 powers; rounding U{1..32} up puts half the mass on 32.
    assert abs((pow2 == 32).float().mean().item() - 1 / 6) < 0.03
    assert abs((ceil == 32).float().mean().item() - 1 / 2) < 0.03
    assert powers_of_two(24) == [1, 2, 4, 8, 16, 24]
    assert sample_keep_k(500, 24, "pow2_ceil", generator=seeded()).max() == 24
    with pytest.raises(ValueError, match="nested_dropout"):
        sample_keep_k(2, 8, "halves")


# ---- encoder ----------------------------------------------------------------------------------------------


def test_encoder_mask_layout():
    mask = encoder_attention_mask(3, 4)  # True: row may read column
    assert mask[:3, :3].all() and not mask[:3, 3:].any()  # patches read patches only
    assert mask[3:, :3].all()  # registers read every patch
    assert torch.equal(mask[3:, 3:], torch.ones(4, 4).tril().bool())  # causal among registers


def test_registers_are_causal_in_the_encoder():
    model = tiny().eval()
    x = images()
    j = 5
    with torch.no_grad():
        before = model.encoder(x)  # (B, R, d)
        model.encoder.registers[j].add_(torch.randn(32))  # not a constant: LayerNorm would remove it
        after = model.encoder(x)
    assert torch.equal(before[:, :j], after[:, :j])  # registers < j never see register j
    assert not torch.allclose(before[:, j], after[:, j])


def mean_pairwise_cosine(tokens: torch.Tensor) -> float:
    """tokens (B, n, W) -> mean cosine similarity between different tokens of the same row."""
    unit = F.normalize(tokens, dim=-1)
    cos = unit @ unit.transpose(1, 2)  # (B, n, n)
    n = cos.shape[-1]
    return ((cos.sum((1, 2)) - n) / (n * n - n)).mean().item()


def test_registers_start_distinct_and_patches_know_their_position():
    """With ViT's 0.02 init the registers drown in the first attention output (cosine 0.97 between
    registers) and the codes only ever learned the image's colours: FlexTok reconstructions were a patch
    mosaic with no layout."""
    model = tiny()
    encoder = model.encoder
    flat = torch.full((4, 3, 16, 16), 0.3)  # no content: only position tells the patches apart
    with torch.no_grad():
        patches = encoder.patch_embed(patchify(flat, encoder.patch_size)) + encoder.patch_pos
        x = torch.cat([patches, encoder.registers.expand(4, -1, -1)], dim=1)
        for block in encoder.blocks:
            x = block(x, encoder.attn_mask)
        x = encoder.norm(x)
        assert mean_pairwise_cosine(x[:, encoder.num_patches :]) < 0.5  # registers
        assert mean_pairwise_cosine(x[:, : encoder.num_patches]) < 0.5  # patches of a flat image
        # In the decoder, the noise at t = 1 must not hide where a patch is.
        decoder = model.decoder
        noise = decoder.patch_embed(patchify(torch.randn(4, 3, 16, 16), decoder.patch_size))
        assert decoder.patch_pos.norm(dim=-1).mean() > noise.norm(dim=-1).mean()


# ---- flow decoder -----------------------------------------------------------------------------------------


def test_flow_loss_decreases_when_overfitting_one_batch(one_thread):
    model = tiny(register_dropout=0.0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = F.interpolate(images(batch=4, size=4), size=16, mode="bilinear")  # smooth images: quick to memorise
    torch.manual_seed(0)
    losses = []
    for _ in range(64):
        _, loss_dict, stats = model(x)
        loss = loss_dict["flow"]
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[:8]) / 8, losses
    assert all(p.grad is not None for p in model.encoder.parameters())  # the codes get trained too


def test_forward_train_and_eval_outputs():
    model = tiny()
    x = images(batch=3)
    reconstructions, losses, stats = model.train()(x)
    assert reconstructions.shape == x.shape and not reconstructions.requires_grad  # logging only
    assert set(losses) == {"flow"} and losses["flow"].requires_grad
    assert {"codes", "usage", "perplexity", "kept_tokens"} <= set(stats)
    assert stats["codes"].shape == (3, 8) and 0 <= stats["kept_tokens"] <= 8
    model.eval()
    with torch.no_grad():
        first, losses, stats = model(x)
        second, _, _ = model(x)
    assert losses == {} and stats["kept_tokens"] == 8
    assert torch.equal(first, second)  # validation samples with a fixed seed


def test_decode_shapes_prefixes_and_seed():
    model = perturb_zero_init(tiny()).eval()
    x = images(batch=2)
    tokens = model.encode(x)
    assert tokens.kind == "categorical" and tokens.data.shape == (2, 8)
    assert model.token_spec.vocab_size == 60 and model.token_spec.code_dim == 3
    for k in (1, 2, 8):
        assert model.decode(tokens, num_tokens=k, generator=seeded()).shape == x.shape
    a = model.decode(tokens, generator=seeded(3))
    assert torch.equal(a, model.decode(tokens, generator=seeded(3)))
    assert not torch.allclose(a, model.decode(tokens, generator=seeded(4)))
    assert not torch.allclose(a, model.decode(tokens, num_tokens=1, generator=seeded(3)))
    # A generator's shorter sequence decodes like the same prefix of a full one.
    short = Tokens("categorical", tokens.data[:, :3])
    assert torch.allclose(
        model.decode(short, generator=seeded()), model.decode(tokens, 3, generator=seeded())
    )


@pytest.mark.parametrize("prediction", ["v", "x"])
def test_guidance_scale_one_is_the_conditional_velocity(prediction):
    model = perturb_zero_init(tiny(prediction=prediction)).eval()
    codes = model.encode(images()).data
    registers = model.decoder.embed_registers(model.quantizer.indices_to_codes(codes), torch.tensor([8, 8]))
    x_t, t = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        v_cond = model.velocity(x_t, registers, t)[0]
        v_null = model.velocity(x_t, model.decoder.null_registers(2), t)[0]
        assert torch.equal(model.guided_velocity(x_t, t, registers, 1.0), v_cond)
        guided = model.guided_velocity(x_t, t, registers, 3.0)
    assert torch.allclose(guided, v_null + 3.0 * (v_cond - v_null), atol=1e-5)
    assert not torch.allclose(v_cond, v_null)


def test_x_prediction_turns_the_clean_estimate_into_a_velocity():
    """x-prediction: the trunk's output is x0_hat, v = (x_t - x0_hat) / max(t, min_time); one Euler step
    from t to 0 then lands exactly on x0_hat, and an unknown prediction is a one-line error."""
    model = perturb_zero_init(tiny(prediction="x", min_time=0.05)).eval()
    codes = model.encode(images()).data
    registers = model.decoder.embed_registers(model.quantizer.indices_to_codes(codes), torch.tensor([8, 8]))
    x_t, t = torch.randn(2, 3, 16, 16), torch.tensor([0.6, 0.01])
    with torch.no_grad():
        x0_hat = model.decoder(x_t, registers, t)[0]
        v = model.velocity(x_t, registers, t)[0]
    assert torch.allclose(v[0], (x_t[0] - x0_hat[0]) / 0.6, atol=1e-5)
    assert torch.allclose(v[1], (x_t[1] - x0_hat[1]) / 0.05, atol=1e-5)  # t clamped at min_time
    assert torch.allclose(x_t[0] - 0.6 * v[0], x0_hat[0], atol=1e-5)
    with pytest.raises(ValueError, match="prediction='eps'"):
        tiny(prediction="eps")


def test_per_row_lengths_equal_separate_decodes_with_the_same_seed():
    model = perturb_zero_init(tiny()).eval()
    tokens = model.encode(images(batch=2))
    lengths = torch.tensor([2, 5])
    together = model.decode(Tokens("categorical", tokens.data, lengths), generator=seeded(7))
    for row, k in enumerate(lengths.tolist()):
        alone = model.decode(tokens, num_tokens=k, generator=seeded(7))
        assert torch.allclose(together[row], alone[row], atol=1e-5)
    assert not torch.allclose(together[0], model.decode(tokens, num_tokens=5, generator=seeded(7))[0])


# ---- export, first stage, REPA ----------------------------------------------------------------------------


def test_export_and_from_pretrained_round_trip(tmp_path):
    model = perturb_zero_init(tiny()).eval()
    folder = model.save_pretrained(tmp_path / "export")
    loaded = from_pretrained(folder)
    assert isinstance(loaded, FlexTok) and loaded.token_spec == model.token_spec
    assert json.loads((folder / "config.json").read_text())["model_type"] == "flextok"
    x = images()
    tokens = model.encode(x)
    assert torch.equal(tokens.data, loaded.encode(x).data)
    assert torch.equal(model.decode(tokens, generator=seeded()), loaded.decode(tokens, generator=seeded()))


def test_from_preset_and_sizes():
    with torch.device("meta"):  # the published sizes without allocating them
        model = FlexTok.from_preset("d18-d28", image_size=256, first_stage="pixels")
    encoder, decoder = model.encoder.blocks, model.decoder.blocks
    assert (encoder[0].qkv.in_features, len(encoder), decoder[0].qkv.in_features, len(decoder)) == (
        1152,
        18,
        1792,
        28,
    )
    assert model.token_spec.vocab_size == 64000 and model.token_spec.num_tokens == 256
    assert FLEXTOK_SIZES["d18"] == dict(width=1152, depth=18, heads=18)


def test_vae_first_stage_stays_out_of_the_state_dict(vae_folder, tmp_path):
    model = tiny(image_size=32, first_stage="vae", vae_path=str(vae_folder), patch_size=2)
    assert model.latent_channels == 4 and model.latent_size == 4
    assert not any(k.startswith("_vae") or "vae" in k for k in model.state_dict())
    assert copy.deepcopy(model)._vae is model._vae  # the EMA copy shares the frozen VAE
    x = images(batch=2, size=32)
    reconstructions, losses, _ = model.train()(x)
    assert reconstructions.shape == x.shape and torch.isfinite(losses["flow"])
    model.eval()
    tokens = model.encode(x)
    assert model.decode(tokens, num_tokens=2, generator=seeded()).shape == x.shape
    loaded = from_pretrained(model.save_pretrained(tmp_path / "export"))  # reloads the VAE from vae_path
    assert torch.equal(loaded.encode(x).data, tokens.data)


def test_missing_vae_folder_is_a_one_line_error(tmp_path):
    for path in (None, tmp_path / "nowhere"):
        with pytest.raises(FileNotFoundError) as error:
            tiny(first_stage="vae", vae_path=path, patch_size=2)
        message = str(error.value)
        assert "paths.flextok_vae" in message and "\n" not in message


def test_repa_aligns_decoder_features_to_a_frozen_teacher(teacher_file, tmp_path):
    model = tiny(
        repa_weights=str(teacher_file),
        repa_teacher="vit_tiny_patch16_224",
        repa_image_size=32,
        repa_hidden=16,
    )
    perturb_zero_init(model)  # open the AdaLN-zero gates so block 0 influences the aligned features
    assert not any("_teacher" in k for k in model.state_dict())
    _, losses, _ = model.train()(images())
    assert set(losses) == {"flow", "repa"} and 0 <= losses["repa"].item() <= 2
    sum(losses.values()).backward()
    assert model.repa_head[0].weight.grad.abs().sum() > 0
    assert model.decoder.blocks[0].qkv.weight.grad.abs().sum() > 0  # reaches the decoder's first layer
    folder = model.save_pretrained(tmp_path / "export")  # inference export: no head, no teacher
    loaded = from_pretrained(folder)
    assert loaded.repa_head is None and loaded.config["repa_weights"] is None
    assert model.repa_head is not None  # the training model keeps its head
    with pytest.raises(FileNotFoundError, match="paths.repa_weights") as error:
        tiny(repa_weights=str(tmp_path / "missing.pth"))
    assert "\n" not in str(error.value)


def test_repa_with_photos_net_aligns_to_its_map_at_the_decoder_grid(tmp_path):
    from training.feature_net import PhotosNet

    folder = tmp_path / "photos-net"
    PhotosNet([f"photo{i}" for i in range(3)], resolution=16, widths=(4, 8, 12)).save_pretrained(folder)
    model = tiny(repa_weights=str(folder), repa_teacher="photos-net", repa_hidden=16)  # decoder grid 16/4 = 4
    teacher = model._teacher.module
    assert teacher.stage == 2 and teacher.num_features == 12  # the 4x4 map: 16 px / 2^2
    assert teacher.patch_features(images()).shape == (2, 12, 4, 4)
    assert not any("_teacher" in k or "net." in k for k in model.state_dict())
    perturb_zero_init(model)
    _, losses, _ = model.train()(images())
    assert 0 <= losses["repa"].item() <= 2
    sum(losses.values()).backward()
    assert model.decoder.blocks[0].qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())  # the teacher stays frozen
    with pytest.raises(FileNotFoundError, match="paths.repa_weights.*train_feature_net") as error:
        tiny(repa_weights=str(tmp_path / "nowhere"), repa_teacher="photos-net")
    assert "\n" not in str(error.value)


# ---- configs and training ---------------------------------------------------------------------------------


def test_reconstruction_loss_with_every_pixel_weight_at_zero():
    model = tiny()
    loss = ReconstructionLoss(pixel_weight=0.0, perceptual_weight=0.0, gan_weight=0.0)
    assert loss.discriminator is None and not loss.perceptual_on
    x = images()
    reconstructions, losses, _ = model.train()(x)
    total, logs = loss.generator_loss(x, reconstructions, step=0)
    assert total.item() == 0 and {"pixel", "gan_g", "total"} <= set(logs)
    (total + sum(losses.values())).backward()  # what training/tokenizer_module.py does
    assert model.decoder.to_velocity.weight.grad.abs().sum() > 0


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_experiments_compose(vae_folder):
    from hydra.utils import instantiate

    quick = compose_config(["+experiment=flextok_quickstart"])
    t = quick.tokenizer
    assert (t.first_stage, t.num_registers, list(t.levels), quick.data.resolution) == (
        "pixels",
        32,
        [8, 5, 5, 5],
        32,
    )
    loss = quick.module.loss
    assert loss.pixel_weight == loss.perceptual_weight == loss.gan_weight == 0
    module = instantiate(quick.module)
    assert module.tokenizer.token_spec.vocab_size == 1000
    assert module.tokenizer.config["image_size"] == quick.data.resolution

    paper = compose_config(["+experiment=flextok_d18_d18_imagenet", f"paths.flextok_vae={vae_folder}"])
    t = paper.tokenizer
    assert (t.first_stage, t.patch_size, t.size, t.num_registers) == ("vae", 2, "d18", 256)
    assert list(t.levels) == [8, 8, 8, 5, 5, 5] and paper.data.resolution == 256
    assert paper.trainer.precision == "bf16-mixed"
    with torch.device("meta"):
        module = instantiate(paper.module)
    tokenizer = module.tokenizer
    assert len(tokenizer.decoder.blocks) == 18 and tokenizer.encoder.blocks[0].qkv.in_features == 1152
    with pytest.raises(Exception, match="paths.flextok_vae"):
        instantiate(compose_config(["+experiment=flextok_d18_d18_imagenet"]).tokenizer)


def test_quickstart_trains_through_train_py(tmp_path, one_thread):
    import train

    overrides = [
        "+experiment=flextok_quickstart",
        "data.resolution=16",
        "data.batch_size=8",
        "data.num_workers=0",
        "data.samples_per_epoch=32",
        "data.val_per_class=1",
        "tokenizer.width=32",
        "tokenizer.depth=1",
        "tokenizer.decoder_width=32",
        "tokenizer.decoder_depth=1",
        "tokenizer.num_registers=4",
        "tokenizer.num_steps=2",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "trainer.enable_model_summary=false",
        "callbacks.checkpoint.every_n_train_steps=3",
        "callbacks.progress=null",
        f"paths.run_dir={tmp_path / 'run'}",
    ]
    metrics = train.run(compose_config(overrides))
    assert metrics["steps"] == 3 and metrics["psnr"] > 0
    export = from_pretrained(Path(tmp_path / "run" / "export"))
    assert isinstance(export, FlexTok) and export.token_spec.num_tokens == 4
