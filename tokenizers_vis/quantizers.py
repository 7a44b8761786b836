"""Quantisers: continuous latents in, discrete codes plus a straight-through latent out.

`VectorQuantizer` follows VQ-VAE (van den Oord et al. 2017) with TiTok's choices (docs/METHODS.md, "TiTok"):
codes and inputs optionally l2-normalised before the nearest-code lookup (cosine similarity; Yu et al.
2022, "Vector-quantized Image Modeling with Improved VQGAN"), loss = 0.25 * ||sg(q) - z||^2 (commitment)
+ ||q - sg(z)||^2 (codebook), straight-through gradient, everything in fp32 even under bf16 autocast.

Codebook collapse is the top complaint about training TiTok from scratch, so the quantiser reports batch
usage and perplexity every call and can restart dead codes: it keeps an exponential moving average of how
often each code is picked, and codes whose average falls below `dead_code_threshold` are re-initialised
to random encoder outputs of the current batch (under DDP: counts summed over ranks, replacements drawn on
rank 0 and broadcast, so every rank keeps the same codebook).

`FSQuantizer` is Finite Scalar Quantization (Mentzer et al. 2023): a fixed grid instead of a learned
codebook (FlexTok uses it); it returns the same `QuantizerOutput`, with no losses.

`BinaryQuantizer` turns each latent into K bits (sigmoid, Bernoulli draw in training, threshold at 0.5 in
eval, straight-through on the probabilities): the tokens of binary.py (ELM, Instella-T2I).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # (..., D) straight-through: forward = code vectors, backward = identity to z
    codes: torch.Tensor  # (...) long
    losses: dict[str, torch.Tensor]  # commitment, codebook (already weighted)
    stats: dict[str, torch.Tensor]  # usage (share of the codebook hit by this batch), perplexity


def code_histogram_stats(codes: torch.Tensor, codebook_size: int) -> dict[str, torch.Tensor]:
    """Usage = share of codes hit at least once; perplexity = exp(entropy of the code histogram)."""
    counts = torch.bincount(codes.flatten(), minlength=codebook_size).float()
    probs = counts / counts.sum().clamp_min(1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
    return {"usage": (counts > 0).float().mean(), "perplexity": entropy.exp()}


class VectorQuantizer(nn.Module):
    def __init__(
        self,
        codebook_size: int,
        code_dim: int,
        l2_normalize: bool = True,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        dead_code_threshold: float = 0.0,
        usage_decay: float = 0.99,
    ):
        super().__init__()
        self.codebook_size, self.code_dim = codebook_size, code_dim
        self.l2_normalize = l2_normalize
        self.commitment_weight, self.codebook_weight = commitment_weight, codebook_weight
        self.dead_code_threshold, self.usage_decay = dead_code_threshold, usage_decay
        self.codebook = nn.Embedding(codebook_size, code_dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        if l2_normalize:  # on the sphere the scale is irrelevant; a unit normal spreads codes evenly
            nn.init.normal_(self.codebook.weight)
        # Moving average of per-step hits of each code; starts "alive" so restarts wait for evidence.
        self.register_buffer("usage_ema", torch.ones(codebook_size))

    def code_vectors(self) -> torch.Tensor:
        """(V, D) the vectors the decoder actually receives for each code."""
        weight = self.codebook.weight.float()
        return F.normalize(weight, dim=-1) if self.l2_normalize else weight

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (...) long -> (..., D)"""
        return F.embedding(codes, self.code_vectors())

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()  # (..., D)
            if self.l2_normalize:
                z = F.normalize(z, dim=-1)
            codebook = self.code_vectors()  # (V, D)
            flat = z.reshape(-1, self.code_dim)  # (M, D)
            # ||z - c||^2 = ||z||^2 - 2 z.c + ||c||^2; the ||z||^2 term does not change the argmin.
            distances = codebook.pow(2).sum(1) - 2 * flat @ codebook.t()  # (M, V)
            codes = distances.argmin(dim=1)  # (M,)
            quantized = codebook[codes].view_as(z)

            losses = {
                "commitment": self.commitment_weight * F.mse_loss(z, quantized.detach()),
                "codebook": self.codebook_weight * F.mse_loss(quantized, z.detach()),
            }
            quantized = z + (quantized - z).detach()
            stats = code_histogram_stats(codes, self.codebook_size)
            if self.training and self.dead_code_threshold > 0:
                self._restart_dead_codes(flat.detach(), codes)
        return QuantizerOutput(quantized, codes.view(z.shape[:-1]), losses, stats)

    @torch.no_grad()
    def _restart_dead_codes(self, flat_z: torch.Tensor, codes: torch.Tensor) -> None:
        counts = torch.bincount(codes, minlength=self.codebook_size).float()
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.all_reduce(counts)
        self.usage_ema.mul_(self.usage_decay).add_(counts, alpha=1 - self.usage_decay)
        dead = (self.usage_ema < self.dead_code_threshold).nonzero().squeeze(1)  # same on every rank
        if dead.numel() == 0:
            return
        picks = torch.randint(0, flat_z.shape[0], (dead.numel(),), device=flat_z.device)
        replacements = flat_z[picks].to(self.codebook.weight.dtype)
        if distributed:
            dist.broadcast(replacements, src=0)
        self.codebook.weight.data[dead] = replacements
        # A fresh code gets the average usage, so it has time to attract inputs before being judged again.
        self.usage_ema[dead] = self.usage_ema.mean()


