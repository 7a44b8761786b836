"""Speculative Jacobi Decoding, training-free ("Accelerating Auto-regressive Text-to-Image Generation with
Training-free Speculative Jacobi Decoding", Teng et al. 2024), and its grouped acceptance ("Grouped
Speculative Decoding for Autoregressive Image Generation", So et al. 2025).

The target model is its own drafter. A window of L = `window` draft tokens follows the committed prefix;
each draft comes with the distribution it was drawn from. One forward pass over [last committed token,
drafts] gives, at every window position, this iteration's distribution p_t; the drafts are tested in order:

    SJD    accept x with probability min(1, p_t(x) / p_{t-1}(x)), p_{t-1} = the distribution x was drawn from;
           at the first rejection draw the token from normalise(max(0, p_t - p_{t-1})); when every draft
           passes, one bonus token from p_t after the window. Always >= 1 new token per pass.
    GSD    (grouped=True) accept with probability min(1, sum_G p_t / sum_G p_{t-1}), G = {x} plus x's
           group_size - 1 nearest codes in the tokenizer's latent space (`latent_neighbours`, the same static
           neighbourhoods LANTERN uses; GSD's official code builds groups per step from the target's logit
           ranking filtered by probability and embedding distance [a simplification, unverified against
           the paper's exact grouping]); the rejection residual is SJD's. x itself is committed, so GSD
           preserves (approximately) the mass of each group, not each token: it is approximate by design.
           group_size = 1 is SJD exactly (same draws, same tokens).

The KV cache is rolled back to the committed prefix after every pass; the positions after a row's new token
take this iteration's samples from p_t (the "Jacobi" update) with p_t as their draft distribution, and
positions entering the window for the first time are initialised:

    uniform     a uniform draw over the vocabulary, q = 1/V. Exact (a draft drawn from a known q).
    copy_left   the current token to the left (grid tokens: same row, previous column; in column 0 the token
                above; 1D tokens: the previous token), q = one-hot. A deterministic draft is accepted with
                probability p_t(x) and the residual is p_t with x removed, renormalised: exact as well.
                METHODS.md's "a random init counts as one-hot" is exact only for deterministic drafts; a
                uniform draw is scored with its true q = 1/V here.

Why SJD is exact: a draft at token i was drawn from q_i given tokens before i (or is a function of them);
the tests of the tokens before i never read it (causal attention), so when its own test comes, given
everything before, x_i ~ q_i and speculative sampling commits a token distributed as p(. | x_<i).
Outputs after a rejected position are conditioned on stale drafts; they only become drafts, never commits.

Batches share one cache length exactly as sampling/speculative.py describes: committed tokens per row in a
(B, N) buffer, caches at the common prefix c = min n_r, a window of L + 1 columns from token c-1, rows ahead
of the slowest by e_r have their e_r committed tokens forced and L - e_r drafts; draft slots are kept
relative to c (slot s = token c + s) with their distributions (B, L, V).

Stats as sample_speculative (no draft model): forward_passes (the prefill included), tokens_per_pass,
accepted_per_pass, acceptance_rate, max_lead, wall_time, model_batch.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .common import SampleResult, cfg_scale_at
from .speculative import _check_num_tokens, _Guided, _Rows, _stats, _verify

JACOBI_INITS = ("uniform", "copy_left")


def _left_index(index: int, grid) -> int:
    """The token a copy_left draft copies for token `index` (>= 1): left neighbour, or above in column 0."""
    if grid is not None and index % grid[1] == 0 and index >= grid[1]:
        return index - grid[1]
    return index - 1


def _init_drafts(rows, c, tokens, q, start, init, grid, generator):
    """Initialise draft slots start .. L-1 (tokens c + s) in place: tokens (B, L), q (B, L, V)."""
    batch, slots, vocab = q.shape
    if start >= slots:
        return
    if init == "uniform":
        tokens[:, start:] = torch.randint(vocab, (batch, slots - start), device=q.device, generator=generator)
        q[:, start:] = 1.0 / vocab
        return
    num_tokens = rows.tokens.shape[1]
    for s in range(start, slots):
        index = c + s
        if index >= num_tokens:  # past the end: never fed, never tested
            tokens[:, s], q[:, s] = 0, 1.0 / vocab
            continue
        left = _left_index(index, grid)
        committed = left < rows.count
        from_slot = tokens[:, max(left - c, 0)] if left >= c else rows.tokens[:, left]
        tokens[:, s] = torch.where(committed, rows.tokens[:, left], from_slot)
        q[:, s] = F.one_hot(tokens[:, s], vocab).float()


@torch.no_grad()
def sample_jacobi(
    model,
    labels: torch.Tensor,
    num_tokens: int | None = None,
    window: int = 16,
    init: str = "uniform",
    cfg_scale: float = 1.0,
    cfg_schedule: str = "constant",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    grouped: bool = False,
    neighbours: torch.Tensor | None = None,
    group_size: int = 8,
) -> SampleResult:
    """labels (B,) -> SampleResult with tokens (B, num_tokens) by (grouped) speculative Jacobi decoding.

    window: L draft tokens verified per pass; init "uniform" or "copy_left" (first draft of a position);
    grouped: GSD's acceptance over the group of the draft and its group_size - 1 nearest codes (needs
    `neighbours` (V, k >= group_size - 1) from `latent_neighbours`). The model runs in eval mode on its own
    device (its mode is restored afterwards); `generator` must live on that device.
    """
    num_tokens = _check_num_tokens(model, num_tokens)
    cfg_scale_at(0, num_tokens, cfg_scale, cfg_schedule)
    if window < 1:
        raise ValueError(f"window={window}; expected >= 1 draft positions")
    if init not in JACOBI_INITS:
        raise ValueError(f"init={init!r}; expected one of {JACOBI_INITS}")
    device = next(model.parameters()).device
    groups = None
    if grouped:
        if neighbours is None:
            raise ValueError("grouped=True (GSD) needs neighbours (V, k): see latent_neighbours")
        if not 1 <= group_size <= neighbours.shape[1] + 1:
            raise ValueError(f"group_size={group_size}; expected 1 to {neighbours.shape[1] + 1} (k + 1)")
        own = torch.arange(neighbours.shape[0], device=device)[:, None]
        groups = torch.cat([own, neighbours.to(device)[:, : group_size - 1]], dim=1)  # (V, G)
    grid = getattr(model, "config", {}).get("grid")
    labels = labels.to(device)
    batch = labels.shape[0]
    rows = _Rows(batch, num_tokens, device)
    accepted = tested = 0
    start = time.perf_counter()
    settings = (num_tokens, cfg_scale, cfg_schedule, temperature, top_k, top_p)
    with _Guided(model, labels, *settings) as target:
        first_probs = target.prefill()[:, 0]  # (B, V)
        rows.start(torch.multinomial(first_probs, 1, generator=generator).squeeze(1))
        vocab = first_probs.shape[-1]
        drafts = torch.zeros(batch, window, dtype=torch.long, device=device)  # slot s: token c + s
        q = torch.zeros(batch, window, vocab, device=device)
        c = rows.common
        _init_drafts(rows, c, drafts, q, 0, init, grid, generator)
        while c < num_tokens:
            w = min(window, num_tokens - 1 - c)
            forced = rows.count - c
            inputs = rows.window(c, drafts[:, :w])  # (B, w + 1): tokens c-1 .. c+w-1
            p = target.decode(inputs)  # (B, w + 1, V): tokens c .. c+w
            first, new, row_accepted, row_tested = _verify(
                p, q[:, :w], inputs[:, 1:], forced, generator, None, groups
            )
            fresh = torch.multinomial(p.flatten(0, 1), 1, generator=generator).view(batch, w + 1)
            active = forced <= w
            accepted += int(row_accepted[active].sum())
            tested += int(row_tested[active].sum())
            rows.commit(c, inputs, first, new)
            shift = rows.common - c
            target.truncate(rows.common)
            # Next drafts, slot s = token c' + s: this pass's samples where the window reached (output
            # column shift + s <= w; only read where the row has not committed that token), then new ones.
            reached = max(0, min(window, w + 1 - shift))
            drafts[:, :reached] = fresh[:, shift : shift + reached]
            q[:, :reached] = p[:, shift : shift + reached]
            c = rows.common
            _init_drafts(rows, c, drafts, q, reached, init, grid, generator)
        stats = _stats(target, rows, num_tokens, accepted, tested, start, device)
    return SampleResult(tokens=rows.tokens, labels=labels, stats=stats)
