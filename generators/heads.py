"""Heads and input embeddings: how a generator reads and predicts one position's token.

The backbone (gpt.py) is the same for every kind of token in core/tokens.py's table; what changes is

    embedding   tokens (B, T, *token_shape) -> vectors (B, T, D) fed to the backbone
    head        the backbone's hidden state at one position -> that position's token: `loss` trains it
                with teacher forcing, `sample` draws one token per row (with guidance)

A token is either one code (categorical: token_shape ()) or a vector of `token_dim` elements, each one of
`vocab_size` values (binary: K bits, vocab 2; factorized: G sub-codes; dimwise: C channel bins). Heads are
registered by name; each declares the token kind it models, so the GPT config names a head (`head`) and a
kind's default head is used when it does not.

Guidance lives in the head because a head that predicts a token's elements one after another (factorized,
dimwise) must combine the conditional and unconditional streams at every element, not once per position.
Every head's `sample` takes the conditional and (with guidance) unconditional hidden states and applies
logits_u + s * (logits_c - logits_u) to whatever logits it draws from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core import TOKEN_KINDS

from .linear import PackedLinear
from .logits import filter_logits, guided_logits, sample_logits


class Head(nn.Module):
    """Hidden states (..., D) -> one position's token. Subclasses set `kind` and `token_shape`."""

    kind: str = ""

    @property
    def token_shape(self) -> tuple[int, ...]:
        """Shape of one position's token: () for a categorical code, (token_dim,) for vectors."""
        return ()

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, D), targets (B, T, *token_shape) -> scalar training loss (teacher forcing)."""
        raise NotImplementedError

    def sample(
        self,
        hidden: torch.Tensor,
        uncond: torch.Tensor | None = None,
        cfg_scale: float = 1.0,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """hidden (B, D) conditional and uncond (B, D) or None -> tokens long (B, *token_shape)."""
        raise NotImplementedError

    def sample_stacked(
        self,
        hidden: torch.Tensor,
        guided: bool,
        cfg_scale: float = 1.0,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """`sample` on the backbone's batch as it comes out: hidden (2B, D) = [conditional; unconditional]
        when guided, (B, D) otherwise. Heads whose guidance is one combination of logits override it to run
        their projection once over both halves."""
        cond, uncond = hidden.chunk(2) if guided else (hidden, None)
        return self.sample(cond, uncond, cfg_scale, temperature, top_k, top_p, generator)


class TokenEmbedding(nn.Module):
    """Tokens (B, T, *token_shape) -> input vectors (B, T, D)."""

    kind: str = ""


class CategoricalHead(Head):
    """One linear map to V logits (no bias, as LlamaGen's output layer)."""

    kind = "categorical"

    def __init__(self, width: int, vocab_size: int, token_dim: int | None = None):
        super().__init__()
        self.proj = PackedLinear(width, vocab_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)  # (..., V)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, D), targets long (B, T) -> mean cross-entropy (computed in float32)."""
        logits = self(hidden).float()  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def sample(self, hidden, uncond=None, cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0, generator=None):
        stacked = hidden if uncond is None else torch.cat([hidden, uncond])
        return self.sample_stacked(
            stacked, uncond is not None, cfg_scale, temperature, top_k, top_p, generator
        )

    def sample_stacked(
        self, hidden, guided, cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0, generator=None
    ):
        logits = self(hidden).float()  # (B or 2B, V): one projection over both halves
        if guided:
            logits = guided_logits(*logits.chunk(2), cfg_scale)
        return sample_logits(filter_logits(logits, temperature, top_k, top_p), generator)  # (B,)


class CategoricalEmbedding(TokenEmbedding):
    kind = "categorical"

    def __init__(self, vocab_size: int, width: int, token_dim: int | None = None):
        super().__init__()
        self.table = nn.Embedding(vocab_size, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table(tokens)  # (B, T) -> (B, T, D)


_HEADS: dict[str, type[Head]] = {}
_EMBEDDINGS: dict[str, type[TokenEmbedding]] = {}
DEFAULT_HEADS: dict[str, str] = {"categorical": "categorical"}  # token kind -> head used when none is named


def register_head(name: str, embedding: type[TokenEmbedding]):
    """Class decorator: make a head (and the input embedding it pairs with) available as `head=name`."""

    def wrap(cls: type[Head]) -> type[Head]:
        _HEADS[name], _EMBEDDINGS[name] = cls, embedding
        return cls

    return wrap


register_head("categorical", CategoricalEmbedding)(CategoricalHead)


def resolve_head(kind: str, head: str | None) -> str:
    """The head name for `kind`: `head` when given (it must model that kind), else the kind's default."""
    if kind not in TOKEN_KINDS:
        raise ValueError(f"token kind {kind!r} is unknown; expected one of {TOKEN_KINDS}")
    if head is None:
        if kind not in DEFAULT_HEADS:
            raise ValueError(f"token kind {kind!r} has no generator head yet; implemented: {sorted(_HEADS)}")
        head = DEFAULT_HEADS[kind]
    if head not in _HEADS:
        raise ValueError(f"generator.head={head!r} is unknown; expected one of {sorted(_HEADS)}")
    if _HEADS[head].kind != kind:
        raise ValueError(f"generator.head={head!r} models {_HEADS[head].kind} tokens, not {kind}")
    return head


def make_head(
    kind: str, width: int, vocab_size: int, token_dim: int | None = None, head: str | None = None, **options
) -> Head:
    return _HEADS[resolve_head(kind, head)](width, vocab_size, token_dim, **options)


def make_embedding(
    kind: str, vocab_size: int, width: int, token_dim: int | None = None, head: str | None = None, **options
) -> TokenEmbedding:
    return _EMBEDDINGS[resolve_head(kind, head)](vocab_size, width, token_dim, **options)
