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

The KV cache of every row is rolled back to its committed prefix after every pass; the positions after a
row's new token take this iteration's samples from p_t (the "Jacobi" update) with p_t as their draft
distribution, and positions entering the window for the first time are initialised:

    uniform     a uniform draw over the vocabulary, q = 1/V. Exact (a draft drawn from a known q).
    copy_left   the current token to the left (grid tokens: same row, previous column; in column 0 the token
                above; 1D tokens: the previous token), q = one-hot. A deterministic draft is accepted with
                probability p_t(x) and the residual is p_t with x removed, renormalised: exact as well.
                Scoring a random init as one-hot (docs/METHODS.md, "SJD, GSD and draft reuse") is exact
                only for deterministic drafts; a uniform draw is scored with its true q = 1/V here.

Draft reuse (`reuse_drafts=True`, SJD++'s idea without its fine-tuning): a draft x at an untested position
(after the row's first rejection) is kept for the next pass when its probability did not fall, p_t(x) >=
q(x), and replaced by this iteration's fresh sample from p_t otherwise. The kept-or-fresh draft y then
follows the mixture

    q'(y) = q(y) [p_t(y) >= q(y)] + R p_t(y),      R = sum_x q(x) [p_t(x) < q(x)]   (sum_y q'(y) = 1),

(x ~ q given the prefix, independent of the fresh sample), and q' is what the next test divides by. So the
output stays EXACT (the chi-square test in tests/test_jacobi.py shows it): reuse changes which drafts are
proposed, never the law of a committed token. Confident drafts survive instead of being redrawn, which
raises acceptance at long windows. It composes with both inits (a copy_left draft is one-hot: it survives
only where p_t(x) = 1) and with GSD.

Why SJD is exact: a draft at token i was drawn from q_i given tokens before i (or is a function of them);
the tests of the tokens before i never read it (causal attention), so when its own test comes, given
everything before, x_i ~ q_i and speculative sampling commits a token distributed as p(. | x_<i).
Outputs after a rejected position are conditioned on stale drafts; they only become drafts, never commits.

Batches: every row has its own KV-cache length (sampling/engine.py): each row verifies its full window of L
drafts every pass (fewer near the end) and leaves the batch when done. Drafts are kept relative to each
row's count (offset s = position n_r + s) with their distributions (B, L, S, V); after a pass a row that
committed f + 1 positions shifts them by f + 1. With Token-Shuffle a position is a window of S = s^2 tokens
(sampling/engine.py: each slot drafted, tested and redrawn as a token; copy_left copies whole windows on
the grid of windows).

Stats: those of sampling/engine.py's `decode_stats` (no draft model).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .common import SampleResult, cfg_scale_at, compile_step, sample_probs
from .engine import DecodeCounters, GuidedModel, Rows, check_num_tokens, decode_stats, verify

JACOBI_INITS = ("uniform", "copy_left")


def copy_left_source(index: torch.Tensor, known: torch.Tensor, grid) -> torch.Tensor:
    """The token a copy_left draft at token index (>= known) ends up copying: following the chain left (up
    in column 0 of a grid) to the first index below `known` (every token before `known` is committed or
    drafted). index (B, T) long, known (B, 1) -> (B, T).

    1D, or a grid row already partly known: known - 1. A grid row entirely unknown: its chain runs up the
    first column, to the column-0 token of the row holding known - 1.
    """
    last = known - 1
    if grid is None:
        return last.expand_as(index)
    width = grid[1]
    row_start = index - index % width
    return torch.where(known > row_start, last, last - last % width)


def reused_drafts(p, q, drafts, fresh):
    """SJD++ reuse (module docstring): p (B, L, S, V) this pass at the draft positions, q (B, L, S, V) and
    drafts (B, L, S) the old drafts, fresh (B, L, S) samples from p -> the next drafts (B, L, S), their law
    q' (B, L, S, V). Slot by slot: each slot's draft and law are those of a single token."""
    keep_mass = p >= q  # (B, L, V): where the probability did not fall
    kept = q * keep_mass
    redraw = 1 - kept.sum(-1, keepdim=True)  # R
    keep = keep_mass.gather(-1, drafts[..., None]).squeeze(-1)
    return torch.where(keep, drafts, fresh), kept + redraw * p


@torch.no_grad()
def sample_jacobi(
    model,
    labels: torch.Tensor,
    num_tokens: int | None = None,
    window: int = 16,
    init: str = "uniform",
    cfg_scale: float = 1.0,
    cfg_schedule: str = "constant",
    cfg_ramp: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    grouped: bool = False,
    neighbours: torch.Tensor | None = None,
    group_size: int = 8,
    reuse_drafts: bool = False,
    compile: bool = False,
) -> SampleResult:
    """labels (B,) -> SampleResult with tokens (B, num_tokens) by (grouped) speculative Jacobi decoding.

    window: L draft tokens verified per pass; init "uniform" or "copy_left" (first draft of a position);
    grouped: GSD's acceptance over the group of the draft and its group_size - 1 nearest codes (needs
    `neighbours` (V, k >= group_size - 1) from `latent_neighbours`); reuse_drafts: keep drafts whose
    probability did not fall (exact, module docstring); compile: each pass (drafts, verification, commit)
    through torch.compile on a static cache, its random numbers drawn before it. The model runs in eval
    mode on its own device (its mode is restored afterwards); `generator` must live on that device.
    """
    num_tokens = check_num_tokens(model, num_tokens)
    cfg_scale_at(0, num_tokens, cfg_scale, cfg_schedule, cfg_ramp)
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
    grid = model.position_grid  # copy_left follows the grid of positions (of windows with Token-Shuffle)
    labels = labels.to(device)
    settings = dict(
        num_tokens=num_tokens,
        cfg_scale=cfg_scale,
        cfg_schedule=cfg_schedule,
        cfg_ramp=cfg_ramp,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )
    offsets = torch.arange(window, device=device)
    slots = model.head.token_shape[0] if model.head.token_shape else 1  # S: tokens per position
    rows = Rows(labels.shape[0], num_tokens, window + 1, device, host_lengths=not compile, slots=slots)
    counters = DecodeCounters(device)
    start = time.perf_counter()
    with GuidedModel(model, labels, **settings, max_len=num_tokens + window + 1, static=compile) as target:
        model_batch = target.labels.shape[0]
        first_probs = target.prefill()[0][:, 0]  # (B, S, V)
        rows.start(sample_probs(first_probs, generator))
        vocab = first_probs.shape[-1]
        batch = labels.shape[0]
        # Per row: the drafts at offsets s = 0 .. L-1 (position n + s) and their laws, the first offset
        # entering the window for the first time, and the first position neither committed nor drafted.
        state = {
            "drafts": torch.zeros(batch, window, slots, dtype=torch.long, device=device),
            "q": torch.zeros(batch, window, slots, vocab, device=device),
            "reached": torch.zeros(batch, 1, dtype=torch.long, device=device),
            "known": rows.count[:, None].clone(),
        }

        def initialise(drafts, q, reached, known, uniforms):
            """Slots at and after `reached` get their first draft; uniforms (B, L, S) for uniform draws."""
            new = (offsets >= reached)[..., None]  # (B, L, 1)
            if init == "uniform":
                values = (uniforms * vocab).long().clamp_(max=vocab - 1)  # uniform over the vocabulary
                return torch.where(new, values, drafts), q.masked_fill(new[..., None], 1.0 / vocab)
            source = copy_left_source(rows.count[:, None] + offsets, known, grid)  # (B, L)
            from_slot = (source - rows.count[:, None]).clamp(0, window - 1)
            values = torch.where(
                (source >= rows.count[:, None])[..., None],
                drafts.gather(1, from_slot[..., None].expand(-1, -1, slots)),
                rows.gather(source),
            )  # (B, L, S)
            return torch.where(new, values, drafts), torch.where(
                new[..., None], F.one_hot(values, vocab).float(), q
            )

        def one_pass(uniforms: torch.Tensor) -> None:
            """Initialise, verify, commit and shift every row's window; uniforms (B, 3L + 2, S): the draws."""
            drafts, q = initialise(
                state["drafts"], state["q"], state["reached"], state["known"], uniforms[:, :window]
            )
            limit = (num_tokens - 1 - rows.count).clamp(max=window)
            inputs = torch.cat([rows.last(), drafts], dim=1)  # (B, L + 1, S): positions n-1 .. n+L-1
            p, _ = target.decode(inputs, rows.count)  # (B, L + 1, S, V): positions n .. n+L
            first, new, tested = verify(
                p, q, drafts, limit, uniforms[:, window : 2 * window + 1], None, groups
            )
            fresh = sample_probs(p, uniform=uniforms[:, 2 * window + 1 :])  # (B, L + 1, S)
            next_q = p
            if reuse_drafts:
                kept, law = reused_drafts(p[:, :window], q, drafts, fresh[:, :window])
                fresh = torch.cat([kept, fresh[:, window:]], dim=1)
                next_q = torch.cat([law, p[:, window:]], dim=1)
            state["known"] = rows.count[:, None] + window + 1  # tokens up to n + L: committed or drafted
            rows.commit(inputs, first, new)
            counters.add(first, tested)
            # Next drafts, slot s = token n' + s: this pass's output column f + 1 + s while it is in the
            # window (f + 1 + s <= L), then first-time ones.
            column = (first[:, None] + 1 + offsets).clamp(max=window)  # (B, L)
            state["reached"] = window - first[:, None]  # offsets s < reached come from this pass
            state["drafts"] = fresh.gather(1, column[..., None].expand(-1, -1, slots))
            state["q"] = next_q.gather(1, column[..., None, None].expand(-1, -1, slots, vocab))

        step = compile_step(one_pass, device) if compile else one_pass
        rows.advance(target.passes)
        while rows.running:
            # (B, 3L + 2, S) with S innermost: for S = 1 the draws of the plain model, in the same order
            step(torch.rand(rows.running, 3 * window + 2, slots, device=device, generator=generator))
            target.passes += 1
            keep = rows.advance(target.passes)  # the pass's one host synchronisation
            if not rows.running:
                break
            if keep is not None:
                state = {name: value[keep] for name, value in state.items()}
                target.select(keep)
            target.truncate(rows.lengths())
        stats = decode_stats(target, rows, counters, start, model_batch)
    tokens = model.image_tokens(target.model_tokens(rows.tokens_out))  # the tokenizer's layout
    return SampleResult(tokens=tokens, labels=labels, stats=stats)
