"""The contract every tokenizer keeps, on the core's `Tokens`, `TokenSpec` and export (core/).

A tokenizer is an `nn.Module` with

    token_spec                         what a generator must model (kind, N, grid, vocabulary sizes)
    encode(images) -> Tokens           images: float (B, 3, H, W) in [-1, 1]
    decode(tokens, num_tokens=None)    -> images (B, 3, H, W)
    forward(images) -> (reconstructions, losses dict, stats dict)
    code_vectors()                     the latent vector behind each discrete code (V, D)

and exports like every model (core/hub.py): config.json + model.safetensors, `from_pretrained(folder)`.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn

from core import TOKEN_KINDS, Exportable, Tokens, TokenSpec, from_pretrained, register

__all__ = ["TOKEN_KINDS", "Exportable", "Tokenizer", "TokenSpec", "Tokens", "from_pretrained", "register"]


class Tokenizer(Exportable, nn.Module):
    """Base class of every tokenizer (see the module docstring for the interface)."""

    @property
    def token_spec(self) -> TokenSpec:
        raise NotImplementedError

    def encode(self, images: torch.Tensor) -> Tokens:
        raise NotImplementedError

    def decode(self, tokens: Tokens, num_tokens: int | None = None) -> torch.Tensor:
        raise NotImplementedError

    def code_vectors(self) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no discrete codes")

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images))

    def export_metadata(self) -> dict:
        return {"token_spec": asdict(self.token_spec)}
