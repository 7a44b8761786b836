"""Class-conditional GPT in the style of LlamaGen: "Autoregressive Model Beats Diffusion: Llama for Scalable
Image Generation" (Sun et al., 2024).

A pre-norm decoder-only transformer (RMSNorm, SwiGLU MLP, no biases, rotary position embeddings) over

    position    0        1       2      ...   N - 1        (N + 1 positions exist, see the KV cache below)
    input       class    tok0    tok1   ...   tok(N-2)
    predicts    tok0     tok1    tok2   ...   tok(N-1)

so the hidden state at position i predicts image token i. The class embedding has num_classes + 1 rows; the
last row is the null class of classifier-free guidance, and in training mode labels are replaced by it with
probability `label_dropout` (`drop_labels`).

Deliberate choices:
- RoPE is 1D for 1D token sequences (grid None): position p = index in [class, tok0, tok1, ...], and the
  class position p = 0 is unrotated. For grid tokens (grid=(h, w)) it is 2D: the first half of each head's
  rotary pairs turn with the row of the input token, the second half with its column (LlamaGen's split), and
  the class position is unrotated. LlamaGen's tables store zeros (cos = sin = 0) at the class position, which
  zeroes its query and key instead of leaving them unrotated; here it is a plain identity rotation.
  Rotary pairs are interleaved (x0, x1), (x2, x3), ... as in LlamaGen.
- MLP width: round_up(8 D / 3, 256) (LlamaGen's multiple_of = 256), so the presets have the published sizes:
  B 111M, L 343M, XL 775M, XXL 1.4B with LlamaGen's 16384 codes and 1000 classes.
- Init: every linear layer and embedding ~ normal(0, 0.02), RMSNorm weights 1. LlamaGen also zero-inits the
  output layer; not here, so a fresh model gives position-dependent logits (cache tests, benchmarks).
- No dropout besides label dropout (LlamaGen's recipe adds 0.1 token, residual and MLP dropout).
- Heads and input embeddings come from heads.py (`token_kind`, `head`), so the backbone serves every token
  kind. Tokens are (B, T) codes for categorical tokens and (B, T, token_dim) for vector tokens (bits,
  sub-codes, channel bins); every shape below writes (B, T) for either.

KV cache (inference only, under torch.no_grad): `setup_cache` preallocates keys and values for every layer,
`prefill(labels)` writes the class position, `decode(tokens (B, k))` appends k positions at the current
length: causal attention among the k new positions, full attention to the cache, so a k-token step equals
the same positions of the full forward pass (speculative verification, Jacobi windows). `truncate_cache(L)`
rolls back to any shorter length (rejected drafts). All rows of a batch share one length: they advance and
roll back together.

Size presets (width / depth / heads): tiny 128/4/4 (CPUs and tests), B 768/12/12, L 1024/24/16,
XL 1280/36/20, XXL 1536/48/24.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from tokenizers_vis.base import Exportable, register

from .heads import make_embedding, make_head

GPT_SIZES = {
    "tiny": dict(width=128, depth=4, heads=4),
    "B": dict(width=768, depth=12, heads=12),
    "L": dict(width=1024, depth=24, heads=16),
    "XL": dict(width=1280, depth=36, heads=20),
    "XXL": dict(width=1536, depth=48, heads=24),
}


def _mlp_hidden(width: int, multiple_of: int = 256) -> int:
    hidden = int(8 * width / 3)
    return multiple_of * -(-hidden // multiple_of)


class Rotary(nn.Module):
    """Rotary position embedding with cos/sin tables for positions 0..num_tokens (class + every token).

    1D (grid None): angle(p, j) = p * base^(-2j / Dh). 2D (grid (h, w)): position p >= 1 holds token p - 1 at
    row (p - 1) // w, column (p - 1) % w; pairs j < Dh/4 turn with the row, the others with the column, both
    with frequencies base^(-2j / (Dh/2)). Position 0 (class) is unrotated in both cases.
    """

    def __init__(self, head_dim: int, num_tokens: int, grid: tuple[int, int] | None, base: float):
        super().__init__()
        if grid is None:
            freqs = base ** (-torch.arange(0, head_dim, 2).float() / head_dim)  # (Dh/2,)
            angles = torch.arange(num_tokens + 1).float()[:, None] * freqs  # (N + 1, Dh/2), row 0 = 0
        else:
            half = head_dim // 2
            freqs = base ** (-torch.arange(0, half, 2).float() / half)  # (Dh/4,)
            index = torch.arange(num_tokens)
            rows, cols = (index // grid[1]).float(), (index % grid[1]).float()  # (N,)
            angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=-1)  # (N, Dh/2)
            angles = torch.cat([torch.zeros(1, half), angles])  # (N + 1, Dh/2), class position unrotated
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x (B, H, T, Dh) at positions start .. start + T - 1 -> rotated x, same shape and dtype."""
        cos = self.cos[start : start + x.shape[2]]  # (T, Dh/2)
        sin = self.sin[start : start + x.shape[2]]
        x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, H, T, Dh/2) each
        rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, H, T, Dh/2, 2)
        return rotated.flatten(-2).type_as(x)