class FSQuantizer(nn.Module):
    """Finite Scalar Quantization (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple").

    Each of the d = len(levels) channels is bounded with tanh to its own number of levels L_i, rounded with a
    straight-through gradient and rescaled to [-1, 1]; the implicit codebook is the grid of all
    prod(levels) points, so there is no codebook to learn, no auxiliary loss and no collapse.

    Bounding follows the paper's reference code (appendix A.1): half_l = (L - 1)(1 + eps) / 2,
    offset = 0.5 for even L (0 for odd), shift = atanh(offset / half_l), bounded = tanh(z + shift) * half_l
    - offset. Rounding then gives the integers -floor(L/2) .. ceil(L/2) - 1 (even L, e.g. -4..3 for 8) or
    -(L-1)/2 .. (L-1)/2 (odd L), and dividing by floor(L/2) maps them into [-1, 1]. The code of a vector is
    its mixed-radix index, first channel least significant: sum_i digit_i * prod(levels[:i]), digit_i in
    [0, L_i). Everything runs in fp32 with autocast off.
    """

    def __init__(self, levels: tuple[int, ...] | list[int] = (8, 8, 8, 5, 5, 5), eps: float = 1e-3):
        super().__init__()
        levels = [int(level) for level in levels]
        if not levels or min(levels) < 2:
            raise ValueError(f"FSQ levels must be integers >= 2, got {levels}")
        self.levels = tuple(levels)
        self.code_dim = len(levels)
        self.codebook_size = math.prod(levels)
        self.eps = eps
        basis = [math.prod(levels[:i]) for i in range(len(levels))]
        # Derived from `levels` alone: not persistent, so they never enter a state dict.
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.long), persistent=False)
        self.register_buffer("_basis", torch.tensor(basis, dtype=torch.long), persistent=False)

    def extra_repr(self) -> str:
        return f"levels={list(self.levels)}, codebook_size={self.codebook_size}"

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., d) with channel i in (-floor(L_i/2) - 0.5, ceil(L_i/2) - 0.5), so rounding
        yields exactly L_i values."""
        levels = self._levels.to(z.dtype)
        half_l = (levels - 1) * (1 + self.eps) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0).to(z.dtype)
        shift = (offset / half_l).atanh()
        return (z + shift).tanh() * half_l - offset

    def _half_width(self, dtype: torch.dtype) -> torch.Tensor:
        return (self._levels // 2).to(dtype)

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., d) grid points in [-1, 1]; straight-through gradient of the rounding."""
        bounded = self.bound(z)
        rounded = bounded + (bounded.round() - bounded).detach()
        return rounded / self._half_width(z.dtype)

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., d) normalised grid points -> (...) long indices in [0, prod(levels))."""
        half_width = self._half_width(torch.float32)
        digits = (codes.float() * half_width + half_width).round().long()  # (..., d) in [0, L_i)
        return (digits * self._basis).sum(-1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(...) long indices -> (..., d) fp32 normalised grid points (inverse of `codes_to_indices`)."""
        digits = (indices.long().unsqueeze(-1) // self._basis) % self._levels  # (..., d)
        half_width = self._half_width(torch.float32)
        return (digits.float() - half_width) / half_width

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Same as `indices_to_codes`: the interface VectorQuantizer offers its decoders."""
        return self.indices_to_codes(indices)

    def code_vectors(self) -> torch.Tensor:
        """(V, d) the normalised grid point of every code, V = prod(levels)."""
        return self.indices_to_codes(torch.arange(self.codebook_size, device=self._levels.device))

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z (..., d) -> QuantizerOutput(quantized (..., d) fp32, codes (...) long, losses {}, stats)."""
        if z.shape[-1] != self.code_dim:
            raise ValueError(
                f"FSQ with levels {list(self.levels)} expects {self.code_dim} channels, got {z.shape}"
            )
        with torch.autocast(device_type=z.device.type, enabled=False):
            quantized = self.quantize(z.float())  # (..., d)
            codes = self.codes_to_indices(quantized.detach())  # (...)
            stats = code_histogram_stats(codes, self.codebook_size)
        return QuantizerOutput(quantized, codes, {}, stats)


@dataclass
class BinaryQuantizerOutput(QuantizerOutput):
    probs: torch.Tensor | None = None  # (..., K) fp32 sigmoid(z / temperature), the Bernoulli parameters


def bernoulli_entropy(p: torch.Tensor) -> torch.Tensor:
    """Elementwise entropy of Bernoulli(p) in nats (0 at p in {0, 1}, log 2 at p = 0.5)."""
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * p.log() + (1 - p) * (1 - p).log())


