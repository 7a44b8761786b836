"""2D VQGAN, LlamaGen's "VQ-16": the baseline grid tokenizer of "Autoregressive Model Beats Diffusion: Llama
for Scalable Image Generation" (Sun et al., 2024), in the taming-transformers (Esser et al. 2021) and MaskGIT
line, with the l2-normalised low-dimensional codebook of ViT-VQGAN (Yu et al. 2022).

    images (B, 3, H, W) -> encoder -> (B, z, h, w) -> quant_conv 1x1 -> (B, D, h, w) -> row-major (B, h*w, D)
      -> quantize (l2-normalised, nearest code) -> codes (B, h*w) long, h = H / f, f = 2^(len(ch_mult) - 1)
      -> code vectors (B, h*w, D) -> (B, D, h, w) -> post_quant_conv 1x1 -> decoder -> images (B, 3, H, W)

Architecture (LlamaGen's tokenizer/tokenizer_image/vq_model.py, rebuilt module for module):
- Encoder: a 3x3 conv to `width` channels; per level i, `num_res_blocks` residual blocks to width * ch_mult[i]
  channels (GroupNorm, swish, 3x3 conv, twice; a 1x1 `nin_shortcut` when the channel count changes), a
  self-attention block after each of them at the last (lowest-resolution) level only, and, except at the last
  level, a downsampling conv (zero padding on the right and bottom, then 3x3 stride 2); a middle of
  residual, attention, residual; GroupNorm, swish and a 3x3 conv to `z_channels`.
- Decoder: the mirror: 3x3 conv from z_channels, the same middle, then the levels from the lowest
  resolution up, each with num_res_blocks + 1 residual blocks (attention after each at the lowest level) and
  a nearest x2 upsampling followed by a 3x3 conv (except at the full-resolution level); GroupNorm, swish,
  3x3 conv to RGB.
- Attention: one head over the h*w positions, 1x1 convs for q, k, v and the output projection, scale
  C^-1/2, residual (computed with scaled_dot_product_attention: the same function as LlamaGen's bmm/softmax).
- `quant_conv` (z_channels -> code_dim) and `post_quant_conv` (code_dim -> z_channels) are 1x1 convs.

Quantiser: codebook 16384 x 8, codes and encoder outputs l2-normalised before the nearest-code lookup
(cosine similarity), loss = codebook ||q - sg(z)||^2 + 0.25 * commitment ||sg(q) - z||^2 on the normalised
vectors, straight-through gradient, optional entropy loss (LlamaGen's `entropy_loss_ratio`, default 0): the
softmax over codes of -distance / 0.01, weight * (mean per-position entropy - entropy of the batch-mean
distribution), in training mode only. It is the project's VectorQuantizer (quantizers.py: same losses, fp32
outside autocast, usage and perplexity stats, optional dead-code restarts), subclassed only to (a) register
the codebook under LlamaGen's name `embedding` instead of `codebook`, so the state-dict key is
`quantize.embedding.weight`, and (b) add the entropy term.

Deliberate choices:
- Tokens are the h x w grid in row-major (raster) order, `Tokens.grid = token_spec.grid = (h, w)`, so a GPT
  on them uses its 2D RoPE (generators/gpt.py, `generator.grid`). `decode` needs the whole grid:
  `num_tokens` other than None or h * w is refused (a prefix of a raster is not an image).
- Size presets (`size`) name the channel multipliers and widths; any of ch_mult / width / num_res_blocks /
  z_channels given explicitly overrides the preset. "VQ-16": ch_mult [1, 1, 2, 2, 4], f = 16 (16 x 16
  tokens at 256px, 72M parameters, LlamaGen's released model); "VQ-8": [1, 2, 2, 4], f = 8; "tiny": the
  32x32 quickstart's f = 4 model (width 16, ch_mult [1, 2, 4], 1 residual block per level, z_channels 64,
  0.8M parameters with a 1024 x 8 codebook), sized for 2 CPU cores.
- GroupNorm has gcd(norm_groups, C) groups (LlamaGen: 32 groups, eps 1e-6; identical for every LlamaGen
  width, which are multiples of 32), so narrow CPU models keep working.
- `forward(images, perturb=fn)` applies RobustTok's latent perturbation (perturb.py) between quantiser and
  decoder, after the quantiser losses, as TiTok does; `code_vectors()` is the (V, D) normalised codebook the
  lookup uses (LANTERN neighbourhoods, perturbation).
- Losses returned by `forward` are the quantiser's (codebook, commitment, and entropy when its weight > 0);
  pixel, perceptual and GAN losses live in the training module (tokenizers_vis/losses.py), whose L2 +
  perceptual + PatchGAN hinge recipe is LlamaGen's (its adaptive GAN weight is off by default there too).

Mapping LlamaGen's released weights (`vq_ds16_c2i.pt`, state dict under "model"; load it with
`torch.load(path, weights_only=True)`) onto `VQGAN(size="VQ-16", codebook_size=16384, code_dim=8)`:
every parameter key is identical (encoder.conv_in, encoder.conv_blocks.{i}.res.{j}.{norm1, conv1, norm2,
conv2, nin_shortcut}, encoder.conv_blocks.4.attn.{j}.{norm, q, k, v, proj_out},
encoder.conv_blocks.{i}.downsample.conv, encoder.mid.{0, 1, 2}, encoder.norm_out, encoder.conv_out,
quant_conv, quantize.embedding, post_quant_conv, decoder.conv_in, decoder.mid.{0, 1, 2},
decoder.conv_blocks.{i}.res.{j}, decoder.conv_blocks.0.attn.{j}, decoder.conv_blocks.{i}.upsample.conv,
decoder.norm_out, decoder.conv_out; decoder.conv_blocks.0 is the lowest resolution, as in LlamaGen). The
buffers differ: LlamaGen's `quantize.codebook_used` (a 65536-entry history of recent codes, for its usage
log) has no counterpart and is dropped; ours, `quantize.usage_ema` (V,) (the dead-code restart statistics),
is not in LlamaGen's file and starts at its initial value, ones. `llamagen_state_dict` does exactly this.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Tokenizer, Tokens, TokenSpec, register
from .quantizers import QuantizerOutput, VectorQuantizer

VQGAN_SIZES = {
    "VQ-16": dict(ch_mult=[1, 1, 2, 2, 4], width=128, num_res_blocks=2, z_channels=256),
    "VQ-8": dict(ch_mult=[1, 2, 2, 4], width=128, num_res_blocks=2, z_channels=256),
    "tiny": dict(ch_mult=[1, 2, 4], width=16, num_res_blocks=1, z_channels=64),  # vqgan_quickstart
}


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """(B, C_in, H, W) -> (B, C_out, H, W): x + conv(swish(norm(conv(swish(norm(x)))))), 1x1 shortcut when
    C_in != C_out."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H * W positions, 1x1 conv projections, residual."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (proj(y).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))  # (B, HW, C)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, HW, C)
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """(B, C, H, W) -> (B, C, H/2, W/2): pad one zero row/column at the bottom/right, 3x3 conv stride 2."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """(B, C, H, W) -> (B, C, 2H, 2W): nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: `res` blocks, each followed by `attn[j]` when this level has attention, then an
    optional `downsample` (encoder) or `upsample` (decoder). LlamaGen's `conv_blocks[i]`."""

    def __init__(self, channels_in: int, channels: int, blocks: int, attention: bool, dropout, groups):
        super().__init__()
        self.res = nn.ModuleList(
            ResnetBlock(channels_in if j == 0 else channels, channels, dropout, groups) for j in range(blocks)
        )
        self.attn = nn.ModuleList(AttnBlock(channels, groups) for _ in range(blocks if attention else 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.res):
            x = block(x)
            if len(self.attn):
                x = self.attn[j](x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


def _middle(channels: int, dropout: float, groups: int) -> nn.ModuleList:
    return nn.ModuleList(
        [
            ResnetBlock(channels, channels, dropout, groups),
            AttnBlock(channels, groups),
            ResnetBlock(channels, channels, dropout, groups),
        ]
    )


class Encoder(nn.Module):
    """images (B, 3, H, W) -> (B, z_channels, H / f, W / f), f = 2^(len(ch_mult) - 1)."""

    def __init__(self, width, ch_mult, num_res_blocks, z_channels, dropout=0.0, groups=32):
        super().__init__()
        self.conv_in = nn.Conv2d(3, width, 3, padding=1)
        channels_in = width
        self.conv_blocks = nn.ModuleList()
        last = len(ch_mult) - 1
        for i, mult in enumerate(ch_mult):
            level = Level(channels_in, width * mult, num_res_blocks, i == last, dropout, groups)
            channels_in = width * mult
            if i != last:
                level.downsample = Downsample(channels_in)
            self.conv_blocks.append(level)
        self.mid = _middle(channels_in, dropout, groups)
        self.norm_out = _norm(channels_in, groups)
        self.conv_out = nn.Conv2d(channels_in, z_channels, 3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(images)  # (B, width, H, W)
        for level in self.conv_blocks:
            x = level(x)  # (B, width * ch_mult[i], H / 2^(i+1), W / 2^(i+1)); the last level keeps its size
        for block in self.mid:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))  # (B, z, h, w)


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> images (B, 3, h * f, w * f); conv_blocks[0] is the lowest resolution."""

    def __init__(self, width, ch_mult, num_res_blocks, z_channels, dropout=0.0, groups=32):
        super().__init__()
        channels_in = width * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, channels_in, 3, padding=1)
        self.mid = _middle(channels_in, dropout, groups)
        self.conv_blocks = nn.ModuleList()
        last = len(ch_mult) - 1
        for i in reversed(range(len(ch_mult))):
            level = Level(channels_in, width * ch_mult[i], num_res_blocks + 1, i == last, dropout, groups)
            channels_in = width * ch_mult[i]
            if i != 0:
                level.upsample = Upsample(channels_in)
            self.conv_blocks.append(level)
        self.norm_out = _norm(channels_in, groups)
        self.conv_out = nn.Conv2d(channels_in, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)  # (B, width * ch_mult[-1], h, w)
        for block in self.mid:
            x = block(x)
        for level in self.conv_blocks:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))  # (B, 3, H, W)


class LlamaGenQuantizer(VectorQuantizer):
    """The project's VectorQuantizer with the codebook registered as `embedding` (LlamaGen's key) and
    LlamaGen's optional entropy loss (module docstring)."""

    def __init__(self, *args, entropy_weight: float = 0.0, entropy_temperature: float = 0.01, **kwargs):
        super().__init__(*args, **kwargs)
        self.embedding = self._modules.pop("codebook")  # the same nn.Embedding, under LlamaGen's name
        self.entropy_weight, self.entropy_temperature = entropy_weight, entropy_temperature

    @property
    def codebook(self) -> nn.Embedding:
        """What VectorQuantizer's methods read (its own __init__ registers it as `codebook` first)."""
        return self._modules["embedding" if "embedding" in self._modules else "codebook"]

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        out = super().forward(z)
        if self.entropy_weight > 0 and self.training:
            with torch.autocast(device_type=z.device.type, enabled=False):
                flat = z.float().reshape(-1, self.code_dim)  # (M, D)
                if self.l2_normalize:
                    flat = F.normalize(flat, dim=-1)
                codebook = self.code_vectors()  # (V, D)
                # -||z - c||^2 up to a per-row constant, which a softmax over codes ignores
                affinity = (2 * flat @ codebook.t() - codebook.pow(2).sum(1)) / self.entropy_temperature
                probs, log_probs = affinity.softmax(-1), affinity.log_softmax(-1)  # (M, V)
                sample_entropy = -(probs * log_probs).sum(-1).mean()
                mean_probs = probs.mean(0)  # (V,)
                batch_entropy = -(mean_probs * (mean_probs + 1e-5).log()).sum()
                out.losses["entropy"] = self.entropy_weight * (sample_entropy - batch_entropy)
        return out


