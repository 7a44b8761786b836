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
- Linear layers are `PackedLinear` (linear.py): nn.Linear, except that CPU inference multiplies through
  oneDNN on a prepacked weight (1.5x faster GPT-B decode on one core, same fp32 arithmetic).
- Heads and input embeddings come from heads.py (`token_kind`, `head`), so the backbone serves every token
  kind. Tokens are (B, T) codes for categorical tokens and (B, T, token_dim) for vector tokens (bits,
  sub-codes, channel bins); every shape below writes (B, T) for either.

KV cache (inference only, under torch.no_grad), one length per row: `setup_cache` preallocates keys and
values for every layer, `prefill(labels)` writes the class position, `decode(tokens (B, k))` appends k
positions at each row's own length: causal attention among the k new positions, full attention to the row's
cached prefix, so a k-token step equals the same positions of the full forward pass (speculative
verification, Jacobi windows). `truncate_cache(lengths)` rolls each row back to its own length (rejected
drafts), `select_cache_rows(rows)` drops finished rows. While the host knows every row has the same length
(after prefill and equal appends, or an int truncate) an append slices the cache and needs no mask; rows at
different lengths write through per-row positions (RoPE per row, a scatter into the cache) and attend to the
whole buffer through a per-row causal mask (`Step`), with no host synchronisation either way. Positions past
the last token (windows a sampler pads beyond the end) are allowed up to the cache's max_len.

Size presets (width / depth / heads): tiny 128/4/4 (CPUs and tests), B 768/12/12, L 1024/24/16,
XL 1280/36/20, XXL 1536/48/24.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core import Exportable, register

