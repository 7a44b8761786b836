"""TiTok: "An Image is Worth 32 Tokens for Reconstruction and Generation" (Yu et al., NeurIPS 2024).

A ViT encoder reads [patch tokens + N learnable latent tokens]; only the latent outputs are kept and
vector-quantised, so an image becomes a 1D sequence of N codes whatever its size. A ViT decoder reads
[a grid of mask tokens + the projected codes] and turns the mask-token outputs into pixels.

Deliberate choices (see docs/METHODS.md, "TiTok"):
- Single-stage pixel recipe: the decoder regresses pixels (linear to patch pixels, then a 3x3 conv); the
  original two-stage recipe's proxy codes from a frozen VQGAN are not used.
- Latent tokens are appended after the patches, each with its own learned position embedding; attention is
  bidirectional; blocks are timm's ViT blocks (SDPA attention).
- Tokens are kept as (B, N, D) throughout; the official legacy path's reshape of (B, N, C) to (B, C, N, 1)
  without a permute (which mixes the token and channel axes) has no counterpart here.
- `decode(tokens, num_tokens=k)` decodes the first k tokens only (the decoder's latent position
  embeddings are sliced), which One-D-Piece builds on.

Size presets (width / depth / heads, the same for encoder and decoder): S 512/8/8, B 768/12/12,
L 1024/24/16, plus `tiny` for CPUs and tests. Published models pair them with a token count: "L-32",
"B-64", "S-128" (`TiTok.from_preset("L-32")`).
"""

from __future__ import annotations

import torch
from einops import rearrange
from timm.models.vision_transformer import Block
from torch import nn

from .base import Tokenizer, Tokens, TokenSpec, register
from .quantizers import VectorQuantizer

TITOK_SIZES = {
    "tiny": dict(width=128, depth=4, heads=4),
    "S": dict(width=512, depth=8, heads=8),
    "B": dict(width=768, depth=12, heads=12),
    "L": dict(width=1024, depth=24, heads=16),
}


def titok_shape(owner: str, image_size: int, patch_size: int, size: str, width, depth, heads) -> dict:
    """The ViT shape every TiTok-family tokenizer builds its encoder and decoder from: the size preset's
    width / depth / heads unless given, checked once for all of them (`owner` names the class in errors)."""
    if size not in TITOK_SIZES:
        raise ValueError(f"{owner} size={size!r}; expected one of {sorted(TITOK_SIZES)}")
    if image_size % patch_size:
        raise ValueError(f"{owner} image_size={image_size} is not a multiple of patch_size={patch_size}")
    preset = TITOK_SIZES[size]
    return dict(
        image_size=image_size,
        patch_size=patch_size,
        width=width or preset["width"],
        depth=depth or preset["depth"],
        heads=heads or preset["heads"],
    )


def _embedding(*shape: int, scale: float) -> nn.Parameter:
    return nn.Parameter(scale * torch.randn(*shape))


