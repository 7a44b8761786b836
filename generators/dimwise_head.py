"""The dimension-wise head of TokenBridge: "Bridging Continuous and Discrete Tokens for Autoregressive Visual
Generation" (Wang et al., 2025; tokenizers_vis/tokenbridge.py makes the tokens).

A dimwise token is C channel bins, each one of V = 2^B values (B bits per channel). The backbone (gpt.py)
reads a token as one vector and outputs one hidden state per position; a light causal transformer over the C
channels of that position then predicts the bins one channel after another:

    step            0             1                          ...   C - 1
    input           proj(h)       emb_0(bin of channel o_0)   ...   emb_(C-2)(bin of channel o_(C-2))
                    + pos_0       + pos_1                           + pos_(C-1)
    predicts        channel o_0   channel o_1                 ...   channel o_(C-1)      (V-way softmax each)

where h is the backbone's hidden state and o the channel order. Registered as head "dimwise", the default of
the "dimwise" token kind (DEFAULT_HEADS["dimwise"] = "dimwise").

Deliberate choices:
- Input embedding of a token (`DimwiseEmbedding`): the sum of C per-channel embeddings of its bins (one
  table of C * V rows with an offset per channel), i.e. a linear map of the concatenated one-hot bins.
- The condition h enters once, as the first step's input (a linear map width -> channel_width); the official
  head instead modulates every block with it (AdaLN). Every later step attends to it through causal attention.
- Blocks are the backbone's own (gpt.Block: RMSNorm, RoPE attention, SwiGLU, no biases), and sampling uses the
  backbone's KVCache over the C steps; on top of RoPE, a learned per-step embedding says which channel a step
  is. Each step has its own input table and its own output projection (channel_width -> V), as the official
  head's per-channel embeddings and heads. GPT's init (normal, 0.02) covers every Linear and Embedding here;
  the step embeddings and output projections are initialised the same way.
- Channel order (`head_options.channel_order`): "natural" (0, 1, ..., C-1, the default), "reversed", or an
  explicit permutation of 0..C-1 (the official code uses a fixed frequency-based permutation). Tokens, targets
  and sampled bins are always in natural channel order; the order only decides which channel is predicted
  first.
- Loss: teacher forcing, cross-entropy averaged over channels and positions (nats per channel; val/perplexity
  is then a per-channel perplexity over the V bins).
- Guidance at every channel: the conditional and unconditional hidden states run as one doubled batch; at
  each step the logits combine as l_u + s * (l_c - l_u), then temperature / top-k / top-p
  (sampling/common.py) and one draw, and BOTH streams continue from the bin drawn, so the unconditional stream
  conditions on the same previous channels. A scale of exactly 1 (or no unconditional state) runs the
  conditional stream alone: exactly unguided sampling.
- Sizes (`head_options`): channel_width 256, channel_depth 2, channel_heads 4 by default ("light": a
  fraction of the backbone's cost per token); the quickstart uses a narrower head.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .gpt import Block, KVCache, Rotary, run_blocks
from .heads import DEFAULT_HEADS, Head, TokenEmbedding, register_head
from .logits import filter_logits, guided_logits, sample_logits


def _check_dimwise(vocab_size: int, token_dim: int | None) -> int:
    if vocab_size < 2:
        raise ValueError(f"generator.head='dimwise' needs vocab_size = 2^B >= 2 bins, got {vocab_size}")
    if not token_dim or token_dim < 1:
        raise ValueError("generator.head='dimwise' needs generator.token_dim = C, the channels per token")
    return token_dim


def channel_permutation(order: str | list[int] | tuple[int, ...], channels: int) -> torch.Tensor:
    """ "natural", "reversed" or a permutation of 0..C-1 -> long (C,): step s predicts channel order[s]."""
    if order == "natural":
        return torch.arange(channels)
    if order == "reversed":
        return torch.arange(channels - 1, -1, -1)
    if isinstance(order, str) or sorted(int(c) for c in order) != list(range(channels)):
        raise ValueError(
            f"generator.head_options.channel_order={order!r}; expected 'natural', 'reversed' or a "
            f"permutation of 0..{channels - 1}"
        )
    return torch.tensor([int(c) for c in order])


class DimwiseEmbedding(TokenEmbedding):
    """Bins (B, T, C) -> (B, T, D): the sum of each channel's own embedding of its bin."""

    kind = "dimwise"

    def __init__(self, vocab_size: int, width: int, token_dim: int | None = None, **head_options):
        super().__init__()  # head_options (channel_order, channel_width, ...) concern the head only
        channels = _check_dimwise(vocab_size, token_dim)
        self.table = nn.Embedding(channels * vocab_size, width)  # C tables of V rows, stacked
        self.register_buffer("offsets", torch.arange(channels) * vocab_size, persistent=False)  # (C,)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table(tokens + self.offsets).sum(-2)  # (B, T, C, D) -> (B, T, D)