from .heads import make_embedding, make_head
from .linear import PackedLinear
from .token_shuffle import check_shuffle, shuffle_tokens, unshuffle_tokens

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
    with frequencies base^(-2j / (Dh/2)). Position 0 (class) is unrotated in both cases. Positions past the
    table (padding a sampler feeds beyond the last token, whose outputs it ignores) reuse its last row.
    """

    def __init__(
        self,
        head_dim: int,
        num_tokens: int,
        grid: tuple[int, int] | None,
        base: float,
        first_position: int = 0,
    ):
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
        angles = angles[first_position:]  # first_position 1: token i at table row i (the EAGLE drafter)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    @property
    def num_positions(self) -> int:
        return self.cos.shape[0]

    def tables(self, start: int | None, steps: int, index: torch.Tensor | None = None):
        """The rotation of positions start .. start + steps - 1, or of per-row positions index (B, T),
        shaped to broadcast against (B, T, 2, H, Dh/2) (query and key pairs of every head): eager, one
        complex table (T or B x T, 1, 1, Dh/2); compiled, its (cos, sin) pair."""
        compiling = torch.compiler.is_compiling()
        if compiling:
            tables = (self.cos.float(), self.sin.float())
        else:  # the complex table, built once per device and dtype of the buffers
            key = (self.cos.device, self.cos.dtype, self.cos.data_ptr())
            if getattr(self, "_complex_key", None) != key:
                self._complex, self._complex_key = torch.complex(self.cos.float(), self.sin.float()), key
            tables = (self._complex,)
        if index is None and start + steps <= self.num_positions:
            picked = [t[start : start + steps, None, None] for t in tables]
        elif index is None:  # padding past the table: its last row
            index = torch.arange(start, start + steps, device=self.cos.device).clamp(
                max=self.num_positions - 1
            )
            picked = [t[index, None, None] for t in tables]
        else:
            index = index.clamp(max=self.num_positions - 1)
            picked = [t[index][:, :, None, None] for t in tables]
        return tuple(picked) if compiling else picked[0]

    @staticmethod
    def rotate(x: torch.Tensor, rotation) -> torch.Tensor:
        """x (B, T, 2, H, Dh) (queries and keys) -> each interleaved pair (x0, x1) turned by its angle, in
        float32: one complex multiplication in eager mode, real arithmetic (one fused kernel) compiled."""
        pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, 2, H, Dh/2, 2)
        if isinstance(rotation, tuple):
            cos, sin = rotation
            x1, x2 = pairs.unbind(-1)
            rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
        else:
            rotated = torch.view_as_real(torch.view_as_complex(pairs) * rotation)
        return rotated.flatten(-2).type_as(x)


@dataclass
class Step:
    """Where the T new positions of one forward pass sit, computed once and shared by every layer.

    start: every row writes positions start .. start + T - 1 (the fast path: the cache is sliced, no mask
    for one query, a square causal kernel at start 0); None: each row r writes index[r] (B, T) and attends
    to the whole cache buffer through `mask` (B, 1, T, S) (rows at different lengths; compiled decoding).
    rotation: Rotary.tables of those positions.
    """

    start: int | None
    index: torch.Tensor | None
    rotation: object
    mask: torch.Tensor | None
    is_causal: bool

    @classmethod
    def at(cls, start: int, steps: int, rope: Rotary, device) -> Step:
        mask = None
        if start > 0 and steps > 1:  # query i sees the cache and the new positions up to its own
            mask = torch.ones(steps, start + steps, dtype=torch.bool, device=device).tril(diagonal=start)
        return cls(start, None, rope.tables(start, steps), mask, is_causal=start == 0 and steps > 1)

    @classmethod
    def per_row(cls, lengths: torch.Tensor, steps: int, rope: Rotary, max_len: int) -> Step:
        index = lengths[:, None] + torch.arange(steps, device=lengths.device)  # (B, T)
        keys = torch.arange(max_len, device=lengths.device)
        mask = (keys <= index[..., None]).unsqueeze(1)  # (B, 1, T, S): causal within the row's own prefix
        return cls(None, index, rope.tables(None, steps, index), mask, is_causal=False)


class KVCache:
    """Static key/value cache of every layer: k, v (L, B, H, max_len, Dh) and one length per row.

    lengths (B,) long, on the cache's device: row r holds positions 0 .. lengths[r] - 1; entries at and
    beyond a row's length are stale and never read, so `truncate` only moves lengths back. `uniform` is the
    common length when the host knows every row has it (after prefill, equal appends, an int truncate):
    then appends take the sliced, unmasked fast path, and no host synchronisation is ever needed to know
    it. `static` forces the per-row path with fixed shapes (compiled decoding, CUDA graphs).
    """

    def __init__(self, depth, batch_size, heads, max_len, head_dim, device=None, dtype=None, static=False):
        shape = (depth, batch_size, heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.static = static
        self.uniform: int | None = None if static else 0  # static: no host-side length to guard on

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def step(self, steps: int, rope: Rotary) -> Step:
        """The positions of `steps` tokens appended at every row's length."""
        if self.uniform is not None and not self.static:
            if self.uniform + steps > self.max_len:
                raise ValueError(
                    f"KV cache holds {self.max_len} positions; cannot append {steps} at {self.uniform}"
                )
            return Step.at(self.uniform, steps, rope, self.k.device)
        return Step.per_row(self.lengths, steps, rope, self.max_len)

    def write(self, layer: int, step: Step, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, H, T, Dh) at the step's positions of `layer`; return the keys and values that
        attention reads: (B, H, start + T, Dh) on the fast path, the whole buffer (B, H, S, Dh) otherwise."""
        if step.start is not None:
            end = step.start + k.shape[2]
            self.k[layer, :, :, step.start : end] = k
            self.v[layer, :, :, step.start : end] = v
            return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
        index = step.index[:, None, :, None].expand_as(k)  # (B, H, T, Dh)
        self.k[layer].scatter_(2, index, k)
        self.v[layer].scatter_(2, index, v)
        return self.k[layer], self.v[layer]

    def advance(self, steps: int) -> None:
        self.lengths += steps
        if self.uniform is not None:
            self.uniform += steps

    def truncate(self, lengths: int | torch.Tensor) -> None:
        """Roll every row back to `lengths`: an int (all rows; checked against the known length) or a (B,)
        tensor of per-row lengths, each at most that row's current length (not checked: it would cost a
        host synchronisation)."""
        if isinstance(lengths, torch.Tensor):
            self.lengths.copy_(lengths)
            self.uniform = None
            return
        if not 0 <= lengths <= (self.max_len if self.uniform is None else self.uniform):
            raise ValueError(f"cannot truncate a KV cache of length {self.uniform} to {lengths}")
        self.lengths.fill_(lengths)
        self.uniform = None if self.static else lengths

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (long indices, in that order): finished rows stop costing compute."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]
        self.lengths = self.lengths[rows]


class Attention(nn.Module):
    """Multi-head self-attention over F.scaled_dot_product_attention, with RoPE and an optional KV cache."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = PackedLinear(width, 3 * width, bias=False)
        self.proj = PackedLinear(width, width, bias=False)

    def forward(self, x, step: Step, cache: KVCache | None, layer: int):
        batch, steps, width = x.shape
        qkv = self.qkv(x).view(batch, steps, 3, self.heads, -1)  # (B, T, 3, H, Dh)
        q, k = Rotary.rotate(qkv[:, :, :2], step.rotation).unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), qkv[:, :, 2].transpose(1, 2)  # (B, H, T, Dh)
        if cache is not None:
            k, v = cache.write(layer, step, k, v)  # (B, H, S, Dh)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=step.mask, is_causal=step.is_causal)
        return self.proj(out.transpose(1, 2).reshape(batch, steps, width))


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate = PackedLinear(width, hidden, bias=False)
        self.up = PackedLinear(width, hidden, bias=False)
        self.down = PackedLinear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(width, eps=1e-5)
        self.attn = Attention(width, heads)
        self.mlp_norm = nn.RMSNorm(width, eps=1e-5)
        self.mlp = SwiGLU(width, _mlp_hidden(width))

    def forward(self, x, step: Step, cache: KVCache | None = None, layer: int = 0):
        x = x + self.attn(self.attn_norm(x), step, cache, layer)  # (B, T, D)
        return x + self.mlp(self.mlp_norm(x))