class BinaryQuantizer(nn.Module):
    """Binary latents: each token is a vector of K bits (ELM's binary autoencoder, Instella-T2I's tokenizer).

    z (..., K) pre-activations -> p = sigmoid(z / temperature) -> bits in {0, 1}:
    - training: one Bernoulli draw per element, bits ~ Bernoulli(p) (Instella: Bernoulli with temperature);
    - eval, or `deterministic=True` in training: the threshold bits = [p > 0.5] (p = 0.5 exactly gives 0);
    - in both cases the straight-through estimator on the probabilities, bits + p - sg(p): the forward value
      is the bit, the backward pass is that of p (ELM). A sampled bit is an unbiased estimate of p, so the
      sampling noise is what pushes the encoder towards confident bits: the decoder only sees 0 or 1.

    Returns a `QuantizerOutput` as the other quantisers do: `quantized` the bits as float with gradient,
    `codes` the bits as long, `losses`, `stats`; plus `probs`. Everything runs in fp32 with autocast off.

    `entropy_weight` (default 0: no loss, as in ELM and Instella) adds a per-bit version of LFQ's entropy
    term (MAGVIT-v2): weight * mean_k [mean_elements H(p) - H(mean_elements p)], elements = every batch
    row and token. The first part makes each bit confident; the second keeps each of the K bit channels in
    use (firing about half the time over the batch) so that no channel is constant. Unweighted, it lies
    in [-log 2, log 2]. Off by default; try it if bit channels collapse (watch stats usage / bit_entropy).

    Stats (over the batch, per call): `usage` = share of the K bit channels that take both values,
    `bit_entropy` = mean over channels of the entropy of the channel's firing rate in bits (1 = balanced,
    0 = constant), `perplexity` = exp(same in nats), in [1, 2] (the effective number of values per bit,
    comparable with the validation's pooled-bit histogram perplexity), `prob_entropy` = mean entropy of
    the Bernoulli parameters p in bits (0: the encoder is certain, sampling equals thresholding).
    """

    def __init__(
        self,
        num_bits: int,
        temperature: float = 1.0,
        deterministic: bool = False,
        entropy_weight: float = 0.0,
    ):
        super().__init__()
        if num_bits < 1:
            raise ValueError(f"BinaryQuantizer num_bits={num_bits}; expected >= 1")
        if temperature <= 0:
            raise ValueError(f"BinaryQuantizer temperature={temperature}; expected > 0")
        self.num_bits, self.temperature = num_bits, temperature
        self.deterministic, self.entropy_weight = deterministic, entropy_weight

    def extra_repr(self) -> str:
        return f"num_bits={self.num_bits}, temperature={self.temperature}, deterministic={self.deterministic}"

    def forward(self, z: torch.Tensor, generator: torch.Generator | None = None) -> BinaryQuantizerOutput:
        """z (..., K) -> BinaryQuantizerOutput(quantized (..., K) fp32 in {0, 1}, codes (..., K) long, ...)"""
        if z.shape[-1] != self.num_bits:
            raise ValueError(f"BinaryQuantizer with {self.num_bits} bits got input of shape {tuple(z.shape)}")
        with torch.autocast(device_type=z.device.type, enabled=False):
            probs = torch.sigmoid(z.float() / self.temperature)  # (..., K)
            if self.training and not self.deterministic:
                noise = torch.rand(probs.shape, device=probs.device, generator=generator)
                hard = (noise < probs).float()  # Bernoulli(p)
            else:
                hard = (probs > 0.5).float()
            bits = hard + probs - probs.detach()  # (..., K) straight-through on the probabilities
            codes = hard.long().detach()

            losses = {}
            flat_p = probs.reshape(-1, self.num_bits)  # (M, K)
            if self.entropy_weight > 0:
                sample_entropy = bernoulli_entropy(flat_p).mean()
                marginal_entropy = bernoulli_entropy(flat_p.mean(0)).mean()
                losses["entropy"] = self.entropy_weight * (sample_entropy - marginal_entropy)
            with torch.no_grad():
                rate = hard.reshape(-1, self.num_bits).mean(0)  # (K,) firing rate of each bit channel
                channel_entropy = bernoulli_entropy(rate)  # (K,) nats
                stats = {
                    "usage": ((rate > 0) & (rate < 1)).float().mean(),
                    "bit_entropy": channel_entropy.mean() / math.log(2),
                    "perplexity": channel_entropy.mean().exp(),
                    "prob_entropy": bernoulli_entropy(flat_p).mean() / math.log(2),
                }
        return BinaryQuantizerOutput(bits, codes, losses, stats, probs)


