"""LlamaGen-style 2D VQGAN (tokenizers_vis/vqgan.py): grid tokens, straight-through gradients, LlamaGen's
parameter names, export, and the quickstart -> codes -> grid GPT pipeline through the real configs."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TRAINER

import train
from scripts.extract_codes import extract
from tokenizers_vis import VQGAN, Tokens, from_pretrained
from tokenizers_vis.perturb import LatentPerturbation
from tokenizers_vis.vqgan import AttnBlock, ResnetBlock, llamagen_state_dict
from training.config import ConfigError, compose_config
from training.validation import check_train

# 16x16 images, f = 4 (three levels) -> a 4 x 4 grid of 16 tokens.
TINY = dict(
    image_size=16, size="tiny", ch_mult=[1, 2, 2], width=8, num_res_blocks=1, z_channels=16, norm_groups=4
)
TINY_CODES = dict(codebook_size=32, code_dim=4)


def tiny(**overrides) -> VQGAN:
    return VQGAN(**{**TINY, **TINY_CODES, **overrides})


def images(batch: int = 3, size: int = 16) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)) * 2 - 1


def test_straight_through_gradient_reaches_the_encoder():
    torch.manual_seed(0)
    model = tiny()
    x = images()
    reconstructions, losses, stats = model(x)
    F.mse_loss(reconstructions, x).backward()  # the reconstruction alone: no quantiser loss
    grad = model.encoder.conv_in.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert model.quant_conv.weight.grad.abs().sum() > 0
    # ...whereas the codebook only learns through the quantiser's codebook loss
    assert model.quantize.embedding.weight.grad is None
    losses["codebook"].backward()
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    assert set(losses) == {"commitment", "codebook"} and {"usage", "perplexity", "codes"} <= set(stats)


def test_grid_tokens_round_trip_and_match_forward():
    torch.manual_seed(0)
    model = tiny().eval()
    x = images(batch=3)
    tokens = model.encode(x)
    assert isinstance(tokens, Tokens) and tokens.kind == "categorical"
    assert tokens.grid == (4, 4) and tokens.data.shape == (3, 16) and tokens.data.dtype == torch.long
    assert model.token_spec.grid == (4, 4) and model.token_spec.num_tokens == 16
    assert int(tokens.data.max()) < 32
    with torch.no_grad():
        decoded = model.decode(tokens)
        assert decoded.shape == x.shape
        assert torch.equal(model.encode(x).data, tokens.data)  # deterministic encoding
        assert torch.equal(model.decode(model.encode(x)), decoded)  # and decoding
        reconstructions, _, stats = model(x)
        assert torch.equal(stats["codes"], tokens.data)
        assert torch.allclose(reconstructions, decoded, atol=1e-5)
        # grid=None falls back to the model's own grid (samplers build Tokens without one)
        assert torch.equal(model.decode(Tokens("categorical", tokens.data)), decoded)
        # the decoder's only view of the image is the grid: changing one code changes the output
        other = tokens.data.clone()
        other[:, 5] = (other[:, 5] + 1) % 32
        assert not torch.allclose(model.decode(Tokens("categorical", other)), decoded)
        # a larger image gives a larger grid (fully convolutional), in row-major order
        big = model.encode(images(batch=1, size=32))
        assert big.grid == (8, 8) and model.decode(big).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="whole grids"):
        model.decode(tokens, num_tokens=8)


def test_codes_are_raster_order_of_the_latent_grid():
    # The code at row r, column c of the latent map sits at index r * w + c.
    torch.manual_seed(0)
    model = tiny().eval()
    x = images(batch=2)
    with torch.no_grad():
        z = F.normalize(model.quant_conv(model.encoder(x)), dim=1)  # (B, D, 4, 4)
        vectors = model.code_vectors()  # (V, D)
        distances = ((z.permute(0, 2, 3, 1)[..., None, :] - vectors) ** 2).sum(-1)  # (B, 4, 4, V)
        expected = distances.argmin(-1).flatten(1)  # (B, 16), row-major
    assert torch.equal(model.encode(x).data, expected)


def test_code_vectors_are_what_the_quantiser_looks_up():
    torch.manual_seed(0)
    model = tiny().eval()
    vectors = model.code_vectors()
    assert vectors.shape == (32, 4)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(32), atol=1e-5)  # l2-normalised codes
    codes = model.encode(images()).data
    assert torch.equal(model.quantize.lookup(codes), vectors[codes])
    assert torch.allclose(vectors, F.normalize(model.quantize.embedding.weight, dim=-1))
    # RobustTok's perturbation runs on these code vectors through the forward hook
    perturbation = LatentPerturbation(alpha=1.0, beta=1.0, delta=4, schedule="constant")
    record = {}
    with torch.no_grad():
        _, _, stats = model(images(), perturb=perturbation.hook(model.code_vectors, record=record))
    assert record["perturbed"].codes.shape == stats["codes"].shape == (3, 16)
    assert record["perturbed"].replaced.any()


def test_parameter_names_and_size_follow_llamagen_vq16():
    with torch.device("meta"):
        model = VQGAN(size="VQ-16", codebook_size=16384, code_dim=8)
    params = dict(model.named_parameters())
    assert 71.5e6 < sum(p.numel() for p in params.values()) < 72.5e6  # LlamaGen: 72M
    shapes = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.conv_blocks.0.res.1.conv2.weight": (128, 128, 3, 3),
        "encoder.conv_blocks.2.res.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.conv_blocks.3.downsample.conv.weight": (256, 256, 3, 3),
        "encoder.conv_blocks.4.attn.1.q.weight": (512, 512, 1, 1),
        "encoder.conv_blocks.4.attn.1.proj_out.weight": (512, 512, 1, 1),
        "encoder.mid.0.norm1.weight": (512,),
        "encoder.mid.1.k.weight": (512, 512, 1, 1),
        "encoder.mid.2.conv1.weight": (512, 512, 3, 3),
        "encoder.norm_out.weight": (512,),
        "encoder.conv_out.weight": (256, 512, 3, 3),
        "quant_conv.weight": (8, 256, 1, 1),
        "quantize.embedding.weight": (16384, 8),
        "post_quant_conv.weight": (256, 8, 1, 1),
        "decoder.conv_in.weight": (512, 256, 3, 3),
        "decoder.mid.1.v.weight": (512, 512, 1, 1),
        "decoder.conv_blocks.0.attn.2.norm.weight": (512,),
        "decoder.conv_blocks.0.res.2.conv2.weight": (512, 512, 3, 3),
        "decoder.conv_blocks.0.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.conv_blocks.1.res.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.conv_blocks.4.res.2.conv1.weight": (128, 128, 3, 3),
        "decoder.norm_out.weight": (128,),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for name, shape in shapes.items():
        assert tuple(params[name].shape) == shape, name
    # Attention only at the lowest resolution; no resampling after the lowest (encoder) or the full (decoder)
    higher = ("encoder.conv_blocks.3", "decoder.conv_blocks.1")
    assert not any(".attn." in n for n in params if n.startswith(higher))
    assert "encoder.conv_blocks.4.downsample.conv.weight" not in params
    assert "decoder.conv_blocks.4.upsample.conv.weight" not in params
    # LlamaGen's VQ-16 state dict has 343 tensors besides its codebook_used buffer; ours adds usage_ema.
    assert len(model.state_dict()) == 344 and "quantize.usage_ema" in model.state_dict()
    assert model.token_spec.grid == (16, 16) and model.token_spec.vocab_size == 16384
    assert VQGAN.fsdp_blocks == (ResnetBlock, AttnBlock)


def test_llamagen_state_dict_loads_strictly():
    torch.manual_seed(0)
    source = tiny()
    state = {k: v for k, v in source.state_dict().items() if k != "quantize.usage_ema"}
    state["quantize.codebook_used"] = torch.zeros(65536)  # what LlamaGen's checkpoints carry
    target = tiny()
    target.load_state_dict(llamagen_state_dict(state, 32), strict=True)
    x = images()
    with torch.no_grad():
        assert torch.equal(target.eval().encode(x).data, source.eval().encode(x).data)


def test_save_and_from_pretrained_give_identical_codes(tmp_path):
    torch.manual_seed(0)
    model = tiny(dead_code_threshold=0.05).eval()
    folder = model.save_pretrained(tmp_path / "export")
    meta = json.loads((folder / "config.json").read_text())
    assert meta["model_type"] == "vqgan" and meta["token_spec"]["grid"] == [4, 4]
    loaded = from_pretrained(folder)
    assert type(loaded) is VQGAN and loaded.config == model.config
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded.encode(x).data, model.encode(x).data)
        assert torch.equal(loaded.reconstruct(x), model.reconstruct(x))


def test_entropy_loss_is_optional_and_trains_the_encoder():
    torch.manual_seed(0)
    assert "entropy" not in tiny()(images())[1]
    model = tiny(entropy_weight=0.1)
    losses = model(images())[1]
    losses["entropy"].backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert "entropy" not in model.eval()(images())[1]  # a training loss only


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="multiple of its downsampling factor 4"):
        tiny(image_size=18)
    with pytest.raises(ValueError, match="size="):
        tiny(size="VQ-32")
    # train.py says so before building anything (training/validation.py), in one line naming the key
    check_train(compose_config(["+experiment=vqgan16_imagenet"]))
    with pytest.raises(ConfigError, match=r"^data.resolution=200 must be a multiple of .* factor 16"):
        check_train(compose_config(["+experiment=vqgan16_imagenet", "data.resolution=200"]))


# The vqgan quickstart through the real configs, at test size: 16px crops, a 4 x 4 grid of 16 tokens.
TINY_VQGAN_RUN = [
    "+experiment=vqgan_quickstart",
    "data.resolution=16",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.samples_per_epoch=64",
    "data.val_per_class=1",
    "tokenizer.width=8",
    "tokenizer.z_channels=16",
    "tokenizer.norm_groups=4",
    "tokenizer.codebook_size=64",
    "module.warmup_steps=2",
    "module.loss.gan_weight=0.1",  # exercise the discriminator too
    "module.loss.gan_start_step=2",
    "module.loss.disc_channels=8",
    "module.loss.disc_layers=1",
    *TINY_TRAINER,
]
TINY_GRID_GPT = [
    "+experiment=gpt_vqgan_quickstart",
    "data.batch_size=8",
    "generator.width=32",
    "generator.depth=1",
    "generator.heads=2",
    "generator.vocab_size=64",
    "generator.num_tokens=16",
    "generator.grid=[4,4]",
    "module.warmup_steps=2",
    "module.grid_classes=2",
    "module.grid_samples_per_class=2",
    *TINY_TRAINER,
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
]


def test_quickstart_trains_exports_and_a_grid_gpt_trains_on_its_codes(tmp_path, one_thread):
    metrics = train.run(compose_config(TINY_VQGAN_RUN + [f"paths.run_dir={tmp_path / 'vqgan'}"]))
    assert metrics["steps"] == 4 and 0 < metrics["codebook_usage"] <= 1 and metrics["psnr"] > 0
    export = tmp_path / "vqgan" / "export"
    tokenizer = from_pretrained(export)
    assert type(tokenizer) is VQGAN and tokenizer.token_spec.grid == (4, 4)
    x = images(batch=2)
    with torch.no_grad():
        assert tokenizer.encode(x).data.shape == (2, 16) and tokenizer.reconstruct(x).shape == x.shape

    codes = tmp_path / "codes"
    extract(
        compose_config(
            [f"tokenizer_path={export}", f"out={codes}", "num_samples=32", "batch_size=16"],
            config_name="extract_codes",
        )
    )
    meta = json.loads((codes / "meta.json").read_text())
    assert meta["token_spec"]["grid"] == [4, 4] and meta["token_spec"]["num_tokens"] == 16

    gpt_run = TINY_GRID_GPT + [
        f"data.codes_dir={codes}",
        f"module.tokenizer_path={export}",
        f"paths.run_dir={tmp_path / 'gpt'}",
    ]
    # Without the grid the GPT would silently use 1D RoPE on 2D codes: refused before training.
    with pytest.raises(ConfigError, match=r"generator.grid"):
        train.run(compose_config(gpt_run + ["generator.grid=null"]))
    assert train.run(compose_config(gpt_run))["steps"] == 2
    generator = from_pretrained(tmp_path / "gpt" / "export")
    assert generator.config["grid"] == [4, 4]
    # 2D RoPE: token 4 sits at row 1, column 0, so the column half of its rotary angles is 0 (1D: 5 * freq)
    cos = generator.rope.cos  # (1 + 16, head_dim / 2)
    assert cos.shape[0] == 17 and torch.equal(cos[1 + 4, cos.shape[1] // 2 :], torch.ones(cos.shape[1] // 2))
    assert not torch.equal(cos[1 + 4, : cos.shape[1] // 2], torch.ones(cos.shape[1] // 2))
    assert (tmp_path / "gpt" / "grids" / "samples.png").is_file()  # sampled, decoded by the VQGAN


def test_fsdp_wraps_every_residual_and_attention_block():
    from tokenizers_vis.losses import ReconstructionLoss
    from training.fsdp import wrap_policy
    from training.tokenizer_module import TokenizerModule

    module = TokenizerModule(tiny(), ReconstructionLoss(perceptual_weight=0.0, gan_weight=0.0))
    policy = wrap_policy(module)
    assert policy._module_classes == {ResnetBlock, AttnBlock}
    units = set(policy._run_policy(module, set(), {}))
    blocks = {m for m in module.modules() if isinstance(m, ResnetBlock | AttnBlock)}
    # residual: encoder 3 levels x 1 + 2 in the middle, decoder 3 x 2 + 2; attention: encoder 1 + 1, decoder
    # 2 + 1; twice, with the EMA copy
    assert units == blocks and len(blocks) == 2 * ((3 + 2) + (6 + 2) + (1 + 1) + (2 + 1))
