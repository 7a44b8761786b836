"""Binary-latent TiTok: every token is a vector of K bits instead of a codebook index.

Two papers, one tokenizer (docs/METHODS.md, "Binary latents"):
- ELM, "Elucidating the Design Space of Language Models for Image Generation" (Liu et al., 2024): a binary
  autoencoder; the encoder's output goes through a sigmoid, is sampled as Bernoulli bits in training
  (thresholded at 0.5 at inference) with a straight-through gradient on the probabilities, and the decoder
  receives the bits multiplied by a learned embedding matrix.
- Instella-T2I (AMD, 2025): the same binary bottleneck on TiTok-style 1D latents (128 tokens of 64 bits),
  Bernoulli with a temperature in training, threshold at inference.

    images -> TiTokEncoder (its last linear maps width -> K) -> BinaryQuantizer -> bits (B, N, K)
           -> TiTokDecoder (its first linear, K -> width, is the bit embedding matrix) -> images

Deliberate choices:
- The encoder and decoder are TiTok's (titok.py, imported, not copied), built with code_dim = K: the
  encoder's `to_code` projects each latent to K pre-activations, and the decoder's `from_code`, a Linear
  K -> width with bias, is ELM's learned embedding matrix: a token's input vector is the sum of the rows of
  the bits that are on, plus a bias. A separate K -> code_dim -> width path would be two linear maps in a
  row, so there is none. Bits enter the decoder as {0, 1} (with the bias, {0, 1} and {-1, +1} are the same
  family of maps).
- No codebook, no commitment or codebook loss: the reconstruction gradient reaches the encoder through the
  straight-through estimator alone. The optional entropy term of `BinaryQuantizer` (`entropy_weight`) is
  0 by default, as in both papers.
- `temperature` divides the pre-activations before the sigmoid (Instella); `deterministic=True` thresholds
  in training too (an ablation: a plain straight-through binariser without the Bernoulli noise).
- The training draw follows torch's global RNG (as dropout does); eval mode is deterministic.
- token_spec: kind "binary", N tokens, vocab_size 2, token_dim K, code_dim K (the vector behind a token is
  its K bits). `encode` gives Tokens("binary", bits long (B, N, K)); `decode(tokens, num_tokens=k)`
  decodes the first k tokens (TiTok's slicing of the decoder's latent position embeddings).
- `forward` returns TiTok's triple; `stats["codes"]` holds the bits (B, N, K) long, so the tokenizer
  module's validation histogram (vocab_size 2) is the pooled distribution of 0s and 1s: its "perplexity"
  lies in [1, 2] and its "codebook_usage" says whether both values occur.
- `code_vectors()` raises: there is no codebook of V vectors (2^K of them for K = 64), so methods that need
  one (LANTERN / GSD latent neighbourhoods, RobustTok's nearest-code perturbation) do not apply.

Size presets are TiTok's (tiny, S, B, L; `BinaryTiTok.from_preset("B-128", num_bits=64)`); the defaults,
128 tokens of 64 bits, are Instella's token shape.
"""

from __future__ import annotations

import torch

from .base import Tokens, TokenSpec, register
from .quantizers import BinaryQuantizer
from .titok import TiTokDecoder, TiTokEncoder, TiTokFamily, titok_shape


@register("binary")
class BinaryTiTok(TiTokFamily):
    def __init__(
        self,
        image_size: int = 256,
        patch_size: int = 16,
        size: str = "B",
        width: int | None = None,
        depth: int | None = None,
        heads: int | None = None,
        num_tokens: int = 128,
        num_bits: int = 64,
        temperature: float = 1.0,
        deterministic: bool = False,
        entropy_weight: float = 0.0,
    ):
        super().__init__()
        shape = titok_shape(type(self).__name__, image_size, patch_size, size, width, depth, heads)
        shape.update(num_tokens=num_tokens, code_dim=num_bits)
        self.num_tokens, self.num_bits = num_tokens, num_bits
        self.encoder = TiTokEncoder(**shape)  # its to_code: width -> K pre-activations
        self.quantizer = BinaryQuantizer(num_bits, temperature, deterministic, entropy_weight)
        self.decoder = TiTokDecoder(**shape)  # its from_code: the K -> width bit embedding matrix

    @property
    def token_spec(self) -> TokenSpec:
        bits = self.num_bits
        return TokenSpec("binary", self.num_tokens, vocab_size=2, code_dim=bits, token_dim=bits)

    def code_vectors(self) -> torch.Tensor:
        raise NotImplementedError(
            "BinaryTiTok has no codebook: a token is K independent bits (2^K values), so there are no code "
            "vectors; samplers and perturbations that need a codebook (LANTERN, GSD, RobustTok) do not apply"
        )

    def encode(self, images: torch.Tensor) -> Tokens:
        """images (B, 3, H, W) -> Tokens("binary", bits long (B, N, K)); sampled in training mode."""
        return Tokens("binary", self.quantizer(self.encoder(images)).codes)

    def decode(self, tokens: Tokens, num_tokens: int | None = None) -> torch.Tensor:
        """Tokens with bits (B, N, K) in {0, 1} -> images (B, 3, H, W), from the first num_tokens only."""
        bits = tokens.data if num_tokens is None else tokens.data[:, :num_tokens]  # (B, k, K)
        if bits.dim() != 3 or bits.shape[-1] != self.num_bits:
            raise ValueError(
                f"BinaryTiTok decodes bits (B, N, {self.num_bits}); got shape {tuple(bits.shape)}"
            )
        return self.decoder(bits.to(self.decoder.latent_pos.dtype))

    def forward(self, images: torch.Tensor):
        """images (B, 3, H, W) -> (reconstructions (B, 3, H, W), losses, stats); stats["codes"] (B, N, K)."""
        quantized = self.quantizer(self.encoder(images))  # bits (B, N, K) with straight-through gradient
        reconstructions = self.decoder(quantized.quantized)
        return reconstructions, quantized.losses, {**quantized.stats, "codes": quantized.codes}
