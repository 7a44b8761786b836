"""TokenBridge: "Bridging Continuous and Discrete Tokens for Autoregressive Visual Generation" (Wang et al.,
2025). arXiv 2503.16430; official code: YuqingWang1029/TokenBridge.

A continuous KL autoencoder is trained as usual; discreteness comes afterwards, with no training: each latent
channel is quantised on its own into 2^B bins whose edges are equal-probability quantiles of a standard
normal. A token is then C small integers, one per channel (a "dimwise" token), and a generator predicts them
one channel after another (generators/dimwise_head.py).

    images -> encoder -> mean, logvar (B, N, C) -> z = mean (+ noise in training) -> decoder -> images
    after training:   z (B, N, C) -> per channel: normalise, clamp to [-3, 3], find the Gaussian bin
                      -> bins long (B, N, C) -> bin value (truncated-normal mean) -> latents -> decoder

Two variants (`encoder`):
- "titok": TiTok's ViT encoder and decoder (titok.py, imported): N 1D latent tokens of C channels;
  `decode(tokens, num_tokens=k)` decodes a k-token prefix, as TiTok does.
- "conv": a small convolutional autoencoder that downsamples by `patch_size` (a power of two): a grid of
  (H / f) x (W / f) tokens of C channels, row-major; `token_spec.grid` and `Tokens.grid` hold (h, w). Here
  `width` is the channel count (default 128) and `depth` the residual blocks per resolution (default 1);
  `num_tokens` follows from the grid (leave it null or give the same number).

Deliberate choices:
- KL bottleneck as in LDM (Rombach et al. 2022): the encoder outputs a mean and a log-variance (clamped to
  [-30, 20]) per channel; training decodes the reparameterised sample mean + exp(logvar / 2) * eps, while eval
  mode, `encode` and the quantiser use the mean. KL = 0.5 * sum over (N, C) of (mean^2 + var - 1 - logvar),
  per image (LDM's sum), averaged over the batch; its loss is `kl_weight` * KL with kl_weight = 1e-6, LDM's
  value. LDM's pixel loss is also a per-image sum whereas ours is a per-pixel mean, so the same weight pulls
  3HW times harder here, yet it stays a weak regulariser (`losses["kl"]`, the weighted term, is logged).
- Quantisation range: measured per channel. `fit_quantizer` measures each channel's mean and standard
  deviation over the posterior means of training images (pooled over token positions); a latent x maps to
  z = (x - mean) / std, so [mean - 3 std, mean + 3 std] becomes [-3, 3] standard-normal units. Our
  autoencoders are trained from scratch with a weak KL term, so a channel's scale and offset are whatever
  training made them: a fixed range would waste bins or clip. `quant_range = r` instead uses the official
  fixed range [-r, r] -> [-3, 3] for every channel (official r = 5, no centring); that quantiser needs no data
  and counts as fitted from construction.
- Bins (official construction): edges at the standard-normal quantiles Phi^-1(k / 2^B), k = 0..2^B, clamped
  to [-3, 3] (so the outer bins are [-3, q_1] and [q_(L-1), 3]); normalised values are clamped to [-3, 3].
  A bin's value is the mean of the standard normal truncated to it, (phi(a) - phi(b)) / (Phi(b) - Phi(a)),
  computed in float64. Dequantisation maps it back: x = mean + std * value.
- Assignment by bin membership (the bin whose edges enclose the value), so under a standard normal every bin
  is exactly equally likely (clamping to [-3, 3] moves no value out of its bin: it only makes the outer bins'
  values the means over [-3, q_1] and [q_(L-1), 3]). The official code picks the nearest bin value instead,
  which moves the decision points off the quantiles, so its bins are not equiprobable.
- 6 bits (64 bins) per channel by default: the paper's "near-lossless" setting.
- The quantiser's edges, values, per-channel centre and scale and a `fitted` flag are buffers, so checkpoints
  and the safetensors export carry them; config.json's informative "quantizer" entry says whether the
  export is fitted. `encode` on an unfitted tokenizer raises and says how to fit it.
- `forward` returns the continuous reconstruction (training never sees the quantiser); `stats["codes"]` are
  the bins under the fitted quantiser or, before fitting, under the batch's own per-channel statistics, so
  the validation histogram (usage, perplexity of the 2^B bins) means something during training too.
- `prepare_export(batches)` fits the quantiser on (up to `fit_images`) training images and reports the
  continuous and quantised PSNR; the tokenizer training module calls it at export, so `train.py` ends with a
  fitted export. scripts/fit_tokenbridge.py refits an existing export.
- `code_vectors()` raises: there is no codebook (2^(B C) codes per token).

Size presets (1D variant) are TiTok's: `TokenBridge.from_preset("L-32", latent_channels=16)`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from tqdm import tqdm

from .adaptive import psnr
from .base import Tokenizer, Tokens, TokenSpec, register
from .titok import TiTokDecoder, TiTokEncoder, titok_shape

ENCODERS = ("titok", "conv")
STD_RANGE = 3.0  # the normalised range [-3, 3], in standard deviations


# ---------------------------------------------------------------------------------------- quantiser


def gaussian_bins(bits: int, std_range: float = STD_RANGE) -> tuple[torch.Tensor, torch.Tensor]:
    """Equal-probability standard-normal bins: edges (2^B + 1,) clamped to [-r, r] and values (2^B,), the
    means of the standard normal truncated to each bin. Computed in float64, returned as float32."""
    levels = 2**bits
    probs = torch.arange(levels + 1, dtype=torch.float64) / levels
    edges = torch.special.ndtri(probs).clamp(-std_range, std_range)  # (L + 1,), ndtri(0) = -inf -> -r
    a, b = edges[:-1], edges[1:]  # (L,) each
    pdf = lambda x: torch.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)
    cdf = torch.special.ndtr
    values = (pdf(a) - pdf(b)) / (cdf(b) - cdf(a))  # E[Z | a < Z < b], Z ~ N(0, 1)
    return edges.float(), values.float()


class DimwiseGaussianQuantizer(nn.Module):
    """Per-channel post-training quantiser: latents (..., C) <-> bins long (..., C) in [0, 2^B)."""

    def __init__(self, channels: int, bits: int = 6, quant_range: float | None = None):
        super().__init__()
        if not 1 <= bits <= 16:
            raise ValueError(f"TokenBridge bits={bits}; expected 1 to 16 bits per channel")
        if quant_range is not None and quant_range <= 0:
            raise ValueError(f"TokenBridge quant_range={quant_range}; expected > 0 or null (measured)")
        self.channels, self.bits, self.quant_range = channels, bits, quant_range
        edges, values = gaussian_bins(bits)
        self.register_buffer("edges", edges)  # (2^B + 1,) in normalised units
        self.register_buffer("values", values)  # (2^B,) in normalised units
        fixed = quant_range is not None  # official fixed range: x in [-r, r] -> [-3, 3], nothing to measure
        self.register_buffer("center", torch.zeros(channels))  # (C,) latent units
        scale = quant_range / STD_RANGE if fixed else 1.0
        self.register_buffer("scale", torch.full((channels,), float(scale)))  # (C,) latent units per sigma
        self.register_buffer("fitted", torch.tensor(fixed))

    @property
    def levels(self) -> int:
        return 2**self.bits

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted)

    def set_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Fit from measured per-channel statistics (C,) each; a fixed-range quantiser keeps its range."""
        if self.quant_range is None:
            self.center.copy_(mean)
            self.scale.copy_(std.clamp_min(1e-8))
        self.fitted.fill_(True)

    def normalize(self, latents: torch.Tensor, center=None, scale=None) -> torch.Tensor:
        """latents (..., C) -> standard-normal units clamped to [-3, 3]."""
        center = self.center if center is None else center
        scale = self.scale if scale is None else scale
        return ((latents.float() - center) / scale).clamp(-STD_RANGE, STD_RANGE)

    def bins_of(self, normalized: torch.Tensor) -> torch.Tensor:
        """Normalised values (..., C) -> the bin enclosing each, long in [0, 2^B)."""
        return torch.bucketize(normalized.contiguous(), self.edges[1:-1])

    def quantize(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (..., C) -> bins long (..., C); the quantiser must be fitted."""
        if not self.is_fitted:
            raise RuntimeError(
                "TokenBridge's quantiser is not fitted: fit it on training images first "
                "(python scripts/fit_tokenbridge.py tokenizer_path=<export>, or tokenizer.fit_quantizer(...))"
            )
        return self.bins_of(self.normalize(latents))

    def dequantize(self, bins: torch.Tensor) -> torch.Tensor:
        """bins long (..., C) -> latents (..., C): each bin's truncated-normal mean in latent units."""
        return self.center + self.scale * self.values[bins]


# ---------------------------------------------------------------------------------- conv autoencoder


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(
            _group_norm(channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            _group_norm(channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class ConvEncoder(nn.Module):
    """images (B, 3, H, W) -> (B, h * w, out_dim), h = H / factor: a stem, then per halving a stride-2 conv
    and `depth` residual blocks, then GroupNorm, SiLU and a 1x1 conv."""

    def __init__(self, factor: int, width: int, depth: int, out_dim: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1)]
        for _ in range(int(math.log2(factor))):
            layers += [
                nn.Conv2d(width, width, 4, stride=2, padding=1),
                *[ResBlock(width) for _ in range(depth)],
            ]
        layers += [_group_norm(width), nn.SiLU(), nn.Conv2d(width, out_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h * w, D)


class ConvDecoder(nn.Module):
    """latents (B, h * w, C) -> images (B, 3, H, W): the mirror of ConvEncoder (nearest upsampling + conv)."""

    def __init__(self, factor: int, width: int, depth: int, latent_dim: int, grid: tuple[int, int]):
        super().__init__()
        self.grid = grid
        layers: list[nn.Module] = [nn.Conv2d(latent_dim, width, 3, padding=1)]
        layers += [ResBlock(width) for _ in range(depth)]
        for _ in range(int(math.log2(factor))):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, width, 3, padding=1)]
            layers += [ResBlock(width) for _ in range(depth)]
        layers += [_group_norm(width), nn.SiLU(), nn.Conv2d(width, 3, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        h, w = self.grid
        if latents.shape[1] != h * w:
            raise ValueError(f"the conv decoder needs all {h * w} tokens of its {h}x{w} grid")
        return self.net(latents.transpose(1, 2).unflatten(2, (h, w)))  # (B, C, h, w) -> (B, 3, H, W)


# ----------------------------------------------------------------------------------------- tokenizer


@register("tokenbridge")
class TokenBridge(Tokenizer):
    fsdp_blocks = (ResBlock,)

    def __init__(
        self,
        image_size: int = 256,
        patch_size: int = 16,
        encoder: str = "titok",
        size: str = "B",
        width: int | None = None,
        depth: int | None = None,
        heads: int | None = None,
        num_tokens: int | None = 64,
        latent_channels: int = 16,
        kl_weight: float = 1e-6,
        bits: int = 6,
        quant_range: float | None = None,
        fit_images: int = 10000,
    ):
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"TokenBridge encoder={encoder!r}; expected one of {ENCODERS}")
        if image_size % patch_size:
            raise ValueError(
                f"TokenBridge image_size={image_size} is not a multiple of patch_size={patch_size}"
            )
        grid = None
        if encoder == "titok":
            if not num_tokens:
                raise ValueError("TokenBridge encoder=titok needs num_tokens (the 1D sequence length)")
            shape = titok_shape(type(self).__name__, image_size, patch_size, size, width, depth, heads)
        else:
            if patch_size & (patch_size - 1):
                raise ValueError(
                    f"TokenBridge encoder=conv needs a power-of-two patch_size, got {patch_size}"
                )
            width, depth = width or 128, depth or 1
            side = image_size // patch_size
            grid = (side, side)
            if num_tokens not in (None, side * side):
                raise ValueError(
                    f"TokenBridge encoder=conv has a {side}x{side} grid = {side * side} tokens "
                    f"(image_size / patch_size); got num_tokens={num_tokens}: set it to null or {side * side}"
                )
            num_tokens = side * side
        self.num_tokens = num_tokens  # the conv encoder's grid fixes it
        self.grid = grid
        channels = latent_channels
        if encoder == "titok":
            shape.update(num_tokens=num_tokens)
            self.encoder = TiTokEncoder(**shape, code_dim=2 * channels)  # mean and logvar per channel
            self.decoder = TiTokDecoder(**shape, code_dim=channels)
        else:
            self.encoder = ConvEncoder(patch_size, width, depth, 2 * channels)
            self.decoder = ConvDecoder(patch_size, width, depth, channels, grid)
        self.quantizer = DimwiseGaussianQuantizer(channels, bits, quant_range)
        self.last_fit: dict | None = None  # the latest fit's report, written into config.json (informative)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> TokenBridge:
        """ "L-32" -> the 1D variant, TiTok size L with 32 tokens; keyword arguments override the rest."""
        size, num_tokens = name.split("-")
        return cls(size=size, num_tokens=int(num_tokens), **overrides)

    @property
    def token_spec(self) -> TokenSpec:
        c = self.config
        channels = c["latent_channels"]
        return TokenSpec(
            "dimwise",
            self.num_tokens,
            grid=self.grid,
            vocab_size=2 ** c["bits"],
            code_dim=channels,
            token_dim=channels,
        )

    def export_metadata(self) -> dict:
        quantizer = {
            "fitted": self.quantizer.is_fitted,
            "bits": self.config["bits"],
            "range": "measured: per-channel mean +- 3 std"
            if self.config["quant_range"] is None
            else f"fixed: [-{self.config['quant_range']}, {self.config['quant_range']}]",
        }
        if self.last_fit is not None:
            quantizer["fit"] = {k: v for k, v in self.last_fit.items() if isinstance(v, int | float)}
        return {**super().export_metadata(), "quantizer": quantizer}

    def code_vectors(self) -> torch.Tensor:
        raise NotImplementedError(
            "TokenBridge has no codebook: a token is C independently quantised channels (2^(B*C) values), so "
            "there are no code vectors; samplers and perturbations that need a codebook do not apply"
        )

    # ---- continuous autoencoder

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) -> mean, logvar (B, N, C) each."""
        mean, logvar = self.encoder(images).chunk(2, dim=-1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> continuous latents (B, N, C): the posterior mean."""
        return self.posterior(images)[0]

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, k, C) -> images (B, 3, H, W); k < N (a prefix) only for the 1D variant."""
        return self.decoder(latents.to(self.quantizer.center.dtype))

    def forward(self, images: torch.Tensor):
        """images (B, 3, H, W) -> (reconstructions (B, 3, H, W), losses {"kl"}, stats); see the docstring."""
        mean, logvar = self.posterior(images)  # (B, N, C) each
        latents = mean
        if self.training:
            latents = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        reconstructions = self.decode_latents(latents)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean()  # nats per image
        with torch.no_grad():
            values = mean.detach().float()
            if self.quantizer.is_fitted:
                codes = self.quantizer.quantize(values)
            else:  # provisional: the batch's own per-channel statistics
                flat = values.flatten(0, -2)
                codes = self.quantizer.bins_of(
                    self.quantizer.normalize(values, flat.mean(0), flat.std(0, correction=0).clamp_min(1e-8))
                )
        stats = {"codes": codes, "kl": kl.detach(), "posterior_std": torch.exp(0.5 * logvar).mean().detach()}
        return reconstructions, {"kl": self.config["kl_weight"] * kl}, stats

    # ---- discrete tokens

    def encode(self, images: torch.Tensor) -> Tokens:
        """images (B, 3, H, W) -> Tokens("dimwise", bins long (B, N, C)); needs a fitted quantiser."""
        return Tokens("dimwise", self.quantizer.quantize(self.encode_latents(images)), grid=self.grid)

    def decode(self, tokens: Tokens, num_tokens: int | None = None) -> torch.Tensor:
        """Tokens with bins (B, N, C) -> images (B, 3, H, W); the 1D variant decodes the first num_tokens."""
        bins = tokens.data
        channels = self.config["latent_channels"]
        if bins.dim() != 3 or bins.shape[-1] != channels:
            raise ValueError(f"TokenBridge decodes bins (B, N, {channels}); got shape {tuple(bins.shape)}")
        if num_tokens is not None and num_tokens != bins.shape[1]:
            if self.grid is not None:
                raise ValueError("TokenBridge encoder=conv decodes whole grids only (num_tokens=None)")
            bins = bins[:, :num_tokens]  # (B, k, C)
        return self.decode_latents(self.quantizer.dequantize(bins.long()))

    # ---- fitting the quantiser

    @torch.no_grad()
    def fit_quantizer(
        self,
        source: torch.Tensor | Iterable,
        max_images: int | None = None,
        progress: bool = False,
        check_images: int = 256,
    ) -> dict:
        """Measure each channel's mean and std and fit the quantiser; returns a report.

        source: latents (..., C) (posterior means), or an iterable of image batches (tensors (B, 3, H, W) or
        dicts with "image"), of which the first `max_images` (default `fit_images`) are encoded. With images,
        the report also holds the mean PSNR of the continuous and the quantised reconstructions of the first
        `check_images` of them (psnr_continuous, psnr_quantized, psnr_loss = their difference, in dB).
        """
        channels = self.config["latent_channels"]
        device = self.quantizer.center.device
        total = torch.zeros(channels, dtype=torch.float64, device=device)
        squares = torch.zeros_like(total)
        count, images_seen, kept = 0, 0, []

        def accumulate(latents: torch.Tensor) -> None:
            nonlocal total, squares, count
            flat = latents.reshape(-1, channels).double()  # (M, C)
            total += flat.sum(0)
            squares += flat.pow(2).sum(0)
            count += flat.shape[0]

        was_training = self.training
        self.eval()
        try:
            if isinstance(source, torch.Tensor):
                if source.shape[-1] != channels:
                    raise ValueError(
                        f"latents must end with C={channels} channels; got {tuple(source.shape)}"
                    )
                accumulate(source.to(device))
            else:
                limit = max_images or self.config["fit_images"]
                try:  # a data loader over a finite dataset: show that size when it is the smaller
                    limit_shown = min(limit, len(source.dataset))
                except (AttributeError, TypeError):
                    limit_shown = limit
                bar = tqdm(
                    total=limit_shown,
                    desc="fitting the TokenBridge quantiser",
                    unit="img",
                    disable=not progress,
                )
                for batch in source:
                    images = batch["image"] if isinstance(batch, dict) else batch
                    images = images[: limit - images_seen].to(device)  # (b, 3, H, W)
                    accumulate(self.encode_latents(images))
                    if sum(len(x) for x in kept) < check_images:
                        kept.append(images[: check_images - sum(len(x) for x in kept)])
                    images_seen += len(images)
                    bar.update(len(images))
                    if images_seen >= limit:
                        break
                bar.close()
            if count == 0:
                raise ValueError("fit_quantizer got no latents")
            mean = total / count
            std = (squares / count - mean.pow(2)).clamp_min(0).sqrt()
            self.quantizer.set_statistics(mean.float(), std.float())
            report = {"images": images_seen, "latents": count, "mean": mean.float(), "std": std.float()}
            if kept:
                report.update(self.quantization_psnr(torch.cat(kept)))
        finally:
            self.train(was_training)
        self.last_fit = report
        return report

    @torch.no_grad()
    def quantization_psnr(self, images: torch.Tensor) -> dict:
        """Mean PSNR (dB) of the continuous and of the quantised reconstructions of images (B, 3, H, W)."""
        latents = self.encode_latents(images)
        continuous = psnr(self.decode_latents(latents), images).mean().item()
        quantized = psnr(self.decode(self.encode(images)), images).mean().item()
        return {
            "psnr_continuous": continuous,
            "psnr_quantized": quantized,
            "psnr_loss": continuous - quantized,
        }

    def prepare_export(self, batches: Iterable) -> dict:
        """The post-training step run before export (training/tokenizer_module.py): fit the quantiser on up
        to `fit_images` training images. Returns the fit's report (numbers only)."""
        report = self.fit_quantizer(batches)
        return {k: v for k, v in report.items() if isinstance(v, int | float)}
