"""Training losses for pixel-decoding tokenizers: perceptual (LPIPS on VGG16), PatchGAN hinge GAN, LeCam.

`ReconstructionLoss` is the single-stage TiTok recipe ("An Image is Worth 32 Tokens", Yu et al. 2024;
the same recipe as VQGAN, Esser et al. 2021): pixel L2 (or L1) + perceptual + hinge GAN with weight 0.1
that starts late + LeCam regularisation with weight 0.001. The tokenizer's own losses (VQ commitment and
codebook) are added by the training module, not here.

Deliberate choices, each the simplest faithful reading of the papers and reference code:

- Perceptual distance = LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a
  Perceptual Metric") on the torchvision VGG16 trunk. Weights are files named by config settings; a missing
  file is a `FileNotFoundError` that names the setting, never a download and never random weights. Without an
  LPIPS linear-layer file every channel weight is 1: LPIPS's own uncalibrated "baseline" (`lpips=False` in its
  code), i.e. per layer the spatial mean of 2 - 2 cos(f_x, f_y), so all five layers count equally. Its scale
  is a few times that of calibrated LPIPS; tune `perceptual_weight` accordingly.
- The perceptual loss runs in fp32 with autocast off: unit-normalising features is not safe in fp16.
- Its VGG/LPIPS weights are frozen parameters (not buffers: DDP would re-broadcast buffers every step), so
  they appear in the loss module's state dict under `perceptual.*`.
- Discriminator = taming's PatchGAN with GroupNorm instead of BatchNorm: per-sample statistics need no
  SyncBatchNorm under DDP and behave the same in train and eval (TiTok's own discriminator uses GroupNorm).
- Hinge losses as in taming / TiTok (D loss carries the factor 0.5); LeCam as in Tseng et al.'s code
  (per-element ReLU-clipped squares).
- The generator's GAN term does NOT toggle `requires_grad` on the discriminator (toggling confuses DDP's
  gradient buckets). Its backward therefore also writes gradients into the discriminator's parameters; the
  training module steps only the generator optimizer there and must `zero_grad()` the discriminator optimizer
  before the discriminator backward. Under DDP the discriminator is unused before `gan_start_step` (and the
  tokenizer is unused in the discriminator step), so the DDP strategy needs `find_unused_parameters=True`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ImageNet statistics of torchvision's VGG16, expressed for inputs in [-1, 1]: shift = 2 * mean - 1 and
# scale = 2 * std, which are LPIPS's ScalingLayer constants (-.030, -.088, -.188) / (.458, .448, .450).
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision vgg16 "D" config up to conv5_3; "M" = 2x2 max-pool.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Indices in `features` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, and their channel counts.
_VGG16_TAPS = (3, 8, 15, 22, 29)
_VGG16_TAP_CHANNELS = (64, 128, 256, 512, 512)


def _vgg16_features() -> nn.Sequential:
    """torchvision's `vgg16().features[:30]` rebuilt index for index, so state-dict keys match
    (`0.weight`, `2.weight`, ... `28.bias`) without building the 120M-parameter classifier."""
    layers: list[nn.Module] = []
    channels = 3
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, v, kernel_size=3, padding=1), nn.ReLU()]
            channels = v
    return nn.Sequential(*layers)


def _require_file(path: str | os.PathLike | None, setting_name: str, what: str, fix: str) -> Path:
    """The configured file, or a one-line FileNotFoundError that names the config setting."""
    if path is not None and Path(path).is_file():
        return Path(path)
    problem = "is not set" if path is None else "does not exist"
    shown = None if path is None else str(path)
    raise FileNotFoundError(
        f"{what}: {setting_name}={shown!r} {problem} (set {setting_name} to {fix}, "
        f"or module.loss.perceptual_weight=0 to turn the perceptual loss off)"
    )


def _load_tensors(path: Path) -> Mapping[str, Tensor]:
    """A flat name -> tensor dict from .safetensors or a torch.save'd state dict (weights_only, no pickle)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