class KVCache:
    """Static key/value cache of every layer: k, v (L, B, H, max_len, Dh) and one `length` for all rows.

    Entries at and beyond `length` are stale and never read; `truncate` just moves `length` back.
    """

    def __init__(self, depth, batch_size, heads, max_len, head_dim, device=None, dtype=None):
        shape = (depth, batch_size, heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, H, T, Dh) at positions start .. start + T - 1 of `layer`; return that layer's keys
        and values up to there: (B, H, start + T, Dh) each."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def truncate(self, length: int) -> None:
        """Roll back to `length` positions (any length between 0 and the current one)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a KV cache of length {self.length} to {length}")
        self.length = length


class Attention(nn.Module):
    """Multi-head self-attention over F.scaled_dot_product_attention, with RoPE and an optional KV cache."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, x, rope: Rotary, start: int, mask, cache: KVCache | None, layer: int):
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        q, k = rope(q, start), rope(k, start)  # (B, H, T, Dh)
        if cache is not None:
            k, v = cache.write(layer, start, k, v)  # (B, H, start + T, Dh)
        # mask None: either one query (sees every key) or start = 0 (square causal, the fast kernel).
        is_causal = mask is None and q.shape[2] > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)  # (B, H, T, Dh)
        return self.proj(rearrange(out, "b h t d -> b t (h d)"))


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(width, hidden, bias=False)
        self.up = nn.Linear(width, hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(width, eps=1e-5)
        self.attn = Attention(width, heads)
        self.mlp_norm = nn.RMSNorm(width, eps=1e-5)
        self.mlp = SwiGLU(width, _mlp_hidden(width))

    def forward(self, x, rope, start, mask, cache, layer):
        x = x + self.attn(self.attn_norm(x), rope, start, mask, cache, layer)  # (B, T, D)
        return x + self.mlp(self.mlp_norm(x))


@register("gpt")
class GPT(Exportable, nn.Module):
    def __init__(
        self,
        vocab_size: int,
        num_tokens: int,
        num_classes: int,
        grid: list[int] | tuple[int, int] | None = None,
        size: str = "B",
        width: int | None = None,
        depth: int | None = None,
        heads: int | None = None,
        label_dropout: float = 0.1,
        rope_base: float = 10000.0,
        token_kind: str = "categorical",
        token_dim: int | None = None,
        head: str | None = None,
        head_options: dict | None = None,
    ):
        super().__init__()
        if size not in GPT_SIZES:
            raise ValueError(f"GPT size={size!r}; expected one of {sorted(GPT_SIZES)}")
        preset = GPT_SIZES[size]
        width, depth, heads = width or preset["width"], depth or preset["depth"], heads or preset["heads"]
        if width % heads:
            raise ValueError(f"GPT width={width} is not a multiple of heads={heads}")
        head_dim = width // heads
        if grid is not None:
            grid = [int(g) for g in grid]
            if len(grid) != 2 or grid[0] * grid[1] != num_tokens:
                raise ValueError(f"GPT grid={grid} does not hold num_tokens={num_tokens} tokens")
        rope_multiple = 2 if grid is None else 4  # 2D RoPE splits the rotary pairs between rows and columns
        if head_dim % rope_multiple:
            raise ValueError(f"GPT head dim {head_dim} must be a multiple of {rope_multiple} for RoPE")
        self.config = dict(
            vocab_size=vocab_size,
            num_tokens=num_tokens,
            num_classes=num_classes,
            grid=grid,
            size=size,
            width=width,
            depth=depth,
            heads=heads,
            label_dropout=label_dropout,
            rope_base=rope_base,
            token_kind=token_kind,
            token_dim=token_dim,
            head=head,
            head_options=dict(head_options or {}),
        )
        self.num_tokens, self.num_classes, self.label_dropout = num_tokens, num_classes, label_dropout
        self.heads, self.head_dim = heads, head_dim
        self.class_embed = nn.Embedding(num_classes + 1, width)  # last row: the null class
        token_format = dict(token_dim=token_dim, head=head, **(head_options or {}))
        self.embed = make_embedding(token_kind, vocab_size, width, **token_format)
        self.rope = Rotary(head_dim, num_tokens, None if grid is None else tuple(grid), rope_base)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.RMSNorm(width, eps=1e-5)
        self.head = make_head(token_kind, width, vocab_size, **token_format)
        self.cache: KVCache | None = None
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def drop_labels(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """In training mode, replace each label by the null class with probability `label_dropout`."""
        if not self.training or self.label_dropout == 0:
            return labels
        drop = torch.rand(labels.shape, device=labels.device, generator=generator) < self.label_dropout
        return labels.masked_fill(drop, self.null_class)

    # ---- full sequences (training, and the uncached sampling baseline)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: tokens long (B, T), 1 <= T <= N, labels (B,) -> hidden (B, T, D); hidden[:, i]
        predicts tokens[:, i]. Labels are dropped for guidance in training mode."""
        if not 1 <= tokens.shape[1] <= self.num_tokens:
            raise ValueError(f"GPT got {tokens.shape[1]} tokens per row; expected 1 to {self.num_tokens}")
        return self.forward_prefix(tokens[:, :-1], self.drop_labels(labels))

    def forward_prefix(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Hidden states of the whole sequence [class, tokens]: tokens (B, T), T < N+1 -> (B, 1 + T, D)."""
        if tokens.shape[1] > self.num_tokens:
            raise ValueError(f"GPT prefix of {tokens.shape[1]} tokens is longer than {self.num_tokens}")
        x = torch.cat([self.class_embed(labels)[:, None], self.embed(tokens)], dim=1)  # (B, 1 + T, D)
        return self._backbone(x, start=0, cache=None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Categorical heads only (the speculative samplers work on logits): (..., D) -> (..., V)."""
        if self.head.kind != "categorical":
            raise ValueError(f"GPT.logits needs categorical tokens; this GPT models {self.head.kind} tokens")
        return self.head(hidden)

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.head.loss(self(tokens, labels), tokens)

    def _backbone(self, x: torch.Tensor, start: int, cache: KVCache | None) -> torch.Tensor:
        """x (B, T, D) at positions start .. start + T - 1 -> final-normed hidden states (B, T, D)."""
        steps = x.shape[1]
        mask = None
        if start > 0 and steps > 1:  # query i sees the cache and the new positions up to its own
            mask = torch.ones(steps, start + steps, dtype=torch.bool, device=x.device).tril(diagonal=start)
        for layer, block in enumerate(self.blocks):
            x = block(x, self.rope, start, mask, cache, layer)
        return self.norm(x)

    # ---- KV cache (inference)

    def setup_cache(self, batch_size: int, max_len: int | None = None, device=None, dtype=None) -> KVCache:
        """Preallocate the cache: max_len positions (default N + 1: class + every token), on the model's
        device and dtype unless given."""
        max_len = self.num_tokens + 1 if max_len is None else max_len
        if not 1 <= max_len <= self.num_tokens + 1:
            raise ValueError(f"KV cache max_len={max_len}; expected 1 to {self.num_tokens + 1}")
        param = self.class_embed.weight
        self.cache = KVCache(
            len(self.blocks),
            batch_size,
            self.heads,
            max_len,
            self.head_dim,
            device=param.device if device is None else device,
            dtype=param.dtype if dtype is None else dtype,
        )
        return self.cache

    def clear_cache(self) -> None:
        self.cache = None

    @property
    def cache_length(self) -> int:
        return 0 if self.cache is None else self.cache.length

    def truncate_cache(self, length: int) -> None:
        self._cache_for(None).truncate(length)

    def prefill(self, labels: torch.Tensor) -> torch.Tensor:
        """Empty the cache and write the class position: labels (B,) -> hidden (B, 1, D), predicting tok0."""
        cache = self._cache_for(labels.shape[0])
        cache.truncate(0)
        return self._append(self.class_embed(labels)[:, None], cache)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append tokens (B, k) at the cache length -> hidden (B, k, D); with t tokens already cached,
        hidden[:, j] predicts image token t + j."""
        cache = self._cache_for(tokens.shape[0])
        if cache.length == 0:
            raise RuntimeError("GPT.decode before prefill: the class position is not in the cache")
        return self._append(self.embed(tokens), cache)

    def _append(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        start, steps = cache.length, x.shape[1]
        if start + steps > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; cannot append {steps} at {start}")
        hidden = self._backbone(x, start, cache)  # (B, k, D)
        cache.length = start + steps
        return hidden

    def _cache_for(self, batch_size: int | None) -> KVCache:
        if self.cache is None:
            raise RuntimeError("GPT has no KV cache: call setup_cache(batch_size) first")
        if batch_size is not None and batch_size != self.cache.batch_size:
            raise ValueError(f"GPT KV cache was set up for batch {self.cache.batch_size}, got {batch_size}")
        return self.cache