def llamagen_state_dict(state: dict[str, torch.Tensor], codebook_size: int) -> dict[str, torch.Tensor]:
    """LlamaGen VQ model state dict (`checkpoint["model"]`) -> this class's: the same keys, minus LlamaGen's
    `quantize.codebook_used` buffer, plus our `quantize.usage_ema` at its initial value (ones)."""
    converted = {key: value for key, value in state.items() if key != "quantize.codebook_used"}
    converted["quantize.usage_ema"] = torch.ones(codebook_size)
    return converted


@register("vqgan")
class VQGAN(Tokenizer):
    fsdp_blocks = (ResnetBlock, AttnBlock)

    def __init__(
        self,
        image_size: int = 256,
        size: str = "VQ-16",
        ch_mult: list[int] | None = None,
        width: int | None = None,
        num_res_blocks: int | None = None,
        z_channels: int | None = None,
        dropout: float = 0.0,
        norm_groups: int = 32,
        codebook_size: int = 16384,
        code_dim: int = 8,
        l2_normalize: bool = True,
        commitment_weight: float = 0.25,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 0.01,
        dead_code_threshold: float = 0.0,
        usage_decay: float = 0.99,
    ):
        super().__init__()
        if size not in VQGAN_SIZES:
            raise ValueError(f"VQGAN size={size!r}; expected one of {sorted(VQGAN_SIZES)}")
        preset = VQGAN_SIZES[size]
        ch_mult = [int(m) for m in (ch_mult or preset["ch_mult"])]
        width = width or preset["width"]
        num_res_blocks = num_res_blocks or preset["num_res_blocks"]
        z_channels = z_channels or preset["z_channels"]
        if not ch_mult or min(ch_mult) < 1:
            raise ValueError(f"VQGAN ch_mult={ch_mult}; expected a non-empty list of integers >= 1")
        factor = 2 ** (len(ch_mult) - 1)
        if image_size % factor:
            raise ValueError(
                f"VQGAN image_size={image_size} is not a multiple of its downsampling factor {factor} "
                f"(2^(len(ch_mult) - 1), ch_mult={ch_mult})"
            )
        self.factor = factor
        self.grid = (image_size // factor, image_size // factor)
        self.codebook_size, self.code_dim = codebook_size, code_dim
        shape = dict(width=width, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=z_channels)
        self.encoder = Encoder(**shape, dropout=dropout, groups=norm_groups)
        self.quant_conv = nn.Conv2d(z_channels, code_dim, 1)
        self.quantize = LlamaGenQuantizer(
            codebook_size,
            code_dim,
            l2_normalize,
            commitment_weight,
            dead_code_threshold=dead_code_threshold,
            usage_decay=usage_decay,
            entropy_weight=entropy_weight,
            entropy_temperature=entropy_temperature,
        )
        self.post_quant_conv = nn.Conv2d(code_dim, z_channels, 1)
        self.decoder = Decoder(**shape, dropout=dropout, groups=norm_groups)

    @property
    def token_spec(self) -> TokenSpec:
        h, w = self.grid
        return TokenSpec(
            "categorical", h * w, grid=self.grid, vocab_size=self.codebook_size, code_dim=self.code_dim
        )

    def code_vectors(self) -> torch.Tensor:
        return self.quantize.code_vectors()  # (V, D)

    def encode_latents(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """images (B, 3, H, W) -> pre-quantisation latents (B, h * w, D) in row-major order, and (h, w)."""
        z = self.quant_conv(self.encoder(images))  # (B, D, h, w)
        return z.permute(0, 2, 3, 1).flatten(1, 2), (z.shape[2], z.shape[3])

    def decode_latents(self, latents: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """latents (B, h * w, D) row-major -> images (B, 3, h * f, w * f)."""
        h, w = grid or self.grid
        if latents.shape[1] != h * w:
            raise ValueError(f"VQGAN decodes whole {h}x{w} grids ({h * w} tokens); got {latents.shape[1]}")
        z = latents.transpose(1, 2).unflatten(2, (h, w))  # (B, D, h, w)
        return self.decoder(self.post_quant_conv(z.to(self.post_quant_conv.weight.dtype)))

    def encode(self, images: torch.Tensor) -> Tokens:
        """images (B, 3, H, W) -> Tokens("categorical", codes (B, h * w) long, grid=(h, w)), raster order."""
        latents, grid = self.encode_latents(images)
        return Tokens("categorical", self.quantize(latents).codes, grid=grid)

    def decode(self, tokens: Tokens, num_tokens: int | None = None) -> torch.Tensor:
        """Tokens with codes (B, h * w) -> images (B, 3, H, W); the grid is tokens.grid or the model's."""
        codes = tokens.data
        if num_tokens is not None and num_tokens != codes.shape[1]:
            raise ValueError(f"VQGAN decodes whole grids only (num_tokens=None); got num_tokens={num_tokens}")
        grid = tuple(tokens.grid) if tokens.grid is not None else None
        return self.decode_latents(self.quantize.lookup(codes.long()), grid)

    def forward(self, images: torch.Tensor, perturb=None):
        """images (B, 3, H, W) -> (reconstructions (B, 3, H, W), losses, stats); `perturb` (perturb.py) maps
        the quantised latents (B, N, D) to what the decoder sees, after the quantiser losses."""
        latents, grid = self.encode_latents(images)  # (B, N, D)
        quantized = self.quantize(latents)
        latents = quantized.quantized if perturb is None else perturb(quantized.quantized, quantized.codes)
        reconstructions = self.decode_latents(latents, grid)
        return reconstructions, quantized.losses, {**quantized.stats, "codes": quantized.codes}
