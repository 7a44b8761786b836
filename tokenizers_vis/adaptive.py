"""Adaptive-length encoding: per image, the shortest token prefix whose reconstruction is good enough.

Tokenizers whose prefixes decode to complete images (One-D-Piece's Tail Token Drop, FlexTok's nested
dropout) turn the token count into a quality knob. `shortest_prefix` picks the knob per image: the shortest
k in 1..N whose reconstruction reaches a target (PSNR in dB by default, or any `quality_fn`), and N when even
N does not reach it.

Deliberate choices:
- Binary search per image, all images searched together: each round decodes every still-searching image at
  its own midpoint k. The search keeps an interval [lo, hi] that holds the answer: hi is N or a length that
  was seen to reach the target, lo - 1 is 0 or a length seen to miss it. A round halves every interval (to
  at most ceil(size / 2)), so ceil(log2 N) rounds finish every image, and N is never decoded just to learn
  that it misses (the answer is N either way). N = 1 needs no decoding at all.
- It assumes quality is roughly monotone (non-decreasing) in k, which Tail Token Drop and nested dropout
  train for. Then the result is the shortest k reaching the target. Without monotonicity it is still a
  boundary: k reaches the target (or k = N) and k - 1 misses it (or k = 1), but a shorter k may also reach it.
- One decoder call per round when the tokenizer decodes per-row `tokens.lengths` (it says so with a class
  attribute `decodes_row_lengths = True`, as OneDPiece does): at most ceil(log2 N) decoder calls. Otherwise
  the rows of a round are grouped by their midpoint and each group is decoded with `num_tokens=k`: round r
  has at most min(2^(r - 1), B) distinct midpoints, and no midpoint is ever tested twice (they lie in
  1..N-1), so at most min(sum_r min(2^(r - 1), B), N - 1) calls (`max_decoder_calls`).
- A tokenizer only needs `token_spec.num_tokens`, `encode(images) -> Tokens`, and `decode(tokens,
  num_tokens=k)` and/or per-row `tokens.lengths`.
- The returned Tokens keep all N codes in `data`; `lengths` (B,) says how many of them each image uses.
- PSNR is the project's (training/metrics.py): images in [-1, 1] mapped to [0, 1] and clamped, so the
  target means the same number that validation reports. A quality where lower is better (a perceptual
  distance d) plugs in negated: quality_fn = lambda r, x: -d(r, x), target = -max_distance.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base import Tokens

QualityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (reconstructions, images) -> (B,)


def psnr(reconstructions: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (clamped: a decoder may overshoot): (B, 3, H, W) x2 -> (B,).
    The project's one PSNR: validation and evaluation use it too (training.metrics re-exports it)."""
    unit = lambda x: ((x.float() + 1) / 2).clamp(0, 1)
    mse = (unit(reconstructions) - unit(images)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


def max_decoder_calls(num_tokens: int, batch: int, per_row: bool) -> int:
    """The most decoder calls `shortest_prefix` makes for B images of N tokens (see the module docstring)."""
    rounds = (num_tokens - 1).bit_length()  # ceil(log2 N); 0 for N = 1
    if per_row:
        return rounds
    # Round r has at most 2^(r - 1) distinct midpoints, and all midpoints ever tested are distinct in 1..N-1.
    return min(sum(min(2**r, batch) for r in range(rounds)), num_tokens - 1)


def _decode_rows(tokenizer, tokens: Tokens, rows: torch.Tensor, lengths: torch.Tensor, per_row: bool):
    """Decode tokens[rows] at per-row prefix lengths -> (images (R, 3, H, W), decoder calls made)."""
    data = tokens.data[rows]
    if per_row:
        return tokenizer.decode(Tokens(tokens.kind, data, lengths, tokens.grid)), 1
    images, calls = None, 0
    for k in lengths.unique().tolist():
        group = (lengths == k).nonzero().squeeze(1)
        decoded = tokenizer.decode(Tokens(tokens.kind, data[group], None, tokens.grid), num_tokens=int(k))
        if images is None:
            images = decoded.new_empty((len(rows), *decoded.shape[1:]))
        images[group] = decoded
        calls += 1
    return images, calls


@torch.no_grad()
def decode_lengths(tokenizer, tokens: Tokens) -> torch.Tensor:
    """Every row decoded from its own first tokens.lengths[b] codes (as `shortest_prefix` returns them): one
    decoder call when the tokenizer decodes per-row lengths, else one per distinct length."""
    rows = torch.arange(len(tokens.data), device=tokens.data.device)
    per_row = bool(getattr(tokenizer, "decodes_row_lengths", False))
    return _decode_rows(tokenizer, tokens, rows, tokens.lengths.to(rows.device), per_row)[0]


@torch.no_grad()
def shortest_prefix(
    tokenizer,
    images: torch.Tensor,
    target_psnr: float | torch.Tensor | None = None,
    tokens: Tokens | None = None,
    *,
    quality_fn: QualityFn | None = None,
    target: float | torch.Tensor | None = None,
    per_row: bool | None = None,
    stats: dict | None = None,
) -> Tokens:
    """Per image, the shortest prefix k in 1..N whose reconstruction reaches the target (N if none does).

    images (B, 3, H, W) in [-1, 1]; tokens: their encoding (computed when None; only `data` is used).
    Target: `target_psnr` dB, or `quality_fn(reconstructions, images) -> (B,)` (higher is better) with
    `target`; a target is a float or a (B,) tensor. per_row: decode each round in one call with per-row
    lengths (default: the tokenizer's `decodes_row_lengths`), else one call per distinct length.
    stats: a dict to fill with decoder_calls, rounds, decoded_images, and quality (B,): the quality at the
    chosen length, NaN where it was never decoded (the images that end at N without reaching the target
    earlier). Returns Tokens with all N codes and lengths (B,) long.
    """
    if quality_fn is None:
        if target_psnr is None or target is not None:
            raise ValueError("shortest_prefix: give target_psnr, or quality_fn together with target")
        quality_fn, target = psnr, target_psnr
    elif target is None or target_psnr is not None:
        raise ValueError("shortest_prefix: a quality_fn needs `target` (and no target_psnr)")
    if per_row is None:
        per_row = bool(getattr(tokenizer, "decodes_row_lengths", False))
    if tokens is None:
        tokens = tokenizer.encode(images)
    num_tokens, batch = tokenizer.token_spec.num_tokens, len(images)
    device = tokens.data.device
    target = torch.as_tensor(target, dtype=torch.float32, device=device).expand(batch)  # (B,)

    lo = torch.ones(batch, dtype=torch.long, device=device)  # lo - 1: 0 or a length that missed
    hi = torch.full((batch,), num_tokens, dtype=torch.long, device=device)  # N or a length that reached
    quality = torch.full((batch,), float("nan"), device=device)  # quality at hi, once hi was decoded
    calls = rounds = decoded = 0
    while True:
        rows = (lo < hi).nonzero().squeeze(1)  # (R,) images still searching
        if rows.numel() == 0:
            break
        mid = (lo[rows] + hi[rows]) // 2  # (R,)
        reconstructions, n = _decode_rows(tokenizer, tokens, rows, mid, per_row)
        q = quality_fn(reconstructions, images[rows]).float().to(device)  # (R,)
        reached = q >= target[rows]
        hi[rows] = torch.where(reached, mid, hi[rows])
        lo[rows] = torch.where(reached, lo[rows], mid + 1)
        quality[rows] = torch.where(reached, q, quality[rows])
        calls, rounds, decoded = calls + n, rounds + 1, decoded + rows.numel()
    if stats is not None:
        stats.update(decoder_calls=calls, rounds=rounds, decoded_images=decoded, quality=quality)
    return Tokens(tokens.kind, tokens.data, lo, tokens.grid)
