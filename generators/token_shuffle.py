"""Token-Shuffle: "Token-Shuffle: Towards High-Resolution Image Generation with Autoregressive Models"
(Ma et al., 2025). s x s grid tokens per transformer position, so the GPT runs s^2 times fewer positions.

    image tokens (B, h*w), raster order
        |  shuffle_tokens: each s x s window becomes one position holding its s^2 tokens (slots)
        v
    window tokens (B, P, s^2), P = (h/s)(w/s), windows in raster order of the (h/s, w/s) grid
        |  ShuffleEmbedding: each slot's code embedded (D), projected to D / s^2, the s^2 parts
        |  concatenated into one D-vector, then residual MLP blocks
        v
    GPT backbone over P positions (2D RoPE on the (h/s, w/s) window grid)
        |  ShuffleHead: residual MLP blocks, split into s^2 parts of D / s^2, each projected back to D,
        |  one shared output layer -> logits (B, P, s^2, V)
        v
    the s^2 tokens of a window, drawn independently given the prefix of windows

The GPT uses it through one setting, `GPT(shuffle=s)` (generators/gpt.py): s = 1 is the plain model and
builds none of this. The head is registered as "shuffle" (a categorical head whose token_shape is (s^2,)),
so the samplers treat a window as one position whose token has s^2 slots (sampling/engine.py).

Deliberate choices ([unverified] in docs/METHODS.md, "Token-Shuffle": the authors released no code):
- The input projection D -> D / s^2 and the output projection D / s^2 -> D are shared by the s^2 slots (a
  slot's place in the window is given by where its part sits in the concatenation), and so is the output
  layer D -> V: the paper's "one shared head".
- `mlp_blocks` (default 2) residual MLP blocks on each side: pre-RMSNorm, D -> ratio * D -> D with SiLU.
- Slots within a window are in raster order (dy, dx); the loss is the mean cross-entropy over all h*w
  tokens, i.e. each window's loss is the sum of its slots' (independent given the prefix).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .heads import CategoricalHead, TokenEmbedding, register_head
from .linear import PackedLinear


def shuffle_tokens(tokens: torch.Tensor, grid: tuple[int, int], s: int) -> torch.Tensor:
    """Image tokens (B, h*w) in raster order -> window tokens (B, (h/s)*(w/s), s*s)."""
    h, w = grid
    batch = tokens.shape[0]
    windows = tokens.reshape(batch, h // s, s, w // s, s).permute(0, 1, 3, 2, 4)  # (B, h/s, w/s, s, s)
    return windows.reshape(batch, (h // s) * (w // s), s * s)


def unshuffle_tokens(windows: torch.Tensor, grid: tuple[int, int], s: int) -> torch.Tensor:
    """Window tokens (B, (h/s)*(w/s), s*s) -> image tokens (B, h*w) in raster order."""
    h, w = grid
    batch = windows.shape[0]
    tokens = windows.reshape(batch, h // s, w // s, s, s).permute(0, 1, 3, 2, 4)  # (B, h/s, s, w/s, s)
    return tokens.reshape(batch, h * w)


def check_shuffle(grid, s: int, width: int) -> None:
    """The one-line errors of a shuffle setting that cannot work, before anything is built."""
    if not isinstance(s, int) or s < 1:
        raise ValueError(f"generator.shuffle={s!r}; expected an integer >= 1 (1: no Token-Shuffle)")
    if s == 1:
        return
    if grid is None:
        raise ValueError(f"generator.shuffle={s} needs grid tokens (generator.grid=[h, w], a 2D tokenizer)")
    if grid[0] % s or grid[1] % s:
        raise ValueError(f"generator.shuffle={s} does not divide the token grid {list(grid)}")
    if width % (s * s):
        raise ValueError(f"generator.shuffle={s}: the width {width} is not a multiple of s^2 = {s * s}")


class ResidualMLP(nn.Module):
    """x + W2 silu(W1 norm(x)): the MLP blocks on either side of the backbone."""

    def __init__(self, width: int, ratio: int = 2):
        super().__init__()
        self.norm = nn.RMSNorm(width, eps=1e-5)
        self.up = PackedLinear(width, ratio * width, bias=False)
        self.down = PackedLinear(ratio * width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.silu(self.up(self.norm(x))))


class ShuffleEmbedding(TokenEmbedding):
    """Window tokens (B, T, s^2) -> one input vector per window (B, T, D)."""

    kind = "categorical"

    def __init__(self, vocab_size: int, width: int, token_dim: int, mlp_blocks: int = 2, mlp_ratio: int = 2):
        super().__init__()
        self.slots = token_dim
        self.table = nn.Embedding(vocab_size, width)
        self.reduce = PackedLinear(width, width // token_dim, bias=False)  # shared by the slots
        self.blocks = nn.Sequential(*[ResidualMLP(width, mlp_ratio) for _ in range(mlp_blocks)])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        parts = self.reduce(self.table(tokens))  # (B, T, s^2, D / s^2)
        return self.blocks(parts.flatten(-2))  # (B, T, D)


@register_head("shuffle", ShuffleEmbedding)
class ShuffleHead(CategoricalHead):
    """Hidden states (..., D) -> logits (..., s^2, V) of the window's s^2 tokens. Sampling (CategoricalHead's
    rule, which works on any leading shape) draws the slots independently, guidance applied to each."""

    def __init__(self, width: int, vocab_size: int, token_dim: int, mlp_blocks: int = 2, mlp_ratio: int = 2):
        super().__init__(width, vocab_size)  # self.proj: the shared output layer D -> V
        self.slots = token_dim
        self.blocks = nn.Sequential(*[ResidualMLP(width, mlp_ratio) for _ in range(mlp_blocks)])
        self.expand = PackedLinear(width // token_dim, width, bias=False)  # shared by the slots
        self.norm = nn.RMSNorm(width, eps=1e-5)

    @property
    def token_shape(self) -> tuple[int, ...]:
        return (self.slots,)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        parts = self.blocks(hidden).unflatten(-1, (self.slots, -1))  # (..., s^2, D / s^2)
        return self.proj(self.norm(self.expand(parts)))  # (..., s^2, V)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, D), targets (B, T, s^2) -> mean cross-entropy over every token (float32)."""
        logits = self(hidden).float()  # (B, T, s^2, V)
        return F.cross_entropy(logits.flatten(0, -2), targets.flatten())
