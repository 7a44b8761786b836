"""Generator heads for binary tokens (K bits per position; tokenizers_vis/binary.py).

Two ways to model a K-bit token given the backbone's hidden state h (docs/METHODS.md, "Binary latents"):

    bernoulli      Instella-T2I: K independent Bernoulli logits, one linear map h -> K, binary
                   cross-entropy. Input embedding: a linear map of the bits written as -1 / +1.
    grouped_bits   ELM ("Elucidating the Design Space of Language Models for Image Generation", Liu et al.
                   2024): the K bits split into G = K / b groups of b consecutive bits (head_options
                   group_bits = b); each group is one 2^b-way categorical with its own projection,
                   cross-entropy. Input embedding: each group its own table of 2^b vectors, summed.

In both heads the parts of a token (bits, groups) are independent given h: the backbone carries every
dependence between them, as in the papers. DEFAULT_HEADS["binary"] = "bernoulli".

Deliberate choices:
- Loss = nats per token: summed over the K bits (bernoulli) or the G groups (grouped_bits), averaged over
  positions. The two heads and a categorical head then report losses on one scale (a categorical over 2^K
  values), and val/perplexity is a per-token perplexity.
- Bits within a group: bit j of the group has weight 2^j (first bit least significant), groups in order:
  `bits_to_groups` / `groups_to_bits` are exact inverses.
- The G group projections are one Linear(width, G * 2^b) read as (G, 2^b): the same maps as G separate
  linears, in one matmul. The G embedding tables are likewise one nn.Embedding(G * 2^b, width) with an
  offset of g * 2^b for group g. No biases, as the rest of the GPT (LlamaGen); GPT's init (normal, 0.02)
  covers every weight here.
- Guidance: logits_u + s * (logits_c - logits_u) on the Bernoulli logits or on each group's logits. A
  scale of exactly 1 does not evaluate the unconditional logits, so it is exactly conditional sampling.
- Temperature divides the logits (for a Bernoulli logit l: p = sigmoid(l / T)). top_k / top_p do not apply
  to a two-way choice: the bernoulli head ignores them; grouped_bits applies them within each group
  (sampling/common.py's filter_logits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .heads import DEFAULT_HEADS, Head, TokenEmbedding, register_head
from .logits import filter_logits, guided_logits, sample_logits


def _check_binary(vocab_size: int, token_dim: int | None, head: str) -> int:
    if vocab_size != 2:
        raise ValueError(f"generator.head={head!r} models bits: vocab_size must be 2, got {vocab_size}")
    if not token_dim or token_dim < 1:
        raise ValueError(f"generator.head={head!r} needs generator.token_dim = K, the bits per token")
    return token_dim


def _check_groups(num_bits: int, group_bits: int) -> int:
    if group_bits < 1 or num_bits % group_bits:
        raise ValueError(
            f"generator.head_options.group_bits={group_bits} must divide token_dim={num_bits} (the bits per "
            "token) into equal groups"
        )
    return num_bits // group_bits


def bits_to_groups(bits: torch.Tensor, group_bits: int) -> torch.Tensor:
    """bits (..., K) in {0, 1} -> group indices long (..., K / b) in [0, 2^b); bit j of a group weighs 2^j."""
    groups = bits.long().unflatten(-1, (-1, group_bits))  # (..., G, b)
    weights = 2 ** torch.arange(group_bits, device=bits.device)  # (b,)
    return (groups * weights).sum(-1)


def groups_to_bits(groups: torch.Tensor, group_bits: int) -> torch.Tensor:
    """group indices (..., G) in [0, 2^b) -> bits long (..., G * b): the inverse of `bits_to_groups`."""
    shifts = torch.arange(group_bits, device=groups.device)  # (b,)
    return ((groups.long().unsqueeze(-1) >> shifts) & 1).flatten(-2)


# ----------------------------------------------------------------------------------------- bernoulli


class BitEmbedding(TokenEmbedding):
    """Bits (B, T, K) -> (B, T, D): a linear map of the bits written as -1 / +1 (no bias needed)."""

    kind = "binary"

    def __init__(self, vocab_size: int, width: int, token_dim: int | None = None):
        super().__init__()
        self.proj = nn.Linear(_check_binary(vocab_size, token_dim, "bernoulli"), width, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        signs = tokens.to(self.proj.weight.dtype) * 2 - 1  # (B, T, K) in {-1, +1}
        return self.proj(signs)  # (B, T, D)


class BernoulliHead(Head):
    """K independent Bernoulli logits per position (Instella-T2I); see the module docstring.

    `sample` applies guidance to the logits, divides them by `temperature` and draws each bit; top_k and
    top_p are accepted for the common interface and ignored (they have no meaning for a single bit).
    """

    kind = "binary"

    def __init__(self, width: int, vocab_size: int, token_dim: int | None = None):
        super().__init__()
        self.num_bits = _check_binary(vocab_size, token_dim, "bernoulli")
        self.proj = nn.Linear(width, self.num_bits, bias=False)

    @property
    def token_shape(self) -> tuple[int, ...]:
        return (self.num_bits,)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)  # (..., K) logits of P(bit = 1)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, D), targets (B, T, K) in {0, 1} -> binary cross-entropy, nats per token (fp32)."""
        logits = self(hidden).float()  # (B, T, K)
        bce = F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="none")  # (B, T, K)
        return bce.sum(-1).mean()

    def sample(self, hidden, uncond=None, cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0, generator=None):
        """hidden (B, D), uncond (B, D) or None -> bits long (B, K); top_k / top_p are ignored."""
        if temperature <= 0:
            raise ValueError(f"temperature={temperature}; expected > 0")
        logits = self(hidden).float()  # (B, K)
        if uncond is not None and cfg_scale != 1.0:
            logits = guided_logits(logits, self(uncond).float(), cfg_scale)
        probs = torch.sigmoid(logits / temperature)
        noise = torch.rand(probs.shape, device=probs.device, generator=generator)
        return (noise < probs).long()  # (B, K)