class PerceptualLoss(nn.Module):
    """LPIPS distance (Zhang et al. 2018) on a frozen VGG16 trunk, averaged over the batch.

    For each of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: unit-normalise features along channels, take the
    squared difference, weight channels (LPIPS linear layers, or 1 each without a file), sum channels, average
    space; sum the five layers. Inputs are images in [-1, 1].

    Args:
        vgg_weights: torchvision vgg16 state dict (.pth/.pt or .safetensors). Every `features.*` key must be
            present with the right shape; `classifier.*` keys are ignored; anything else is an error.
        lpips_weights: optional LPIPS linear-layer file with exactly the keys `lin{0..4}.model.1.weight`,
            shapes (1, C, 1, 1).
        setting_name, lpips_setting_name: the config settings that hold these paths, named in errors.
    """

    def __init__(
        self,
        vgg_weights: str | os.PathLike | None,
        lpips_weights: str | os.PathLike | None = None,
        setting_name: str = "paths.vgg_weights",
        lpips_setting_name: str = "paths.lpips_weights",
    ):
        super().__init__()
        vgg_path = _require_file(
            vgg_weights,
            setting_name,
            "perceptual loss needs VGG16 weights",
            "a torchvision vgg16 state-dict file",
        )
        self.features = _vgg16_features()
        state = _load_tensors(vgg_path)
        stray = sorted(k for k in state if not k.startswith(("features.", "classifier.")))
        if stray:
            raise ValueError(f"{vgg_path} is not a torchvision vgg16 state dict: unexpected keys {stray[:5]}")
        trunk = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        try:
            self.features.load_state_dict(trunk, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{vgg_path} is not a torchvision vgg16 state dict: {err}") from err

        # Per-layer channel weights, (1, C, 1, 1) each.
        weights = [torch.ones(1, c, 1, 1) for c in _VGG16_TAP_CHANNELS]
        if lpips_weights is not None:
            lpips_path = _require_file(
                lpips_weights,
                lpips_setting_name,
                "LPIPS linear weights are missing",
                "an LPIPS vgg linear-layer file or null for uniform channel weights",
            )
            weights = self._load_lpips(lpips_path, weights)
        self.lins = nn.ParameterList(nn.Parameter(w) for w in weights)

        self.register_buffer("shift", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1) * 2 - 1, persistent=False)
        self.register_buffer("scale", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1) * 2, persistent=False)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def _load_lpips(path: Path, defaults: list[Tensor]) -> list[Tensor]:
        state = _load_tensors(path)
        expected = {f"lin{i}.model.1.weight": w.shape for i, w in enumerate(defaults)}
        found = {k: tuple(v.shape) for k, v in state.items()}
        if found != {k: tuple(s) for k, s in expected.items()}:
            raise ValueError(
                f"{path} is not an LPIPS vgg linear-layer file: expected {expected}, got {found}"
            )
        return [state[k].float() for k in expected]

    def train(self, mode: bool = True) -> PerceptualLoss:
        """Always eval: a frozen metric network must not change behaviour with the trainer's mode."""
        return super().train(False)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """(B, 3, H, W) x2 in [-1, 1] -> scalar mean LPIPS distance; gradients flow to both inputs."""
        with torch.autocast(device_type=input.device.type, enabled=False):
            x = torch.cat([input, target]).float()  # (2B, 3, H, W): one trunk pass for both
            x = (x - self.shift) / self.scale
            distance = x.new_zeros(input.shape[0])  # (B,)
            for i, layer in enumerate(self.features):
                x = layer(x)  # (2B, C, h, w)
                if i not in _VGG16_TAPS:
                    continue
                # vector_norm has a zero subgradient at 0 (dead ReLU columns), unlike LPIPS's sqrt(sum(x^2)).
                unit = x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + 1e-10)
                fx, fy = unit.chunk(2)  # (B, C, h, w) each
                weight = self.lins[_VGG16_TAPS.index(i)]  # (1, C, 1, 1)
                distance = distance + ((fx - fy).square() * weight).sum(1).mean((1, 2))
            return distance.mean()


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017 pix2pix, as used by taming-transformers' VQGAN).

    `num_layers` 4x4 stride-2 convs, then a 4x4 stride-1 conv and a 4x4 stride-1 conv to one logit channel:
    a (B, 1, H/2^L - 2, W/2^L - 2) map of per-patch real/fake logits (30x30 at 256px, 2x2 at 32px with the
    default L=3). All but the first conv are followed by GroupNorm (gcd(32, C) groups) instead of BatchNorm:
    DDP-safe and mode-independent. Channels double per layer up to 8x `base_channels`. Weights ~ N(0, 0.02),
    norm scales ~ N(1, 0.02), as in pix2pix.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.num_layers = num_layers

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [
                nn.Conv2d(c_in, c_out, 4, stride, 1, bias=False),
                nn.GroupNorm(math.gcd(32, c_out), c_out),
                nn.LeakyReLU(0.2),
            ]

        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        channels = base_channels
        for n in range(1, num_layers + 1):
            out = base_channels * min(2**n, 8)
            layers += block(channels, out, stride=2 if n < num_layers else 1)
            channels = out
        layers.append(nn.Conv2d(channels, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.GroupNorm):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)

    def output_size(self, size: int) -> int:
        """Side of the logit map for an input side `size` (<= 0: the input is too small)."""
        for _ in range(self.num_layers):
            size = size // 2  # 4x4, stride 2, padding 1
        return size - 2  # two 4x4, stride 1, padding 1 convs

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, 1, h, w) patch logits."""
        if min(self.output_size(x.shape[-2]), self.output_size(x.shape[-1])) < 1:
            raise ValueError(
                f"discriminator with {self.num_layers} stride-2 layers needs inputs of at least "
                f"{3 * 2**self.num_layers}px per side, got {tuple(x.shape[-2:])}; use fewer disc_layers"
            )
        return self.net(x)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss (Lim & Ye 2017) with taming/TiTok's 0.5: zero once real >= 1, fake <= -1."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """Generator side of the hinge GAN: raise the discriminator's logits on reconstructions."""
    return -logits_fake.mean()


