"""Tests for tokenizers_vis/losses.py: perceptual loss, PatchGAN, hinge losses, LeCam, ReconstructionLoss."""

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from tokenizers_vis.losses import (
    LeCam,
    NLayerDiscriminator,
    PerceptualLoss,
    ReconstructionLoss,
    hinge_d_loss,
    hinge_g_loss,
)


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A random-init state dict in torchvision's vgg16 layout (features from torchvision itself), plus a
    classifier key that the loader must ignore. The real classifier is skipped: 500 MB for nothing."""
    torch.manual_seed(0)
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.6.bias"] = torch.zeros(1000)
    path = tmp_path_factory.mktemp("weights") / "vgg16.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def perceptual(vgg_file):
    return PerceptualLoss(vgg_file)


def images(n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


# ---- perceptual -------------------------------------------------------------------------------------------


def test_perceptual_zero_for_identical_positive_for_different(perceptual):
    x, y = images(seed=0), images(seed=1)
    assert perceptual(x, x.clone()).item() == 0.0
    assert perceptual(x, y).item() > 0.0
    assert perceptual(x, y).shape == ()


def test_perceptual_gradient_reaches_input_and_parameters_are_frozen(perceptual):
    x = images(seed=0).requires_grad_(True)
    perceptual(x, images(seed=1)).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    params = list(perceptual.parameters())
    assert len(params) == 13 * 2 + 5  # 13 convs (weight, bias) + 5 LPIPS channel weights
    assert not any(p.requires_grad for p in params)
    assert all(p.grad is None for p in params)


def test_perceptual_stays_in_eval_mode(perceptual):
    perceptual.train()
    assert not perceptual.training
    assert not any(m.training for m in perceptual.modules())
    wrapper = torch.nn.ModuleDict({"p": perceptual}).train()
    assert wrapper.training and not perceptual.training


def test_perceptual_loads_safetensors_and_lpips_weights(vgg_file, perceptual, tmp_path):
    state = torch.load(vgg_file, weights_only=True)
    sft = tmp_path / "vgg16.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, sft)
    x, y = images(seed=0), images(seed=1)
    assert torch.allclose(PerceptualLoss(sft)(x, y), perceptual(x, y))

    # LPIPS linear weights of all ones reproduce the uniform default; halving them halves the distance.
    channels = (64, 128, 256, 512, 512)
    lpips = tmp_path / "lpips_vgg.pth"
    torch.save(
        {f"lin{i}.model.1.weight": torch.full((1, c, 1, 1), 0.5) for i, c in enumerate(channels)}, lpips
    )
    assert torch.allclose(PerceptualLoss(vgg_file, lpips)(x, y), 0.5 * perceptual(x, y))


def test_perceptual_rejects_mismatched_files(vgg_file, tmp_path):
    state = torch.load(vgg_file, weights_only=True)
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in state.items() if k != "features.28.weight"}, partial)
    with pytest.raises(ValueError, match="features.28.weight|28.weight"):
        PerceptualLoss(partial)
    foreign = tmp_path / "foreign.pth"
    torch.save({**state, "net.slice1.0.weight": torch.zeros(1)}, foreign)
    with pytest.raises(ValueError, match="unexpected"):
        PerceptualLoss(foreign)
    bad_lpips = tmp_path / "lpips.pth"
    torch.save({"lin0.model.1.weight": torch.ones(1, 64, 1, 1)}, bad_lpips)
    with pytest.raises(ValueError, match="LPIPS"):
        PerceptualLoss(vgg_file, bad_lpips)


def test_missing_weights_error_names_the_setting(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="paths.vgg_weights") as err:
        PerceptualLoss(missing)
    assert str(missing) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="model.vgg"):
        PerceptualLoss(missing, setting_name="model.vgg")
    with pytest.raises(FileNotFoundError, match="paths.vgg_weights"):
        ReconstructionLoss(perceptual_weight=1.0, vgg_weights=None, gan_weight=0.0)
    with pytest.raises(FileNotFoundError, match="paths.vgg_weights"):
        ReconstructionLoss(perceptual_weight=1.0, vgg_weights=missing, gan_weight=0.0)


# ---- discriminator and GAN losses --------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "layers", "side"), [(32, 3, 2), (64, 3, 6), (256, 3, 30), (32, 2, 6)])
def test_discriminator_output_shape(size, layers, side):
    disc = NLayerDiscriminator(base_channels=8, num_layers=layers)
    out = disc(images(n=2, size=size))
    assert out.shape == (2, 1, side, side)
    assert disc.output_size(size) == side


def test_discriminator_too_small_input_is_a_clear_error():
    with pytest.raises(ValueError, match="disc_layers"):
        NLayerDiscriminator(base_channels=8, num_layers=4)(images(size=32))


def test_hinge_losses_known_values():
    two = torch.full((4, 1, 2, 2), 2.0)
    assert hinge_d_loss(two, -two).item() == 0.0  # confident and correct: no loss
    assert hinge_d_loss(-two, two).item() == pytest.approx(3.0)  # 0.5 * (3 + 3)
    assert hinge_d_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(1.0)
    assert hinge_g_loss(two).item() == -2.0


def test_lecam_penalty_and_ema_buffers():
    lecam = LeCam(decay=0.9)
    real, fake = torch.full((2, 1, 2, 2), 2.0), torch.full((2, 1, 2, 2), -2.0)
    assert lecam.penalty(real, fake).item() == pytest.approx(8.0)  # relu(2 - 0)^2 + relu(0 + 2)^2
    assert set(lecam.state_dict()) == {"ema_real", "ema_fake"}
    lecam.update(real, fake)
    assert lecam.ema_real.item() == pytest.approx(0.2) and lecam.ema_fake.item() == pytest.approx(-0.2)
    for _ in range(100):
        lecam.update(real, fake)
    assert lecam.ema_real.item() == pytest.approx(2.0, abs=1e-3)
    assert lecam.ema_fake.item() == pytest.approx(-2.0, abs=1e-3)
    assert lecam.penalty(real, fake).item() == pytest.approx(32.0, rel=1e-3)  # (2 + 2)^2 * 2


# ---- ReconstructionLoss ------------------------------------------------------------------------------------


def small_loss(**kwargs):
    torch.manual_seed(0)
    defaults = dict(perceptual_weight=0.0, disc_channels=8, gan_start_step=3)
    return ReconstructionLoss(**{**defaults, **kwargs})


def test_generator_loss_terms_and_perceptual_switch(vgg_file):
    x, y = images(seed=0), images(seed=1)
    off = small_loss(pixel_loss="l1")
    assert not off.perceptual_on
    total, logs = off.generator_loss(x, y, step=0)
    assert set(logs) == {"pixel", "gan_g", "total"}
    assert logs["pixel"].item() == pytest.approx((x - y).abs().mean().item())
    assert torch.equal(total.detach(), logs["total"])

    on = small_loss(perceptual_weight=0.5, vgg_weights=vgg_file)
    assert on.perceptual_on
    on.train()
    assert not on.perceptual.training
    total, logs = on.generator_loss(x, y, step=0)
    assert set(logs) == {"pixel", "perceptual", "gan_g", "total"}
    assert logs["pixel"].item() == pytest.approx((x - y).square().mean().item())
    assert total.item() == pytest.approx(logs["pixel"].item() + 0.5 * logs["perceptual"].item(), rel=1e-5)


def test_gan_start_step_gating():
    loss = small_loss(gan_weight=0.1, gan_start_step=3)
    x, y = images(seed=0), images(seed=1).requires_grad_(True)
    assert not loss.discriminator_active(2) and loss.discriminator_active(3)

    total, logs = loss.generator_loss(x, y, step=2)
    assert logs["gan_g"].item() == 0.0
    total.backward()
    assert all(p.grad is None for p in loss.discriminator.parameters())  # D not even run
    with pytest.raises(RuntimeError, match="gan_start_step"):
        loss.discriminator_loss(x, y, step=2)

    total, logs = loss.generator_loss(x, y, step=3)
    assert logs["gan_g"].item() != 0.0
    assert total.item() == pytest.approx(logs["pixel"].item() + 0.1 * logs["gan_g"].item(), rel=1e-5)
    d_total, d_logs = loss.discriminator_loss(x, y, step=3)
    assert set(d_logs) == {"gan_d", "lecam", "logits_real", "logits_fake"}
    assert d_total.requires_grad


def test_no_discriminator_when_gan_weight_is_zero():
    loss = small_loss(gan_weight=0.0, gan_start_step=0)
    assert loss.discriminator is None
    assert not loss.discriminator_active(0) and not loss.discriminator_active(10**9)
    _, logs = loss.generator_loss(images(seed=0), images(seed=1), step=10)
    assert logs["gan_g"].item() == 0.0
    with pytest.raises(RuntimeError, match="inactive"):
        loss.discriminator_loss(images(seed=0), images(seed=1), step=10)


def test_discriminator_steps_widen_the_logit_gap_and_move_lecam():
    loss = small_loss(gan_start_step=0, lecam_decay=0.9).train()
    assert {"lecam.ema_real", "lecam.ema_fake"} <= set(loss.state_dict())
    real = torch.linspace(-1, 1, 32).view(1, 1, 1, 32).expand(4, 3, 32, 32)  # smooth ramps
    fake = images(n=4, seed=2).requires_grad_(True)  # noise, standing in for reconstructions
    opt = torch.optim.Adam(loss.discriminator.parameters(), lr=2e-3, betas=(0.5, 0.9))

    gaps = []
    for _ in range(8):
        opt.zero_grad()
        total, logs = loss.discriminator_loss(real, fake, step=0)
        total.backward()
        opt.step()
        gaps.append((logs["logits_real"] - logs["logits_fake"]).item())
    assert fake.grad is None  # reconstructions are detached inside
    assert gaps[-1] > gaps[0] + 0.1
    # The EMAs followed the observed means: real above fake, both away from their zero start.
    assert loss.lecam.ema_real.item() > loss.lecam.ema_fake.item()
    assert loss.lecam.ema_real.item() != 0.0

    ema = loss.lecam.ema_real.clone()
    loss.eval()
    loss.discriminator_loss(real, fake, step=0)
    assert torch.equal(loss.lecam.ema_real, ema)  # no EMA update outside training
