"""One-D-Piece: "Image Tokenizer Meets Quality-Controllable Compression" (Miwa et al., 2025).

arXiv 2501.10064; official code: turingmotors/One-D-Piece.

TiTok (titok.py) trained with Tail Token Drop: in training, draw k ~ U{min_tokens..N} and let the decoder see
only the first k quantised tokens. The head of the sequence must then reconstruct the image alone, so
information concentrates at the head, and at inference any prefix length k decodes to an image whose quality
grows with k: the token count becomes a quality knob (the paper compares against JPEG and WebP at equal
byte size). Same encoder, quantiser and decoder as TiTok, and the same weights layout.

Deliberate choices (see docs/METHODS.md, "One-D-Piece and prefix decoding"):
- `tail_drop="batch"` (default) draws one k per batch, as the official code does (it slices the quantised
  latents before the decoder); the decoder then runs on k tokens only, so a step costs less on average.
- `tail_drop="sample"` draws one k per image, a strictly more general option. The batch is decoded at the
  longest drawn length, and each row's tail (positions >= k_i) is hidden from every attention layer by a key
  mask (timm's `Block` takes `attn_mask`, a boolean (B, 1, 1, L), True = visible). A hidden latent is never a
  key, so it reaches no other position: it has exactly no influence on the row's output, which is therefore
  the same function as decoding the prefix alone (up to float summation order). Replacing dropped latents by
  a learned mask token (FlexTok's nested dropout) would differ: that token would still be seen.
- `tail_drop="none"` is plain TiTok training (the ablation).
- `min_tokens` (default 1) is the shortest prefix drawn; k is uniform over min_tokens..N.
- `full_length_prob` (default 0, the official rule) keeps all N tokens for that share of the draws and
  draws k ~ U{min_tokens..N} for the rest. Under the uniform rule token j reaches the decoder in only
  (N - j + 1) / N of the steps and the full sequence in 1 / N of them, so a short run leaves the tail, and
  with it full-length quality, undertrained (the paper trains for hundreds of thousands of steps). The CPU
  quickstart uses 0.8 with per-image draws; every prefix length is still drawn.
- The quantiser, and its commitment/codebook losses, run on all N tokens: the encoder keeps learning every
  token, also the ones a step's decoder does not see (those get no reconstruction gradient that step).
- The drawn lengths are reported in `stats["lengths"]` (B,) and their mean in `stats["kept_tokens"]`.
  They are drawn with the CPU generator, so choosing them never waits on the accelerator.
- Eval mode decodes all N tokens. `decode(tokens, num_tokens=k)` decodes a prefix (TiTok's slicing of the
  decoder's latent position embeddings); if `tokens.lengths` (B,) is set, each row is decoded at its own
  prefix with the key mask above, in one decoder call (`num_tokens`, if given, caps every row).
- `encode(images, target_psnr=t)` returns, per image, the shortest prefix whose reconstruction reaches t dB
  (tokens.lengths set; adaptive.py, a per-image binary search in O(log N) decoder calls); without a target
  it returns all N tokens with lengths None, exactly as TiTok.

Published models: S / B / L with 256 tokens at 256x256, patch 16, VQ 4096 x 12 (rFID 1.48 / 1.11 / 1.08).
`OneDPiece.from_preset("L-256")`.
"""

from __future__ import annotations

import torch

from .adaptive import shortest_prefix
from .base import Tokens, register
from .titok import TiTok

TAIL_DROP_MODES = ("batch", "sample", "none")


@register("onedpiece")
class OneDPiece(TiTok):
    decodes_row_lengths = True  # decode() honours per-row tokens.lengths in one call (adaptive.py uses it)

    def __init__(
        self, tail_drop: str = "batch", min_tokens: int = 1, full_length_prob: float = 0.0, **titok_kwargs
    ):
        super().__init__(**titok_kwargs)
        num_tokens = self.num_tokens
        if tail_drop not in TAIL_DROP_MODES:
            raise ValueError(f"OneDPiece tail_drop={tail_drop!r}; expected one of {TAIL_DROP_MODES}")
        if not 1 <= min_tokens <= num_tokens:
            raise ValueError(f"OneDPiece min_tokens={min_tokens}; expected 1 <= min_tokens <= {num_tokens}")
        if not 0 <= full_length_prob < 1:
            raise ValueError(f"OneDPiece full_length_prob={full_length_prob}; expected 0 <= p < 1")
        self.tail_drop, self.min_tokens, self.full_length_prob = tail_drop, min_tokens, full_length_prob

    def draw_lengths(self, batch: int) -> torch.Tensor | None:
        """Tail Token Drop: kept prefix length per row, (B,) long on the CPU; None = keep all N."""
        num_tokens = self.num_tokens
        if self.tail_drop == "none":
            return None
        draws = 1 if self.tail_drop == "batch" else batch
        lengths = torch.randint(self.min_tokens, num_tokens + 1, (draws,))
        if self.full_length_prob > 0:
            lengths[torch.rand(draws) < self.full_length_prob] = num_tokens
        return lengths.expand(batch) if self.tail_drop == "batch" else lengths

    def _decode_latents(self, latents: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """latents (B, n, D), lengths (B,) or None (all n) -> images; slices when every row has one length."""
        if lengths is None:
            return self.decoder(latents)
        longest, shortest = int(lengths.max()), int(lengths.min())
        if shortest < 1 or longest > latents.shape[1]:
            raise ValueError(f"token lengths must lie in 1..{latents.shape[1]}; got {shortest}..{longest}")
        if shortest == longest:  # one length for all rows: plain prefix decoding (the official path)
            return self.decoder(latents[:, :longest])
        return self.decoder(latents[:, :longest], lengths)

    def encode(self, images: torch.Tensor, target_psnr: float | torch.Tensor | None = None) -> Tokens:
        """All N tokens (lengths None), or per image the shortest prefix reaching `target_psnr` dB."""
        if target_psnr is None:
            return super().encode(images)
        return shortest_prefix(self, images, target_psnr)

    def decode(self, tokens: Tokens, num_tokens: int | None = None) -> torch.Tensor:
        codes = tokens.data if num_tokens is None else tokens.data[:, :num_tokens]  # (B, n)
        lengths = tokens.lengths
        if lengths is not None and num_tokens is not None:
            lengths = lengths.clamp(max=num_tokens)
        return self._decode_latents(self.quantizer.lookup(codes), lengths)

    def forward(self, images: torch.Tensor, perturb=None):
        """images (B, 3, H, W) -> (reconstructions (B, 3, H, W), losses, stats); training drops tails.
        `perturb` (perturb.py) maps the quantised latents to what the decoder sees."""
        quantized = self.quantizer(self.encoder(images))  # losses on all N tokens
        batch, num_tokens = quantized.codes.shape
        latents = quantized.quantized if perturb is None else perturb(quantized.quantized, quantized.codes)
        lengths = self.draw_lengths(batch) if self.training else None  # (B,) or None
        reconstructions = self._decode_latents(latents, lengths)
        kept = (torch.full((batch,), num_tokens) if lengths is None else lengths).to(images.device)
        stats = {
            **quantized.stats,
            "codes": quantized.codes,
            "lengths": kept,
            "kept_tokens": kept.float().mean(),
        }
        return reconstructions, quantized.losses, stats