class LeCam(nn.Module):
    """LeCam regularisation (Tseng et al. 2021, "Regularizing GANs under Limited Data").

    Keeps EMAs of the discriminator's mean output on real and fake images (buffers, so checkpoints carry them)
    and penalises real logits above the fake EMA and fake logits below the real EMA, which bounds how far the
    discriminator can separate the two and stabilises GAN training on small data. EMAs start at 0, without
    bias correction, as in the reference code. Under DDP the means are averaged over ranks before the
    update, so every rank holds the same EMAs: a checkpoint (rank 0's) then resumes every rank exactly,
    which per-rank EMAs would not (tests/test_resume.py).
    """

    def __init__(self, decay: float = 0.99):
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    @torch.no_grad()
    def update(self, logits_real: Tensor, logits_fake: Tensor) -> None:
        means = torch.stack([logits_real.detach().float().mean(), logits_fake.detach().float().mean()])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(means)
            means /= torch.distributed.get_world_size()
        self.ema_real.lerp_(means[0], 1.0 - self.decay)
        self.ema_fake.lerp_(means[1], 1.0 - self.decay)

    def penalty(self, logits_real: Tensor, logits_fake: Tensor) -> Tensor:
        """mean(relu(D(real) - ema_fake)^2) + mean(relu(ema_real - D(fake))^2); no gradient to the EMAs."""
        return (
            F.relu(logits_real - self.ema_fake).square().mean()
            + F.relu(self.ema_real - logits_fake).square().mean()
        )