def run_blocks(blocks, rope: Rotary, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
    """x (B, T, D) -> (B, T, D) through every block: without a cache at positions 0 .. T-1 (causal), with
    one appended at every row's cache length (which then advances by T)."""
    step = Step.at(0, x.shape[1], rope, x.device) if cache is None else cache.step(x.shape[1], rope)
    for layer, block in enumerate(blocks):
        x = block(x, step, cache, layer)
    if cache is not None:
        cache.advance(x.shape[1])
    return x


class CachedBlocks:
    """The KV-cache side of a stack of `Block`s, shared by the GPT and the EAGLE drafter (eagle.py).

    The host class sets `blocks`, `heads`, `head_dim`, `rope`, `cache` (None) and `default_cache_len`.
    """

    blocks: nn.ModuleList
    heads: int
    head_dim: int
    rope: Rotary
    cache: KVCache | None
    default_cache_len: int

    def run_blocks(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        return run_blocks(self.blocks, self.rope, x, cache)

    def setup_cache(
        self, batch_size: int, max_len: int | None = None, device=None, dtype=None, static: bool = False
    ) -> KVCache:
        """Preallocate the cache: max_len positions (default `default_cache_len`; samplers that feed windows
        past the last token ask for more), on the model's device and dtype unless given. `static`: every
        append takes the per-row path with fixed shapes (compiled decoding)."""
        max_len = self.default_cache_len if max_len is None else max_len
        if max_len < 1:
            raise ValueError(f"KV cache max_len={max_len}; expected >= 1")
        param = next(self.parameters())
        self.cache = KVCache(
            len(self.blocks),
            batch_size,
            self.heads,
            max_len,
            self.head_dim,
            device=param.device if device is None else device,
            dtype=param.dtype if dtype is None else dtype,
            static=static,
        )
        return self.cache

    def clear_cache(self) -> None:
        self.cache = None

    @property
    def cache_length(self) -> int:
        """The length every row of the cache has (0 without a cache); an error while rows differ."""
        if self.cache is None:
            return 0
        if self.cache.uniform is None:
            raise RuntimeError("the KV cache rows have different lengths: read cache.lengths")
        return self.cache.uniform

    def truncate_cache(self, lengths: int | torch.Tensor) -> None:
        """Roll back to `lengths`: an int for every row, or a (B,) tensor of per-row lengths."""
        self._cache_for(None).truncate(lengths)

    def select_cache_rows(self, rows: torch.Tensor) -> None:
        """Keep only these rows of the cache (long indices): finished rows leave the batch."""
        self._cache_for(None).select(rows)

    def _cache_for(self, batch_size: int | None) -> KVCache:
        if self.cache is None:
            raise RuntimeError(f"{type(self).__name__} has no KV cache: call setup_cache(batch_size) first")
        if batch_size is not None and batch_size != self.cache.batch_size:
            raise ValueError(f"KV cache was set up for batch {self.cache.batch_size}, got {batch_size}")
        return self.cache


@register("gpt")
class GPT(CachedBlocks, Exportable, nn.Module):
    fsdp_blocks = (Block,)

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
        shuffle: int = 1,
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
        check_shuffle(grid, shuffle, width)
        if shuffle > 1 and (token_kind != "categorical" or head is not None or token_dim is not None):
            raise ValueError(
                f"generator.shuffle={shuffle} (Token-Shuffle) works on categorical codes with its own head; "
                f"got token_kind={token_kind!r}, head={head!r}: set generator.shuffle=1"
            )
        self.num_tokens, self.num_classes, self.label_dropout = num_tokens, num_classes, label_dropout
        self.width, self.depth, self.heads, self.head_dim = width, depth, heads, head_dim
        self.grid, self.shuffle = None if grid is None else tuple(grid), shuffle
        # Token-Shuffle: one position per s x s window of the grid (token_shuffle.py); s = 1: one per token.
        self.num_positions = num_tokens // shuffle**2
        self.position_grid = None if grid is None else (grid[0] // shuffle, grid[1] // shuffle)
        if shuffle > 1:
            token_dim, head = shuffle**2, "shuffle"
        self.class_embed = nn.Embedding(num_classes + 1, width)  # last row: the null class
        token_format = dict(token_dim=token_dim, head=head, **(head_options or {}))
        self.embed = make_embedding(token_kind, vocab_size, width, **token_format)
        self.rope = Rotary(head_dim, self.num_positions, self.position_grid, rope_base)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.RMSNorm(width, eps=1e-5)
        self.head = make_head(token_kind, width, vocab_size, **token_format)
        self.cache: KVCache | None = None
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def architecture(self) -> dict:
        """The constructor's arguments with the size preset resolved (width, depth, heads): what a model
        bound to this one (an EAGLE drafter) must match."""
        return {**self.config, "width": self.width, "depth": self.depth, "heads": self.heads}

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

    # ---- full sequences (training, and the uncached sampling baseline). A sequence holds one token per
    # position: (B, T) codes, (B, T, token_dim) vector tokens, or (B, T, s^2) windows with Token-Shuffle.

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: a sequence (B, T, ...), 1 <= T <= num_positions, labels (B,) -> hidden (B, T, D);
        hidden[:, i] predicts tokens[:, i]. Labels are dropped for guidance in training mode."""
        if not 1 <= tokens.shape[1] <= self.num_positions:
            raise ValueError(
                f"GPT got {tokens.shape[1]} positions per row; expected 1 to {self.num_positions}"
            )
        return self.forward_prefix(tokens[:, :-1], self.drop_labels(labels))

    def forward_prefix(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Hidden states of the whole sequence [class, tokens]: tokens (B, T, ...), T <= num_positions ->
        (B, 1 + T, D)."""
        if tokens.shape[1] > self.num_positions:
            raise ValueError(f"GPT prefix of {tokens.shape[1]} positions is longer than {self.num_positions}")
        x = torch.cat([self.class_embed(labels)[:, None], self.embed(tokens)], dim=1)  # (B, 1 + T, D)
        return self._backbone(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Categorical heads only (the speculative samplers work on logits): (..., D) -> (..., V), or
        (..., s^2, V) with Token-Shuffle (one distribution per slot of the window)."""
        if self.head.kind != "categorical":
            raise ValueError(f"GPT.logits needs categorical tokens; this GPT models {self.head.kind} tokens")
        return self.head(hidden)

    def sequence_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens as the tokenizer lays them out ((B, N) raster order for grids) -> the model's sequence:
        windows (B, P, s^2) with Token-Shuffle, unchanged without."""
        if self.shuffle == 1:
            return tokens
        if tokens.shape[1:] != (self.num_tokens,):
            raise ValueError(
                f"Token-Shuffle GPT needs whole grids of {self.num_tokens} tokens; got {tokens.shape}"
            )
        return shuffle_tokens(tokens, self.grid, self.shuffle)

    def image_tokens(self, sequence: torch.Tensor) -> torch.Tensor:
        """The inverse of `sequence_tokens`: what samplers return, in the tokenizer's layout."""
        return sequence if self.shuffle == 1 else unshuffle_tokens(sequence, self.grid, self.shuffle)

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced loss of tokens in the tokenizer's layout (B, T[, token_dim]), labels (B,)."""
        sequence = self.sequence_tokens(tokens)
        return self.head.loss(self(sequence, labels), sequence)

    def _backbone(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """x (B, T, D) -> final-normed hidden states (B, T, D) (see CachedBlocks.run_blocks)."""
        return self.norm(self.run_blocks(x, cache))

    @property
    def default_cache_len(self) -> int:
        return self.num_positions + 1  # class + every position

    def prefill(self, labels: torch.Tensor) -> torch.Tensor:
        """Empty the cache and write the class position: labels (B,) -> hidden (B, 1, D), predicting tok0."""
        cache = self._cache_for(labels.shape[0])
        cache.truncate(0)
        return self._backbone(self.class_embed(labels)[:, None], cache)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append k positions' tokens (B, k, ...) at each row's cache length -> hidden (B, k, D); with t
        positions cached in a row (its length t + 1), hidden[r, j] predicts its position t + j."""
        cache = self._cache_for(tokens.shape[0])
        if cache.uniform == 0:
            raise RuntimeError("GPT.decode before prefill: the class position is not in the cache")
        return self._backbone(self.embed(tokens), cache)