class DimwiseHead(Head):
    """A small causal transformer over the C channels of one position; see the module docstring."""

    kind = "dimwise"

    def __init__(
        self,
        width: int,
        vocab_size: int,
        token_dim: int | None = None,
        channel_order: str | list[int] = "natural",
        channel_width: int = 256,
        channel_depth: int = 2,
        channel_heads: int = 4,
    ):
        super().__init__()
        self.channels, self.vocab_size = _check_dimwise(vocab_size, token_dim), vocab_size
        if channel_width % channel_heads or (channel_width // channel_heads) % 2:
            raise ValueError(
                f"generator.head_options: channel_width={channel_width} must split into channel_heads="
                f"{channel_heads} heads of an even size (RoPE)"
            )
        self.heads, self.head_dim = channel_heads, channel_width // channel_heads
        self.register_buffer("order", channel_permutation(channel_order, self.channels), persistent=False)
        self.register_buffer("inverse", self.order.argsort(), persistent=False)  # natural -> step
        steps, d = self.channels, channel_width
        self.cond_proj = nn.Linear(width, d, bias=False)
        # Step s >= 1 reads the bin drawn at step s - 1 through its own table: C - 1 tables of V rows.
        self.bin_embed = nn.Embedding(max(steps - 1, 1) * vocab_size, d)
        self.register_buffer("offsets", torch.arange(steps) * vocab_size, persistent=False)  # (C,)
        self.step_embed = nn.Parameter(0.02 * torch.randn(steps, d))  # which channel a step predicts
        self.rope = Rotary(self.head_dim, steps, None, 10000.0)
        self.blocks = nn.ModuleList(Block(d, channel_heads) for _ in range(channel_depth))
        self.norm = nn.RMSNorm(d, eps=1e-5)
        self.out_proj = nn.Parameter(0.02 * torch.randn(steps, d, vocab_size))  # per-step d -> V, no bias

    @property
    def token_shape(self) -> tuple[int, ...]:
        return (self.channels,)

    def _trunk(self, x: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """x (M, t, d) at the next t steps (after the cache's, 0 without cache) -> (M, t, d)."""
        return self.norm(run_blocks(self.blocks, self.rope, x, cache))

    def ordered_logits(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: hidden (M, D), targets (M, C) in natural order -> logits (M, C, V) in step order
        (float32): step s predicts channel order[s] given the true bins of the channels before it."""
        ordered = targets[:, self.order]  # (M, C)
        inputs = [self.cond_proj(hidden)[:, None]]  # (M, 1, d)
        if self.channels > 1:
            inputs.append(self.bin_embed(ordered[:, :-1] + self.offsets[:-1]))  # (M, C - 1, d)
        x = self._trunk(torch.cat(inputs, dim=1) + self.step_embed, cache=None)  # (M, C, d)
        return torch.einsum("mcd,cdv->mcv", x, self.out_proj).float()

    def logits(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """hidden (..., D), targets (..., C) -> teacher-forced logits (..., C, V) in natural channel order."""
        flat = self.ordered_logits(hidden.flatten(0, -2), targets.flatten(0, -2))  # (M, C, V)
        return flat[:, self.inverse].unflatten(0, targets.shape[:-1])

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, D), targets (B, T, C) -> cross-entropy averaged over channels and positions."""
        flat_targets = targets.flatten(0, -2)  # (M, C)
        logits = self.ordered_logits(hidden.flatten(0, -2), flat_targets)  # (M, C, V) step order
        return F.cross_entropy(logits.flatten(0, 1), flat_targets[:, self.order].flatten())

    def decode_channels(
        self,
        hidden: torch.Tensor,
        uncond: torch.Tensor | None,
        cfg_scale: float,
        choose: Callable[[torch.Tensor, int], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Step through the C channels with a KV cache: hidden (B, D), uncond (B, D) or None ->
        (bins long (B, C), the (guided) logits each bin was chosen from (B, C, V)), both in natural order.

        `choose(logits (B, V), step) -> (B,)` picks step's bin (a draw in `sample`, given bins in tests)."""
        guided = uncond is not None and cfg_scale != 1.0
        batch = hidden.shape[0]
        x = self.cond_proj(torch.cat([hidden, uncond]) if guided else hidden)  # (R, d), R = B or 2B
        cache = KVCache(
            len(self.blocks), x.shape[0], self.heads, self.channels, self.head_dim, x.device, x.dtype
        )
        bins = torch.zeros(batch, self.channels, dtype=torch.long, device=hidden.device)
        chosen_logits = torch.zeros(batch, self.channels, self.vocab_size, device=hidden.device)
        for step in range(self.channels):
            out = self._trunk((x + self.step_embed[step])[:, None], cache)[:, 0]  # (R, d)
            logits = (out @ self.out_proj[step]).float()  # (R, V)
            if guided:
                cond, uncond_logits = logits.chunk(2)
                logits = guided_logits(cond, uncond_logits, cfg_scale)  # (B, V)
            choice = choose(logits, step)  # (B,)
            channel = int(self.order[step])
            bins[:, channel], chosen_logits[:, channel] = choice, logits
            if step + 1 < self.channels:
                x = self.bin_embed(choice + self.offsets[step])  # (B, d): the next step's input
                x = torch.cat([x, x]) if guided else x  # both streams continue from the same bin
        return bins, chosen_logits

    def sample(self, hidden, uncond=None, cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0, generator=None):
        """hidden (B, D), uncond (B, D) or None -> bins long (B, C), drawn channel by channel."""

        def draw(logits: torch.Tensor, step: int) -> torch.Tensor:
            return sample_logits(filter_logits(logits, temperature, top_k, top_p), generator)

        return self.decode_channels(hidden, uncond, cfg_scale, draw)[0]


register_head("dimwise", DimwiseEmbedding)(DimwiseHead)
DEFAULT_HEADS["dimwise"] = "dimwise"
