"""The decoding engine that speculative decoding (speculative.py) and Jacobi decoding (jacobi.py) share.

    GuidedModel   a GPT behind classifier-free guidance, temperature and filtering: tokens in, next-token
                  probabilities (float32) and hidden states out, on its own per-row KV cache
    Rows          the committed tokens of the rows still running, and the pass's one host synchronisation,
                  after which finished rows leave the batch
    verify        the speculative test of every row's drafts, in order, against the target (exact, LANTERN's
                  relaxed target or GSD's groups), and the row's new token

Rows advance independently. Row r has committed n_r tokens; its target cache holds the class and tokens
0 .. n_r - 2 (length n_r), and every pass feeds it a window of W + 1 tokens at its own positions:

    column      0           1 .. W
    input       tok n_r-1   drafts of tokens n_r .. n_r+W-1
    output      p(tok n_r)  ... p(tok n_r+W)            (column o predicts token n_r + o)

The row tests its first `limit_r` = min(W, N - 1 - n_r) drafts (a row near the end tests fewer; its
window is padded, and the padding's outputs are ignored), commits the accepted ones plus one new token
(the residual at the first rejection, or the bonus token from p after the last tested draft) and moves on:
n_r' = n_r + f_r + 1 with f_r accepted drafts. Its cache is rolled back to n_r' (`truncate` with per-row
lengths). Every row gets its full window every pass, however far it is ahead of the others; a row that
reaches N leaves the batch (`Rows.advance` compacts every per-row tensor and the caches), so finished rows
stop costing compute and the batch's last passes run only the rows still going.

Positions and slots. The engine counts positions: one per token, or one per s x s window of a Token-Shuffle
GPT (generators/token_shuffle.py), whose token has S = s^2 slots drawn independently given the prefix.
Every per-position tensor carries a slot axis: tokens (B, T, S), probabilities (B, T, S, V), S = 1 for
plain categorical tokens. A position is accepted when all its slots pass their tests (`verify`); at the
first position that does not, the slots before the first failing one keep their drafts, that slot draws
from its residual and the later ones from p. That is speculative sampling on the flattened sequence of
slots, whose target law factorises over the slots of a position, so the result stays exact (tested in
tests/test_token_shuffle.py with the chi-square test).

The one host synchronisation per pass is `Rows.advance` reading the counts n_r (a (B,) tensor): it tells
which rows finished, and whether every running row has the same count, in which case the caches are
truncated with a plain int and the next appends take the sliced, unmasked fast path (a single image, or the
two halves of a guided one, is always on it). Everything else (tests, commits, sums of accepted drafts)
stays on the device.

Stats of every sampler built on it (`decode_stats`): forward_passes (target calls of the batch, the prefill
included, as sample_ar counts them), passes_per_row (the target passes each image took part in: what it
cost; rows that finish early leave), tokens_per_pass (N / passes_per_row), accepted_per_pass (accepted
drafts per row and pass), acceptance_rate (accepted / tested drafts), row_passes_min / row_passes_max,
wall_time, model_batch (rows of the first pass: 2B with guidance).
"""

from __future__ import annotations

import time

import torch

from .common import cfg_scale_at, filter_logits, guided_logits, sample_probs