class ReconstructionLoss(nn.Module):
    """TiTok single-stage decoder loss (pixel + perceptual + hinge GAN) and its discriminator loss (+ LeCam).

    Args:
        pixel_loss: "l2" (TiTok) or "l1"; weighted by `pixel_weight`.
        perceptual_weight: 0 turns the perceptual loss off; > 0 builds `PerceptualLoss(vgg_weights,
            lpips_weights)` now, so an unset or missing weights file fails before training starts.
        gan_weight: weight of the generator's hinge term (TiTok: 0.1); 0 means no discriminator at all.
        gan_start_step: from this global step on the generator gets the GAN term and the discriminator is
            trained (TiTok starts it late, after the reconstruction has converged somewhat).
        lecam_weight, lecam_decay: LeCam penalty weight (TiTok: 0.001) and its EMA decay.
        disc_channels, disc_layers: `NLayerDiscriminator` width and number of stride-2 layers.
        vgg_setting_name, lpips_setting_name: config settings named in missing-file errors.

    Logged values are unweighted and detached. See the module docstring for how the generator and
    discriminator steps must be wired under DDP.
    """

    def __init__(
        self,
        *,
        pixel_loss: str = "l2",
        pixel_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        vgg_weights: str | os.PathLike | None = None,
        lpips_weights: str | os.PathLike | None = None,
        gan_weight: float = 0.1,
        gan_start_step: int = 20_000,
        lecam_weight: float = 0.001,
        lecam_decay: float = 0.99,
        disc_channels: int = 64,
        disc_layers: int = 3,
        vgg_setting_name: str = "paths.vgg_weights",
        lpips_setting_name: str = "paths.lpips_weights",
    ):
        super().__init__()
        pixel_losses = {"l1": F.l1_loss, "l2": F.mse_loss}
        if pixel_loss not in pixel_losses:
            raise ValueError(f"pixel_loss must be one of {sorted(pixel_losses)}, got {pixel_loss!r}")
        self.pixel_fn = pixel_losses[pixel_loss]
        self.pixel_weight = pixel_weight
        self.perceptual_weight = perceptual_weight
        self.gan_weight = gan_weight
        self.gan_start_step = gan_start_step
        self.lecam_weight = lecam_weight

        self.perceptual = (
            PerceptualLoss(vgg_weights, lpips_weights, vgg_setting_name, lpips_setting_name)
            if perceptual_weight > 0
            else None
        )
        if gan_weight > 0:
            self.discriminator = NLayerDiscriminator(3, disc_channels, disc_layers)
            self.lecam = LeCam(lecam_decay)
        else:
            self.discriminator = None
            self.lecam = None

    @property
    def perceptual_on(self) -> bool:
        return self.perceptual is not None

    def discriminator_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.gan_start_step

    def generator_loss(
        self, images: Tensor, reconstructions: Tensor, step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(B, 3, H, W) targets and reconstructions in [-1, 1] -> (total, logs).

        Logs: pixel, perceptual (when on), gan_g (0 before gan_start_step or without GAN), total.
        """
        pixel = self.pixel_fn(reconstructions, images)
        total = self.pixel_weight * pixel
        logs = {"pixel": pixel.detach()}
        if self.perceptual is not None:
            perceptual = self.perceptual(reconstructions, images)
            total = total + self.perceptual_weight * perceptual
            logs["perceptual"] = perceptual.detach()
        gan_g = torch.zeros((), device=images.device)
        if self.discriminator_active(step):
            gan_g = hinge_g_loss(self.discriminator(reconstructions))  # also fills D grads (module docstring)
            total = total + self.gan_weight * gan_g
        logs["gan_g"] = gan_g.detach()
        logs["total"] = total.detach()
        return total, logs

    def discriminator_loss(
        self, images: Tensor, reconstructions: Tensor, step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Hinge D loss + lecam_weight * LeCam on real images vs detached reconstructions.

        Call only when `discriminator_active(step)`; otherwise it raises rather than silently training early.
        In training mode it also updates the LeCam EMAs (after computing the penalty against the old ones).
        """
        if not self.discriminator_active(step):
            raise RuntimeError(
                f"discriminator_loss called at step {step} but the discriminator is inactive "
                f"(gan_weight={self.gan_weight}, gan_start_step={self.gan_start_step}); "
                "check discriminator_active(step) first"
            )
        logits = self.discriminator(torch.cat([images.detach(), reconstructions.detach()]))  # (2B, 1, h, w)
        logits_real, logits_fake = logits.chunk(2)  # (B, 1, h, w) each
        gan_d = hinge_d_loss(logits_real, logits_fake)
        lecam = self.lecam.penalty(logits_real, logits_fake)
        total = gan_d + self.lecam_weight * lecam
        if self.training:
            self.lecam.update(logits_real, logits_fake)
        logs = {
            "gan_d": gan_d.detach(),
            "lecam": lecam.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        return total, logs