NEIGHBOUR_METRICS = ("euclidean", "cosine")


@torch.no_grad()
def nearest_codes(
    code_vectors: torch.Tensor,
    k: int,
    queries: torch.Tensor | None = None,
    metric: str = "euclidean",
    include_self: bool = True,
    dtype: torch.dtype = torch.float64,
    chunk: int = 1024,
) -> torch.Tensor:
    """The k nearest codes of each query code in latent space: code_vectors (V, D), queries long (M,)
    (default: every code) -> (M, k) long, nearest first.

    metric "euclidean" (distance) or "cosine" (1 - cosine similarity). include_self: the query code comes
    first (RobustTok's perturbation draws replacements from a neighbourhood that contains it); otherwise it
    is left out (LANTERN's and GSD's neighbours are the *other* codes). Ties are broken by code index
    (stable sort), so the result is deterministic; distances in `dtype` (float64 by default; float32 where
    it runs every training step), outside autocast, `chunk` queries at a time (memory chunk x V).
    """
    if metric not in NEIGHBOUR_METRICS:
        raise ValueError(f"neighbour metric {metric!r}; expected one of {NEIGHBOUR_METRICS}")
    vectors = code_vectors.detach().to(dtype)  # (V, D)
    size = vectors.shape[0]
    most = size if include_self else size - 1
    if not 1 <= k <= most:
        raise ValueError(f"k={k} neighbours; a codebook of {size} codes has 1 to {most} to choose from")
    if queries is None:
        queries = torch.arange(size, device=vectors.device)
    if metric == "cosine":
        vectors = F.normalize(vectors, dim=-1)
    out = torch.empty(queries.shape[0], k, dtype=torch.long, device=queries.device)
    with torch.autocast(device_type=vectors.device.type, enabled=False):
        squared = vectors.pow(2).sum(-1)  # (V,)
        for start in range(0, queries.shape[0], chunk):
            rows = queries[start : start + chunk].to(vectors.device)  # (m,)
            if metric == "cosine":
                distance = 1 - vectors[rows] @ vectors.t()  # (m, V)
            else:
                distance = squared[rows, None] + squared[None] - 2 * vectors[rows] @ vectors.t()
                distance = distance.clamp_min(0)  # (m, V)
            own = float("-inf") if include_self else float("inf")
            distance.scatter_(1, rows[:, None], own)
            nearest = distance.sort(dim=-1, stable=True).indices[:, :k]
            out[start : start + chunk] = nearest.to(queries.device)
    return out
