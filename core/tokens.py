"""Tokens and TokenSpec: what tokenizers produce and generators model.

    kind          data                                 generator head (generators/heads.py and friends)
    categorical   codes long (B, N)                    softmax over V
    factorized    codes long (B, N, G)                 one softmax per sub-codebook, in order
    binary        bits {0,1} (B, N, K)                 K Bernoulli logits, or groups of 2^b-way softmax
    dimwise       bins long (B, N, C)                  small causal head over the C channels
    continuous    values float (B, N, D)               diffusion head

plus `lengths` for variable-length sequences and `grid` (h, w) for 2D tokens (None for 1D).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TOKEN_KINDS = ("categorical", "factorized", "binary", "dimwise", "continuous")


@dataclass
class TokenSpec:
    """What a generator needs to know about a tokenizer's tokens."""

    kind: str  # one of TOKEN_KINDS
    num_tokens: int  # N, positions per image
    grid: tuple[int, int] | None = None  # (h, w) for 2D tokens, None for 1D sequences
    vocab_size: int | None = None  # values per token element: V codes (categorical, factorized), 2 (binary)
    code_dim: int | None = None  # dimension of the latent vector behind each code
    token_dim: int | None = None  # elements per token: None for one code, K bits, G sub-codes, C channels

    def __post_init__(self):
        if self.kind not in TOKEN_KINDS:
            raise ValueError(f"TokenSpec.kind={self.kind!r}; expected one of {TOKEN_KINDS}")

    @property
    def bits_per_token(self) -> float:
        """Bits of a fixed-length code for one position: token_dim elements of log2(vocab_size) bits each."""
        return (self.token_dim or 1) * math.log2(self.vocab_size)


@dataclass
class Tokens:
    """A batch of tokens: `data` holds codes (B, N) for categorical tokens and (B, N, token_dim) integers for
    binary, factorized and dimwise tokens (the table in the module docstring)."""

    kind: str
    data: torch.Tensor
    lengths: torch.Tensor | None = None  # (B,) valid prefix lengths of variable-length sequences
    grid: tuple[int, int] | None = None

    def to(self, device) -> Tokens:
        lengths = None if self.lengths is None else self.lengths.to(device)
        return Tokens(self.kind, self.data.to(device), lengths, self.grid)

    def __len__(self) -> int:
        return self.data.shape[0]