class ViT(nn.Module):
    """Pre-norm transformer trunk shared by encoder and decoder: LayerNorm, timm blocks, LayerNorm."""

    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.ln_pre = nn.LayerNorm(width)
        self.blocks = nn.Sequential(*[Block(width, heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.ln_post = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, W); attn_mask bool, broadcastable to (B, heads, L, L), True = may attend."""
        if attn_mask is None:
            return self.ln_post(self.blocks(self.ln_pre(x)))
        x = self.ln_pre(x)
        for block in self.blocks:
            x = block(x, attn_mask=attn_mask)
        return self.ln_post(x)


class TiTokEncoder(nn.Module):
    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        num_tokens: int,
        code_dim: int,
    ):
        super().__init__()
        num_patches = (image_size // patch_size) ** 2
        scale = width**-0.5
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        self.patch_pos = _embedding(num_patches, width, scale=scale)
        self.latent_tokens = _embedding(num_tokens, width, scale=scale)
        self.latent_pos = _embedding(num_tokens, width, scale=scale)
        self.trunk = ViT(width, depth, heads)
        self.to_code = nn.Linear(width, code_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(images).flatten(2).transpose(1, 2) + self.patch_pos  # (B, P, W)
        latents = (self.latent_tokens + self.latent_pos).expand(images.shape[0], -1, -1)  # (B, N, W)
        x = self.trunk(torch.cat([patches, latents], dim=1))  # (B, P + N, W)
        return self.to_code(x[:, patches.shape[1] :])  # (B, N, D)


class TiTokDecoder(nn.Module):
    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        num_tokens: int,
        code_dim: int,
    ):
        super().__init__()
        self.grid = image_size // patch_size
        self.patch_size = patch_size
        scale = width**-0.5
        self.from_code = nn.Linear(code_dim, width)
        self.latent_pos = _embedding(num_tokens, width, scale=scale)
        self.mask_token = _embedding(1, 1, width, scale=scale)
        self.mask_pos = _embedding(self.grid**2, width, scale=scale)
        self.trunk = ViT(width, depth, heads)
        self.to_pixels = nn.Linear(width, patch_size * patch_size * 3)
        self.conv_out = nn.Conv2d(3, 3, kernel_size=3, padding=1)

    def forward(self, latents: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """latents (B, k, D), k <= N: any prefix of the token sequence -> images (B, 3, H, W).

        lengths (B,) in 1..k: row i sees only its first lengths[i] latents (a key mask in every block;
        One-D-Piece decodes rows of different lengths in one call); None: every row sees all k.
        """
        batch, k = latents.shape[:2]
        latents = self.from_code(latents) + self.latent_pos[:k]  # (B, k, W)
        masks = (self.mask_token + self.mask_pos).expand(batch, -1, -1)  # (B, P, W)
        visible = None
        if lengths is not None:
            keys = (
                torch.arange(k, device=latents.device)[None] < lengths.to(latents.device)[:, None]
            )  # (B, k)
            mask_keys = torch.ones(batch, masks.shape[1], dtype=torch.bool, device=latents.device)
            visible = torch.cat([mask_keys, keys], dim=1)[:, None, None, :]  # (B, 1, 1, P + k)
        x = self.trunk(torch.cat([masks, latents], dim=1), attn_mask=visible)[
            :, : masks.shape[1]
        ]  # (B, P, W)
        return self.to_image(x)

    def to_image(self, x: torch.Tensor) -> torch.Tensor:
        """Mask-token outputs (B, P, W) -> images (B, 3, H, W)."""
        pixels = rearrange(
            self.to_pixels(x),
            "b (h w) (p q c) -> b c (h p) (w q)",
            h=self.grid,
            p=self.patch_size,
            q=self.patch_size,
        )  # (B, 3, H, W)
        return self.conv_out(pixels)


class TiTokFamily(Tokenizer):
    """What TiTok, One-D-Piece, BinaryTiTok and FQTiTok share: presets by name, timm ViT blocks."""

    fsdp_blocks = (Block,)

    @classmethod
    def from_preset(cls, name: str, **overrides):
        """ "L-32" -> size L with 32 tokens; keyword arguments override anything else."""
        size, num_tokens = name.split("-")
        return cls(size=size, num_tokens=int(num_tokens), **overrides)


@register("titok")
class TiTok(TiTokFamily):
    def __init__(
        self,
        image_size: int = 256,
        patch_size: int = 16,
        size: str = "B",
        width: int | None = None,
        depth: int | None = None,
        heads: int | None = None,
        num_tokens: int = 64,
        codebook_size: int = 4096,
        code_dim: int = 12,
        l2_normalize: bool = True,
        commitment_weight: float = 0.25,
        dead_code_threshold: float = 0.0,
        usage_decay: float = 0.99,
    ):
        super().__init__()
        shape = titok_shape(type(self).__name__, image_size, patch_size, size, width, depth, heads)
        self.num_tokens, self.codebook_size, self.code_dim = num_tokens, codebook_size, code_dim
        self.encoder = TiTokEncoder(**shape, num_tokens=num_tokens, code_dim=code_dim)
        self.quantizer = VectorQuantizer(
            codebook_size,
            code_dim,
            l2_normalize,
            commitment_weight,
            dead_code_threshold=dead_code_threshold,
            usage_decay=usage_decay,
        )
        self.decoder = TiTokDecoder(**shape, num_tokens=num_tokens, code_dim=code_dim)

    @property
    def token_spec(self) -> TokenSpec:
        return TokenSpec(
            "categorical", self.num_tokens, vocab_size=self.codebook_size, code_dim=self.code_dim
        )

    def code_vectors(self) -> torch.Tensor:
        return self.quantizer.code_vectors()

    def encode(self, images: torch.Tensor) -> Tokens:
        return Tokens("categorical", self.quantizer(self.encoder(images)).codes)

    def decode(self, tokens: Tokens, num_tokens: int | None = None) -> torch.Tensor:
        codes = tokens.data if num_tokens is None else tokens.data[:, :num_tokens]  # (B, k)
        return self.decoder(self.quantizer.lookup(codes))

    def forward(self, images: torch.Tensor, perturb=None):
        """images (B, 3, H, W) -> (reconstructions (B, 3, H, W), losses, stats); `perturb` (perturb.py) maps
        the quantised latents to what the decoder sees, after the quantiser losses."""
        quantized = self.quantizer(self.encoder(images))
        latents = quantized.quantized if perturb is None else perturb(quantized.quantized, quantized.codes)
        reconstructions = self.decoder(latents)
        return reconstructions, quantized.losses, {**quantized.stats, "codes": quantized.codes}