class GuidedModel:
    """A GPT behind guidance, temperature and filtering, with its own per-row KV cache (a context manager:
    eval mode and a cache inside, the previous mode and no cache after).

    With guidance (cfg_scale != 1) the model runs the stacked batch [conditional; null class] (2B rows) and
    `probs` combines the halves as uncond + s * (cond - uncond), s = cfg_scale_at(token index); hidden states
    stay stacked (the EAGLE drafter reads both halves). static: a cache with fixed shapes (compiled passes).
    """

    def __init__(
        self,
        model,
        labels: torch.Tensor,
        num_tokens: int,
        cfg_scale: float = 1.0,
        cfg_schedule: str = "constant",
        cfg_ramp: float = 1.0,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        max_len: int | None = None,
        static: bool = False,
    ):
        self.model, self.num_tokens, self.max_len, self.static = model, num_tokens, max_len, static
        self.token_shape = tuple(model.head.token_shape)  # () or (S,): the model's layout of a position
        self.slots = self.token_shape[0] if self.token_shape else 1
        self.cfg_scale, self.cfg_schedule, self.cfg_ramp = cfg_scale, cfg_schedule, cfg_ramp
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.guided = cfg_scale != 1.0
        self.batch = labels.shape[0]
        self.labels = self.stack(labels, torch.full_like(labels, model.null_class))  # (B or 2B,)
        self.passes = 0
        self.was_training = model.training

    def __enter__(self) -> GuidedModel:
        self.model.eval()
        self.model.setup_cache(self.labels.shape[0], max_len=self.max_len, static=self.static)
        return self

    def __exit__(self, *exc) -> None:
        self.model.clear_cache()
        self.model.train(self.was_training)

    def stack(self, x: torch.Tensor, second: torch.Tensor | None = None) -> torch.Tensor:
        """(B, ...) -> the model's rows: [x; second or x] (2B, ...) with guidance, x without."""
        if not self.guided:
            return x
        return torch.cat([x, x if second is None else second])

    def stacked_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Indices of `rows` (of the B logical rows) among the model's rows."""
        return torch.cat([rows, rows + self.batch]) if self.guided else rows

    def prefill(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> probabilities (B, 1, S, V) of position 0 and hidden states (B or 2B, 1, D)."""
        self.passes += 1
        hidden = self.model.prefill(self.labels)
        return self.probs(hidden, 0), hidden

    def model_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The engine's (B, T, S) tokens in the model's layout: (B, T) codes, or (B, T, S) windows."""
        return tokens.reshape(*tokens.shape[:2], *self.token_shape)

    def decode(self, tokens: torch.Tensor, first_index: torch.Tensor):
        """Append tokens (B, T, S) at every row's cache length; first_index (B,): the position the first
        output predicts -> probabilities (B, T, S, V) and hidden states (B or 2B, T, D). The caller counts
        the pass in `passes` (outside a compiled pass: a changing int would be a guard to recompile on)."""
        hidden = self.model.decode(self.stack(self.model_tokens(tokens)))
        return self.probs(hidden, first_index), hidden

    def probs(self, hidden: torch.Tensor, first_index: int | torch.Tensor) -> torch.Tensor:
        """Stacked hidden states (B or 2B, T, D) of positions first_index .. first_index + T - 1 -> guided,
        filtered next-token probabilities (B, T, S, V), float32."""
        logits = self.model.logits(hidden).float()  # one projection over both halves
        logits = logits.reshape(*hidden.shape[:2], self.slots, logits.shape[-1])  # (B or 2B, T, S, V)
        if self.guided:
            scale = self.cfg_scale
            if self.cfg_schedule != "constant":
                steps = torch.arange(logits.shape[1], device=logits.device)
                index = first_index + steps if isinstance(first_index, int) else first_index[:, None] + steps
                schedule = (self.cfg_schedule, self.cfg_ramp)
                scale = cfg_scale_at(index, self.num_tokens, self.cfg_scale, *schedule)[..., None, None]
            logits = guided_logits(*logits.chunk(2), scale)
        return filter_logits(logits, self.temperature, self.top_k, self.top_p).softmax(dim=-1)

    def truncate(self, lengths: int | torch.Tensor) -> None:
        """Roll every row back: an int (all rows) or (B,) per-row lengths."""
        self.model.truncate_cache(lengths if isinstance(lengths, int) else self.stack(lengths))

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these logical rows (their conditional and unconditional halves)."""
        self.model.select_cache_rows(self.stacked_rows(rows))
        self.labels = self.labels[self.stacked_rows(rows)]
        self.batch = rows.shape[0]


class Rows:
    """Committed tokens of the rows still running, in a (B, N + pad, S) buffer (row r: positions 0 .. n_r - 1,
    then scratch that commits overwrite), their counts n (B,), and the finished images in `tokens_out`
    (B0, N, S). N counts positions, S slots per position (module docstring)."""

    def __init__(
        self, batch: int, num_tokens: int, pad: int, device, host_lengths: bool = True, slots: int = 1
    ):
        self.num_tokens, self.host_lengths, self.slots = num_tokens, host_lengths, slots
        self.tokens = torch.zeros(batch, num_tokens + pad, slots, dtype=torch.long, device=device)
        self.count = torch.zeros(batch, dtype=torch.long, device=device)
        self.tokens_out = torch.zeros(batch, num_tokens, slots, dtype=torch.long, device=device)
        self.ids = list(range(batch))  # the output row of each running row
        self.row_passes = [0] * batch  # target passes each output row took part in
        self.uniform: int | None = 0  # the common count of the running rows, when they all have it

    @property
    def running(self) -> int:
        return len(self.ids)

    def start(self, first: torch.Tensor) -> None:
        """Position 0 of every row (B, S) (from the target's prefill)."""
        self.tokens[:, 0] = first
        self.count.fill_(1)
        self.uniform = 1

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Positions index (B, T) of every row -> tokens (B, T, S)."""
        return self.tokens.gather(1, index[..., None].expand(-1, -1, self.slots))

    def at(self, offsets: torch.Tensor) -> torch.Tensor:
        """Positions n_r + offsets (T,) of every row -> (B, T, S) (committed where < n_r, scratch beyond)."""
        return self.gather(self.count[:, None] + offsets)

    def last(self) -> torch.Tensor:
        """The last committed position of every row: (B, 1, S)."""
        return self.gather(self.count[:, None] - 1)

    def lengths(self, offset: int = 0) -> int | torch.Tensor:
        """n_r + offset for every row: an int while all rows agree (the caches' fast path) unless
        host_lengths is off (compiled passes: always the (B,) tensor), else (B,)."""
        if self.host_lengths and self.uniform is not None:
            return self.uniform + offset
        return self.count + offset

    def commit(self, window: torch.Tensor, first: torch.Tensor, new: torch.Tensor) -> None:
        """Row r keeps the drafts window[r, 1 : 1 + f_r] (window (B, W + 1, S)) and `new` (B, S) after them:
        positions n_r .. n_r + f_r."""
        width = window.shape[1] - 1
        values = torch.cat([window[:, 1:], new[:, None]], dim=1)  # (B, W + 1, S): beyond f_r, scratch
        values.scatter_(1, first[:, None, None].expand(-1, 1, self.slots), new[:, None])
        positions = self.count[:, None] + torch.arange(width + 1, device=window.device)
        self.tokens.scatter_(1, positions[..., None].expand(-1, -1, self.slots), values)
        self.count += first + 1

    def advance(self, passes: int) -> torch.Tensor | None:
        """The pass's one host synchronisation: read the counts; rows that reached N are written out and
        leave. `passes`: target passes so far. Returns the running rows' indices (into the batch before)
        when some finished (every per-row tensor of the caller must be indexed with them), else None."""
        counts = self.count.tolist()
        done = [i for i, n in enumerate(counts) if n >= self.num_tokens]
        kept = None
        if done:
            done_rows = torch.tensor(done, device=self.count.device)
            out_rows = torch.tensor([self.ids[i] for i in done], device=self.count.device)
            self.tokens_out[out_rows] = self.tokens[done_rows, : self.num_tokens]
            for i in done:
                self.row_passes[self.ids[i]] = passes
            keep = [i for i, n in enumerate(counts) if n < self.num_tokens]
            kept = torch.tensor(keep, dtype=torch.long, device=self.count.device)
            self.tokens, self.count = self.tokens[kept], self.count[kept]
            self.ids = [self.ids[i] for i in keep]
            counts = [counts[i] for i in keep]
        self.uniform = counts[0] if counts and min(counts) == max(counts) else None
        return kept


def accepts(p_x: torch.Tensor, q_x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The speculative test: accept when u < p(x) / q(x), u ~ U[0, 1), with probability min(1, p(x) /
    q(x)); written u q(x) < p(x), which needs no division (a drawn draft has q(x) > 0)."""
    return u * q_x < p_x


def verify(p, q, drafts, limit, uniforms, relax=None, groups=None):
    """Test every row's drafted positions in order and draw its new position.

    p (B, W+1, S, V): target probabilities of positions n .. n+W; drafts (B, W, S) and q (B, W, S, V): the
    draft of each position n + o and the distribution it was drawn from; limit (B,): drafts row r may test
    (<= W); uniforms (B, W + 1, S) ~ U[0, 1): the tests' draws, then the new position's.
    relax(p, x) -> the target to test x against (LANTERN); groups (V, G): test sum_G p / sum_G q over the
    draft's group (GSD). Returns first (B,) f_r (accepted positions = the column of the new one), new
    (B, S), tested (B,) (positions tested: f_r, plus the rejected one).

    Exact rule (Leviathan et al.): accept x with probability min(1, p(x) / q(x)); at the first rejection
    draw from normalise(max(0, p - q)); after `limit` accepted drafts, one bonus token from p. With S > 1
    slots the rule runs over the slots in order (module docstring): a position passes when all its slots
    do; in the first that does not, slots before the failing one keep their drafts, the failing one draws
    from its residual and the rest from p.
    """
    batch, width, slots = drafts.shape
    rows = torch.arange(batch, device=p.device)
    target = p[:, :width] if relax is None else relax(p[:, :width], drafts)  # (B, W, S, V)
    if groups is None:
        p_x = target.gather(-1, drafts[..., None]).squeeze(-1)  # (B, W, S)
        q_x = q.gather(-1, drafts[..., None]).squeeze(-1)
    else:
        members = groups[drafts]  # (B, W, S, G)
        p_x, q_x = target.gather(-1, members).sum(-1), q.gather(-1, members).sum(-1)
    passed = accepts(p_x, q_x, uniforms[:, :width])  # (B, W, S)
    accept = passed.all(-1) & (torch.arange(width, device=p.device) < limit[:, None])  # (B, W)
    first = accept.long().cumprod(dim=1).sum(dim=1)  # (B,) in [0, limit]
    rejected = first < limit
    bonus = p[rows, first]  # (B, S, V): p after the last accepted position
    at = first.clamp(max=width - 1)
    residual = (target[rows, at] - q[rows, at]).clamp_min(0)  # (B, S, V); sample_probs normalises
    usable = residual.sum(-1, keepdim=True) > 1e-12  # p == q up to float rounding: p itself
    failing = passed[rows, at].long().cumprod(dim=-1).sum(dim=-1)  # (B,) the first failing slot
    slot = torch.arange(slots, device=p.device)
    from_residual = (rejected[:, None] & (slot == failing[:, None]))[..., None]  # (B, S, 1)
    new = sample_probs(torch.where(from_residual & usable, residual, bonus), uniform=uniforms[:, width])
    kept = rejected[:, None] & (slot < failing[:, None])  # slots before the failing one keep their drafts
    return first, torch.where(kept, drafts[rows, at], new), first + rejected.long()


class DecodeCounters:
    """Accepted and tested drafts summed on the device (read once, at the end)."""

    def __init__(self, device):
        self.accepted = torch.zeros((), dtype=torch.long, device=device)
        self.tested = torch.zeros((), dtype=torch.long, device=device)

    def add(self, first: torch.Tensor, tested: torch.Tensor) -> None:
        self.accepted += first.sum()
        self.tested += tested.sum()


def decode_stats(target: GuidedModel, rows: Rows, counters: DecodeCounters, start: float, model_batch: int):
    """The stats every draft-and-verify sampler returns (module docstring)."""
    device = rows.count.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    accepted, tested = int(counters.accepted), int(counters.tested)
    row_passes = rows.row_passes
    per_row = sum(row_passes) / len(row_passes)
    return {
        "forward_passes": target.passes,
        "passes_per_row": per_row,
        "tokens_per_pass": rows.num_tokens / per_row,
        "accepted_per_pass": accepted / sum(row_passes),
        "acceptance_rate": accepted / tested if tested else 0.0,
        "row_passes_min": min(row_passes),
        "row_passes_max": max(row_passes),
        "wall_time": time.perf_counter() - start,
        "model_batch": model_batch,
    }


def check_num_tokens(model, num_tokens: int | None) -> int:
    """A sampler's `num_tokens` (None: all N) -> the positions to generate. A Token-Shuffle model generates
    whole grids only (a prefix of windows is no prefix of the raster order a tokenizer decodes)."""
    if num_tokens is None:
        return model.num_positions
    if not 1 <= num_tokens <= model.num_tokens:
        raise ValueError(f"num_tokens={num_tokens}; the model generates 1 to {model.num_tokens}")
    if model.num_positions != model.num_tokens and num_tokens != model.num_tokens:
        raise ValueError(f"num_tokens={num_tokens}: a Token-Shuffle GPT generates all {model.num_tokens}")
    return num_tokens * model.num_positions // model.num_tokens
