"""An EAGLE-style drafter: one decoder layer on the target GPT's own hidden states ("EAGLE: Speculative
Sampling Requires Rethinking Feature Uncertainty", Li et al. 2024), the drafter LANTERN uses.

At draft position i the drafter reads the pair (token i, f_i), f_i the target's final-normed hidden state
at the position that predicted token i, and predicts the target's next hidden state:

    f^_{i+1} = norm(block(fc(concat(embed(token i), f_i))))        # (B, T, D)
    q(token i + 1) = softmax(head(f^_{i+1}))                       # the target's own, frozen head

so it drafts from the target's features instead of guessing from tokens alone, and a draft pass costs one
layer of the target's width plus its head. Drafting k tokens ahead, the drafter feeds its own predictions
(d, f^) back as the next pair. The token embedding and head are the target's, frozen and not stored with
the drafter (`bind(target)` attaches them; the export records the target's config to check the pairing).

Deliberate choices:
- A final RMSNorm on the block's output, so the prediction lives at the scale of the target's normed
  features it regresses to and that the head reads (EAGLE regresses the unnormed layer output to the
  target's pre-head features; here those are post-norm, see generators/gpt.py).
- RoPE as the target's (1D or 2D), with token i at the target's position i + 1 (`Rotary(first_position=1)`).
- Its own per-row KV cache (generators/gpt.py's `CachedBlocks`): draft position i holds the pair of token i.
- Training (training/eagle_module.py): teacher-forced pairs from the target over the extracted codes, with
  labels dropped as in the target's training so the drafter also predicts the unconditional features that
  guidance needs; loss = smooth-L1 regression of f^_{i+1} to f_{i+1} + 0.1 x cross-entropy of the drafter's
  distribution to the target's softmax(head(f_{i+1})); uniform noise of std 0.2 on the input features
  (U(-a, a), a = 0.2 * sqrt(3)), as EAGLE does against its own errors compounding while drafting.
"""

from __future__ import annotations

import torch
from torch import nn

from core import Exportable, register

from .gpt import Block, CachedBlocks, Rotary
from .linear import PackedLinear

# the target config entries a drafter depends on (checked by `bind`)
TARGET_KEYS = ("vocab_size", "num_tokens", "grid", "width", "rope_base", "token_kind")


@register("eagle")
class EagleDrafter(CachedBlocks, Exportable, nn.Module):
    fsdp_blocks = (Block,)

    def __init__(self, target: dict, heads: int | None = None):
        """target: the target GPT's architecture (`GPT.architecture`); heads: attention heads of the
        drafter's layer (default: the target's)."""
        super().__init__()
        # shuffle: absent from drafters exported before Token-Shuffle (their targets had none)
        target = {key: target[key] for key in TARGET_KEYS} | {
            "heads": target["heads"],
            "shuffle": target.get("shuffle", 1),
        }
        if target["token_kind"] != "categorical":
            raise ValueError(
                f"the EAGLE drafter needs a categorical target; this one models {target['token_kind']}"
            )
        heads = heads or target["heads"]
        width = target["width"]
        if width % heads or (width // heads) % (2 if target["grid"] is None else 4):
            raise ValueError(f"EAGLE drafter heads={heads} does not fit the target's width {width} with RoPE")
        self.target_architecture = target
        self.num_tokens, self.heads, self.head_dim = target["num_tokens"], heads, width // heads
        shuffle = target["shuffle"]  # Token-Shuffle target: one position per s x s window, as the target's
        self.num_positions = self.num_tokens // shuffle**2
        grid = None if target["grid"] is None else tuple(side // shuffle for side in target["grid"])
        self.fc = PackedLinear(2 * width, width, bias=False)
        self.blocks = nn.ModuleList([Block(width, heads)])
        self.norm = nn.RMSNorm(width, eps=1e-5)
        self.rope = Rotary(self.head_dim, self.num_positions, grid, target["rope_base"], first_position=1)
        self.cache = None
        self._target: list[nn.Module] = []  # the bound target, kept out of the module tree (not saved)
        for module in (self.fc, *self.blocks):
            for sub in module.modules():
                if isinstance(sub, nn.Linear):
                    nn.init.normal_(sub.weight, mean=0.0, std=0.02)

    @classmethod
    def for_target(cls, target: nn.Module, heads: int | None = None) -> EagleDrafter:
        return cls(target.architecture, heads).bind(target)

    def bind(self, target: nn.Module) -> EagleDrafter:
        """Attach the target whose embedding and head the drafter uses; its config must match."""
        mine, theirs = self.target_architecture, target.architecture
        for key in TARGET_KEYS + ("heads", "shuffle"):
            if theirs.get(key) != mine[key]:
                raise ValueError(
                    f"this EAGLE drafter was trained for a target with {key}={mine[key]}, "
                    f"the generator has {key}={theirs.get(key)}"
                )
        self._target = [target]
        return self

    @property
    def target(self) -> nn.Module:
        if not self._target:
            raise RuntimeError("the EAGLE drafter is not bound to a target: call bind(target) first")
        return self._target[0]

    @property
    def default_cache_len(self) -> int:
        return self.num_positions

    def _predict(self, tokens: torch.Tensor, features: torch.Tensor, cache=None) -> torch.Tensor:
        x = self.fc(torch.cat([self.target.embed(tokens), features.to(self.fc.weight.dtype)], dim=-1))
        return self.norm(self.run_blocks(x, cache))  # (B, T, D)

    def forward(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: tokens (B, T) = tokens 0 .. T-1 and features (B, T, D) = f_0 .. f_{T-1} ->
        predicted features (B, T, D) of positions 1 .. T (f^_{i+1} at index i), causal."""
        return self._predict(tokens, features)

    def decode(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Append pairs (tokens (B, T), features (B, T, D)) at each row's cache length -> predicted next
        features (B, T, D)."""
        return self._predict(tokens, features, self._cache_for(tokens.shape[0]))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The target's head on predicted features: (..., D) -> (..., V)."""
        return self.target.logits(features)
