"""Heads and input embeddings: how a generator reads and predicts one position's token.

The backbone (gpt.py) is the same for every kind of token in DESIGN.md's "Tokens" table; what changes is

    embedding   tokens -> vectors (B, T, D) fed to the backbone
    head        the backbone's hidden state at one position (..., D) -> a distribution over that position's
                token (its parameters: logits for categorical tokens), and the training loss against targets

Only categorical tokens (codes long (B, N), a softmax over V) are implemented here. Binary, factorized,
dim-wise and diffusion heads are later additions behind the same two base classes and factories, which
raise a clear error for a kind that does not exist yet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_vis.base import TOKEN_KINDS


class Head(nn.Module):
    """Hidden states (..., D) -> distribution parameters for one position's token; `loss` trains it."""

    kind: str = ""

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TokenEmbedding(nn.Module):
    """Tokens (B, T, ...) -> input vectors (B, T, D)."""

    kind: str = ""


class CategoricalHead(Head):
    """One linear map to V logits (no bias, as LlamaGen's output layer)."""

    kind = "categorical"

    def __init__(self, width: int, vocab_size: int):
        super().__init__()
        self.proj = nn.Linear(width, vocab_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)  # (..., V)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, D), targets long (B, T) -> mean cross-entropy (computed in float32)."""
        logits = self(hidden).float()  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class CategoricalEmbedding(TokenEmbedding):
    kind = "categorical"

    def __init__(self, vocab_size: int, width: int):
        super().__init__()
        self.table = nn.Embedding(vocab_size, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table(tokens)  # (B, T) -> (B, T, D)


_HEADS: dict[str, type[Head]] = {"categorical": CategoricalHead}
_EMBEDDINGS: dict[str, type[TokenEmbedding]] = {"categorical": CategoricalEmbedding}


def _check_kind(kind: str, implemented: dict) -> None:
    if kind not in TOKEN_KINDS:
        raise ValueError(f"token kind {kind!r} is unknown; expected one of {TOKEN_KINDS}")
    if kind not in implemented:
        raise ValueError(f"token kind {kind!r} has no generator head yet; implemented: {sorted(implemented)}")


def make_head(kind: str, width: int, vocab_size: int) -> Head:
    _check_kind(kind, _HEADS)
    return _HEADS[kind](width, vocab_size)


def make_embedding(kind: str, vocab_size: int, width: int) -> TokenEmbedding:
    _check_kind(kind, _EMBEDDINGS)
    return _EMBEDDINGS[kind](vocab_size, width)
