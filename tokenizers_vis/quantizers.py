"""Quantisers: continuous latents in, discrete codes plus a straight-through latent out.

`VectorQuantizer` follows VQ-VAE (van den Oord et al. 2017) with the choices TiTok uses (METHODS.md):
codes and inputs optionally l2-normalised before the nearest-code lookup (cosine similarity; Yu et al.
2022, "Vector-quantized Image Modeling with Improved VQGAN"), loss = 0.25 * ||sg(q) - z||^2 (commitment)
+ ||q - sg(z)||^2 (codebook), straight-through gradient, everything in fp32 even under bf16 autocast.

Codebook collapse is the top complaint about training TiTok from scratch, so the quantiser reports batch
usage and perplexity every call and can restart dead codes: it keeps an exponential moving average of how
often each code is picked, and codes whose average falls below `dead_code_threshold` are re-initialised
to random encoder outputs of the current batch (under DDP: counts summed over ranks, replacements drawn on
rank 0 and broadcast, so every rank keeps the same codebook).
"""

from __future__ import annotations

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