# -------------------------------------------------------------------------------------- grouped bits


class GroupedBitEmbedding(TokenEmbedding):
    """Bits (B, T, K) -> (B, T, D): the sum over the G groups of that group's own embedding of its value."""

    kind = "binary"

    def __init__(self, vocab_size: int, width: int, token_dim: int | None = None, group_bits: int = 8):
        super().__init__()
        num_bits = _check_binary(vocab_size, token_dim, "grouped_bits")
        self.group_bits, self.num_groups = group_bits, _check_groups(num_bits, group_bits)
        self.table = nn.Embedding(self.num_groups * 2**group_bits, width)  # G tables of 2^b rows, stacked
        offsets = torch.arange(self.num_groups) * 2**group_bits
        self.register_buffer("offsets", offsets, persistent=False)  # (G,) derived from the config alone

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        groups = bits_to_groups(tokens, self.group_bits)  # (B, T, G)
        return self.table(groups + self.offsets).sum(-2)  # (B, T, G, D) -> (B, T, D)


class GroupedBitHead(Head):
    """G = K / b groups of b bits, each a 2^b-way categorical with its own projection (ELM).

    `sample` applies guidance, temperature, top-k and top-p to each group's 2^b logits, draws one value per
    group and writes the groups back as bits.
    """

    kind = "binary"

    def __init__(self, width: int, vocab_size: int, token_dim: int | None = None, group_bits: int = 8):
        super().__init__()
        self.num_bits = _check_binary(vocab_size, token_dim, "grouped_bits")
        self.group_bits, self.num_groups = group_bits, _check_groups(self.num_bits, group_bits)
        self.proj = nn.Linear(width, self.num_groups * 2**group_bits, bias=False)  # G projections, stacked

    @property
    def token_shape(self) -> tuple[int, ...]:
        return (self.num_bits,)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden).unflatten(-1, (self.num_groups, -1))  # (..., G, 2^b)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, D), targets (B, T, K) in {0, 1} -> cross-entropy summed over groups (nats/token)."""
        logits = self(hidden).float()  # (B, T, G, 2^b)
        groups = bits_to_groups(targets, self.group_bits)  # (B, T, G)
        ce = F.cross_entropy(logits.flatten(0, 2), groups.flatten(), reduction="none")  # (B * T * G,)
        return ce.view(groups.shape).sum(-1).mean()

    def sample(self, hidden, uncond=None, cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0, generator=None):
        """hidden (B, D), uncond (B, D) or None -> bits long (B, K)."""
        logits = self(hidden).float()  # (B, G, 2^b)
        if uncond is not None and cfg_scale != 1.0:
            logits = guided_logits(logits, self(uncond).float(), cfg_scale)
        groups = sample_logits(filter_logits(logits, temperature, top_k, top_p), generator)  # (B, G)
        return groups_to_bits(groups, self.group_bits)  # (B, K)


register_head("bernoulli", BitEmbedding)(BernoulliHead)
register_head("grouped_bits", GroupedBitEmbedding)(GroupedBitHead)
DEFAULT_HEADS["binary"] = "bernoulli"
