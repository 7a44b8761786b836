"""FAR head for factorized tokens (G sub-codes per position; tokenizers_vis/fq.py).

FQGAN's generator, FAR ("Factorized Visual Tokenization and Generation", Bai et al., 2024, arXiv
2411.16681), keeps the GPT backbone and changes what one position reads and predicts:

    embedding   the G sub-tokens' embeddings summed: sum_g E_g[x_g], each E_g its own nn.Embedding(V, width)
    head        a small per-position module that predicts the sub-tokens one after another: sub-token g's
                logits come from the backbone's hidden state h plus the embeddings of sub-tokens < g

DEFAULT_HEADS["factorized"] = "factorized".

The head, step by step (g = 0 .. G-1, all positions in parallel):

    x_g    = h + S[g] + sum_{j < g} P_j[x_j]    S: step embeddings (G, width); P_j: prefix tables (V, width)
    u_g    = RMSNorm(MLP blocks(x_g))             `depth` residual blocks x + Linear(SiLU(Linear(RMSNorm(x))))
    logits = W_g u_g                              W_g (V, width): each sub-codebook its own output map

Deliberate choices:
- A residual MLP on the sum, not a causal transformer over the G steps: with G = 2 or 3 steps, the sum of
  the prefix embeddings (one table per sub-codebook, so the sum still tells which sub-codebook each came
  from) carries everything a step needs. The prefix tables P_j are the head's own, separate from the input
  embedding E_g: they serve a different role (conditioning the next sub-token within a position).
- Teacher forcing (`loss`, `logits`) evaluates all G steps at once from the target sub-tokens: the prefix
  sums are a cumulative sum, and the G output maps are one einsum over W (G, V, width). `step_logits` is
  the same computation for one step; `sample` calls it g = 0 .. G-1 (tests check both agree).
- Loss: cross-entropy averaged over the G sub-tokens and the positions (nats per sub-token; val/perplexity
  is then a per-sub-token perplexity), computed in float32.
- Guidance at every sub-step: logits_u + s * (logits_c - logits_u), where the unconditional stream is
  conditioned on the SAME drawn sub-tokens as the conditional one (both streams' prefix sums use the drawn
  x_j). Scale exactly 1 (or no unconditional state) skips the unconditional logits: exactly conditional
  sampling. Then temperature / top-k / top-p within the sub-codebook (sampling/common.py) and one draw.
- Options (`generator.head_options`): depth (residual MLP blocks, default 1), mlp_ratio (default 2.0).
  Weights are initialised by the GPT (normal 0.02 for every Linear and Embedding, RMSNorm weights 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .heads import DEFAULT_HEADS, Head, TokenEmbedding, register_head
from .logits import filter_logits, guided_logits, sample_logits


def _check_factorized(token_dim: int | None) -> int:
    if not token_dim or token_dim < 1:
        raise ValueError(
            "generator.head='factorized' needs generator.token_dim = G, the sub-codebooks per token"
        )
    return int(token_dim)


class FactorizedEmbedding(TokenEmbedding):
    """Sub-tokens (B, T, G) -> (B, T, D): the sum of G embeddings, each sub-codebook its own table."""

    kind = "factorized"

    def __init__(self, vocab_size: int, width: int, token_dim: int | None = None, **head_options):
        super().__init__()  # head_options (depth, mlp_ratio) belong to the head
        num_codebooks = _check_factorized(token_dim)
        self.tables = nn.ModuleList(nn.Embedding(vocab_size, width) for _ in range(num_codebooks))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return sum(table(tokens[..., g]) for g, table in enumerate(self.tables))  # (B, T, D)


class _MLPBlock(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.norm = nn.RMSNorm(width, eps=1e-5)
        self.up = nn.Linear(width, hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.silu(self.up(self.norm(x))))


class FactorizedHead(Head):
    """Hidden (..., D) -> G sub-tokens, predicted one after another (module docstring)."""

    kind = "factorized"

    def __init__(
        self,
        width: int,
        vocab_size: int,
        token_dim: int | None = None,
        depth: int = 1,
        mlp_ratio: float = 2.0,
    ):
        super().__init__()
        self.num_codebooks, self.vocab_size = _check_factorized(token_dim), vocab_size
        self.step = nn.Embedding(self.num_codebooks, width)  # S: which sub-token is predicted
        self.prefix = nn.ModuleList(nn.Embedding(vocab_size, width) for _ in range(self.num_codebooks - 1))
        self.blocks = nn.Sequential(*[_MLPBlock(width, int(width * mlp_ratio)) for _ in range(depth)])
        self.norm = nn.RMSNorm(width, eps=1e-5)
        self.proj = nn.Linear(width, self.num_codebooks * vocab_size, bias=False)  # G maps W_g (V, D)

    @property
    def token_shape(self) -> tuple[int, ...]:
        return (self.num_codebooks,)

    def _out_weight(self) -> torch.Tensor:
        return self.proj.weight.view(self.num_codebooks, self.vocab_size, -1)  # (G, V, D)

    def prefix_context(self, tokens: torch.Tensor) -> torch.Tensor:
        """Sub-tokens (..., g) of one position's prefix, g < G -> sum_{j < g} P_j[x_j] (..., D)."""
        context = self.step.weight.new_zeros(*tokens.shape[:-1], self.step.weight.shape[1])
        for j in range(tokens.shape[-1]):
            context = context + self.prefix[j](tokens[..., j])
        return context

    def step_logits(self, hidden: torch.Tensor, context: torch.Tensor, g: int) -> torch.Tensor:
        """Logits of sub-token g: hidden (..., D), context (..., D) = prefix_context(x_<g) -> (..., V)."""
        u = self.norm(self.blocks(hidden + self.step.weight[g] + context))  # (..., D)
        return u @ self._out_weight()[g].t()

    def logits(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: hidden (B, T, D), targets (B, T, G) -> logits (B, T, G, V); step g sees
        targets[..., :g]."""
        steps = hidden.unsqueeze(-2) + self.step.weight  # (B, T, G, D)
        if self.num_codebooks > 1:
            previous = torch.stack(
                [self.prefix[j](targets[..., j]) for j in range(self.num_codebooks - 1)], dim=-2
            )  # (B, T, G - 1, D): P_j[x_j]
            context = F.pad(previous.cumsum(dim=-2), (0, 0, 1, 0))  # (B, T, G, D): sum over j < g
            steps = steps + context
        u = self.norm(self.blocks(steps))  # (B, T, G, D)
        return torch.einsum("...gd,gvd->...gv", u, self._out_weight())

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, D), targets long (B, T, G) -> cross-entropy averaged over sub-tokens (float32)."""
        logits = self.logits(hidden, targets).float()  # (B, T, G, V)
        return F.cross_entropy(logits.flatten(0, -2), targets.flatten())

    def sample(self, hidden, uncond=None, cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0, generator=None):
        """hidden (B, D), uncond (B, D) or None -> sub-tokens long (B, G), drawn g = 0 .. G-1."""
        guided = uncond is not None and cfg_scale != 1.0
        rows = torch.cat([hidden, uncond]) if guided else hidden  # (B or 2B, D)
        context = torch.zeros_like(rows)  # both streams condition on the same drawn sub-tokens
        tokens = []
        for g in range(self.num_codebooks):
            logits = self.step_logits(rows, context, g).float()  # (B or 2B, V)
            if guided:
                cond, unc = logits.chunk(2)
                logits = guided_logits(cond, unc, cfg_scale)
            token = sample_logits(filter_logits(logits, temperature, top_k, top_p), generator)  # (B,)
            tokens.append(token)
            if g + 1 < self.num_codebooks:
                context = context + self.prefix[g](torch.cat([token, token]) if guided else token)
        return torch.stack(tokens, dim=-1)  # (B, G)


register_head("factorized", FactorizedEmbedding)(FactorizedHead)
DEFAULT_HEADS["factorized"] = "factorized"
