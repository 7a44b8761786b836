"""Speculative decoding for class-conditional GPTs: exact speculative sampling ("Fast Inference from
Transformers via Speculative Decoding", Leviathan et al. 2023; "Accelerating Large Language Model Decoding
with Speculative Sampling", Chen et al. 2023) and LANTERN's relaxed acceptance ("LANTERN: Accelerating Visual
Autoregressive Models with Relaxed Speculative Decoding", Jang et al. 2024; LANTERN++ 2025).

One pass: a small draft GPT proposes tokens autoregressively with its own KV cache (distribution q per
token), the target GPT scores all of them in ONE forward pass (`decode(tokens (B, k))`), and each draft x is
tested in order:

    exact       accept with probability min(1, p(x) / q(x)); at the first rejection draw the token from
                normalise(max(0, p - q)); when every draft passes, one bonus token from p.
    LANTERN     B_k(x) = the k codes nearest to x in the tokenizer's latent space (x excluded), in order
                of proximity (`latent_neighbours`). c_m = the target mass of the longest prefix of B_k(x)
                whose cumulative mass is <= delta (LANTERN) or <= (lambda - 1) * p(x) (LANTERN++, when
                `lantern_lambda` is set). The draft is tested against the relaxed target p~_x: the mass of
                that prefix moved onto x (`relaxed_target`):
                    p~_x(x) = p(x) + c_m,   p~_x(y) = 0 for the used neighbours y,   p~_x = p elsewhere,
                so TV(p~_x, p) = c_m <= delta. Accept with probability min(1, p~_x(x) / q(x)); at a
                rejection draw from normalise(max(0, p~_x - q)) = normalise(max(0, p' - q)) where p' is p
                with x and the used neighbours zeroed (at x, p~_x(x) < q(x) after a rejection). The bonus
                token comes from the unrelaxed p. delta = 0 (or lambda = 1) moves no mass: p~_x = p,
                the same computation and random draws as exact decoding, hence the same tokens.
                The official code (jadohu/LANTERN, `evaluate_posterior`) differs at a rejection: it zeroes
                the draft distribution q on all k + 1 listed neighbours (not p on the used ones) before
                max(0, p - q). Here the residual is the one speculative sampling prescribes for the target
                p~_x the draft was tested against. The guarantee is per drafted token: p~_x is within
                total variation c_m <= delta of p (what the paper bounds); the step's output mixes the
                p~_x over drafts and is not claimed to be within delta of p in general.

Guidance, temperature and filtering: both models run the doubled batch [conditional; null class] when
cfg_scale != 1 (each with its own null class), combine uncond + s * (cond - uncond) with s =
cfg_scale_at(token index) (sampling/common.py), then the same temperature / top-k / top-p (`filter_logits`)
turn logits into p and q. Everything is compared in float32.

Batches with one shared cache length (generators/gpt.py: every row of a KV cache has the same length).
Rows accept different numbers of drafts, so each row r keeps its committed tokens in a (B, N) buffer with a
count n_r, and both caches hold only the common prefix c = min_r n_r (the target cache: class + tokens
0 .. c-2; the last common token is re-fed so the first output predicts token c). Every pass feeds the
target ONE rectangular window of w + 1 tokens, w = min(gamma, N - 1 - c), at tokens c-1 .. c+w-1:

    column        0        1 .. e_r                    e_r+1 .. w
    row r         tok c-1  committed (forced, no test)  drafts: w - e_r of them,  e_r = n_r - c <= w

and output column o predicts token c + o. Row r tests its drafts from output column e_r on; its new token
(residual or bonus) lands at c + f_r, f_r in [e_r, w], so it gains a_r + 1 tokens (a_r accepted drafts). A
row ahead of the slowest by e_r gets w - e_r drafts (none when e_r = w: it still gains the bonus token),
so n_r - c <= w holds after every pass and the window never grows: per pass, gamma draft calls and one
target call over gamma + 1 positions, the single-row cost, and no padding or attention masks. Then
c' = min n_r', the target cache is truncated to c' and the draft cache to min(c', its length) (the draft
catches up on the committed tokens it has not seen at the start of the next pass, in the same call that
reads token c'-1). A finished row (n_r = N) has e_r > w and is left alone. Rows finish with exactly
`num_tokens` tokens. The first token of every row comes from the target's prefill pass (counted), as in
sample_ar; drafting starts at token 1.

What the shared length costs: rows ahead of the slowest get fewer drafts, so a big batch advances more
slowly than its rows would alone. A simulation with i.i.d. acceptance (probability 0.8 per draft, 256
tokens, gamma 4) needs ~80 target passes for one row, ~93 for a batch of 64 if every row had its own cache
(the slowest row's count), and ~135 here; gamma 8 gives ~101, gamma 12 ~90 (gamma draft calls per pass).
At acceptance 0.35 the gap is small (~185 vs ~207). Raise gamma with the batch size when acceptance is high;
`max_lead` in the stats shows how far rows drifted apart. (Per-row cache lengths would need per-row
positions and attention masks in generators/gpt.py.)

Why the output distribution stays exact. Take one row. Whatever happens in a pass, the token it commits at
index i is drawn, given everything that happened before (its committed prefix x_<i, the other rows, the
caches), either (a) directly from p(. | x_<i) (bonus token), or (b) by the speculative test of a draft
x ~ q(. | x_<i, earlier drafts of this pass), which commits y with probability min(q(y), p(y)) +
(1 - sum_z min(q(z), p(z))) * normalise(max(0, p - q))(y) = p(y). Which case applies, how many drafts the row
gets (w - e_r) and where the caches are truncated (c' = min n_r') are functions of what was drawn before
that token's test: they are stopping times of the process, not peeks at its future, so they decide only
what gets (re)computed, never the law of the committed token. Forced tokens are recomputations of committed
ones and take no test. By induction over i every row is a sample of prod_i p(x_i | x_<i), the target's
own autoregressive distribution (with guidance and filtering as configured). Rows share the random
generator but draw independently (one multinomial / uniform per row). LANTERN replaces p by p~_x in (b)
and is approximate by design.

Stats: forward_passes (target calls, the prefill included, as in sample_ar), draft_forward_passes,
tokens_per_pass (mean new tokens per target pass per row), accepted_per_pass (mean accepted drafts per
target pass per row), acceptance_rate (accepted / tested drafts), max_lead (largest gap, in tokens,
between the furthest and the slowest row: what the shared cache holds back), wall_time, model_batch.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .common import SampleResult, cfg_scale_at, filter_logits, guided_logits

ACCEPTANCE_RULES = ("exact", "lantern")
NEIGHBOUR_METRICS = ("euclidean", "cosine")


# ---- LANTERN: latent neighbourhoods and the relaxed target


@torch.no_grad()
def latent_neighbours(
    code_vectors: torch.Tensor, k: int, metric: str = "euclidean", chunk: int = 1024
) -> torch.Tensor:
    """code_vectors (V, D) -> (V, k) long: for every code the k nearest other codes, nearest first.

    metric "euclidean" (distance between vectors) or "cosine" (1 - cosine similarity). The code itself is
    excluded; ties are broken by code index (stable sort), so the result is deterministic. Computed in
    float64, `chunk` rows at a time (memory chunk x V).
    """
    if metric not in NEIGHBOUR_METRICS:
        raise ValueError(f"neighbour metric {metric!r}; expected one of {NEIGHBOUR_METRICS}")
    vectors = code_vectors.detach().double()  # (V, D)
    size = vectors.shape[0]
    if not 1 <= k < size:
        raise ValueError(f"k={k} neighbours; a codebook of {size} codes has 1 to {size - 1} other codes")
    if metric == "cosine":
        vectors = F.normalize(vectors, dim=-1)
    squared = vectors.pow(2).sum(-1)  # (V,)
    out = torch.empty(size, k, dtype=torch.long, device=vectors.device)
    for start in range(0, size, chunk):
        rows = vectors[start : start + chunk]  # (b, D)
        if metric == "cosine":
            distance = 1 - rows @ vectors.t()  # (b, V)
        else:
            distance = (
                squared[start : start + chunk, None] + squared[None] - 2 * rows @ vectors.t()
            ).clamp_min(0)
        index = torch.arange(start, start + rows.shape[0], device=vectors.device)
        distance[torch.arange(rows.shape[0]), index] = float("inf")  # never its own neighbour
        out[start : start + chunk] = distance.sort(dim=-1, stable=True).indices[:, :k]
    return out


def _codebook_digest(code_vectors: torch.Tensor) -> str:
    return hashlib.sha256(code_vectors.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def tokenizer_neighbours(folder, k: int, metric: str = "euclidean", tokenizer=None) -> torch.Tensor:
    """Latent neighbours of an exported tokenizer's codes, computed once and cached beside the export as
    `<folder>/neighbours_k{k}_{metric}.safetensors` -> (V, k) long on the CPU.

    k is capped at V - 1 (LANTERN's k = 1000 on a 1024-code quickstart codebook means "all other codes").
    The file records a digest of the code vectors and is recomputed when the tokenizer changed (re-export).
    `tokenizer` (the loaded module) avoids loading the export again.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    from tokenizers_vis.base import from_pretrained

    folder = Path(folder)
    if tokenizer is None:
        tokenizer = from_pretrained(folder)
    vectors = tokenizer.code_vectors().detach().float().cpu()  # (V, D)
    k = min(int(k), vectors.shape[0] - 1)
    digest = _codebook_digest(vectors)
    path = folder / f"neighbours_k{k}_{metric}.safetensors"
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("codebook_sha256") == digest:
                return f.get_tensor("neighbours")
    neighbours = latent_neighbours(vectors, k, metric)
    save_file({"neighbours": neighbours}, str(path), metadata={"codebook_sha256": digest, "metric": metric})
    return neighbours


def relaxed_target(
    p: torch.Tensor,
    x: torch.Tensor,
    neighbours: torch.Tensor,
    delta: float = 0.0,
    lam: float | None = None,
) -> torch.Tensor:
    """LANTERN's relaxed target for draft token x: p (..., V), x long (...), neighbours (V, k) -> (..., V).

    The longest proximity-ordered prefix of B_k(x) = neighbours[x] whose cumulative target mass c_m is
    <= delta (LANTERN; lam None) or <= (lam - 1) * p(x) (LANTERN++) gives its mass to x:
    p~(x) = p(x) + c_m, p~ = 0 on that prefix, p~ = p elsewhere. A distribution with TV(p~, p) = c_m.
    Neighbour lists must not contain the code itself (`latent_neighbours` guarantees it).
    """
    near = neighbours[x]  # (..., k)
    mass = p.gather(-1, near)  # (..., k)
    cumulative = mass.cumsum(-1)  # nondecreasing: {cumulative <= bound} is a prefix
    p_x = p.gather(-1, x[..., None])  # (..., 1)
    bound = delta if lam is None else (lam - 1) * p_x
    used = cumulative <= bound  # (..., k)
    count = used.sum(-1, keepdim=True)  # (..., 1)
    moved = torch.where(count > 0, cumulative.gather(-1, (count - 1).clamp_min(0)), torch.zeros_like(p_x))
    relaxed = p.scatter(-1, near, torch.where(used, torch.zeros_like(mass), mass))
    return relaxed.scatter(-1, x[..., None], p_x + moved)


# ---- the machinery speculative and Jacobi decoding share


class _Guided:
    """A GPT behind classifier-free guidance, temperature and filtering: tokens in, next-token probabilities
    out (float32), with its own KV cache and a count of its forward passes."""

    def __init__(self, model, labels, num_tokens, cfg_scale, cfg_schedule, temperature, top_k, top_p):
        self.model, self.num_tokens = model, num_tokens
        self.cfg_scale, self.cfg_schedule = cfg_scale, cfg_schedule
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.guided = cfg_scale != 1.0
        null = torch.full_like(labels, model.null_class)
        self.rows = torch.cat([labels, null]) if self.guided else labels  # (B or 2B,)
        self.passes = 0
        self.was_training = model.training

    def __enter__(self):
        self.model.eval()
        self.model.setup_cache(self.rows.shape[0], max_len=self.num_tokens)
        return self

    def __exit__(self, *exc):
        self.model.clear_cache()
        self.model.train(self.was_training)

    @property
    def length(self) -> int:
        return self.model.cache_length

    def truncate(self, length: int) -> None:
        self.model.truncate_cache(length)

    def prefill(self) -> torch.Tensor:
        """-> probabilities (B, 1, V) of token 0."""
        self.passes += 1
        return self._probs(self.model.prefill(self.rows), first_index=0)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append tokens (B, T) at the cache length L (tokens L-1 .. L+T-2) -> probabilities (B, T, V) of
        tokens L .. L+T-1."""
        first_index = self.length
        self.passes += 1
        hidden = self.model.decode(torch.cat([tokens, tokens]) if self.guided else tokens)
        return self._probs(hidden, first_index)

    def _probs(self, hidden: torch.Tensor, first_index: int) -> torch.Tensor:
        logits = self.model.logits(hidden).float()  # (B or 2B, T, V)
        if self.guided:
            cond, uncond = logits.chunk(2)
            steps = range(first_index, first_index + logits.shape[1])
            scale = [cfg_scale_at(i, self.num_tokens, self.cfg_scale, self.cfg_schedule) for i in steps]
            logits = guided_logits(cond, uncond, torch.tensor(scale, device=logits.device)[:, None])
        return filter_logits(logits, self.temperature, self.top_k, self.top_p).softmax(dim=-1)


class _Rows:
    """Committed tokens of every row: tokens (B, N) (-1 where not yet sampled) and counts n (B,)."""

    def __init__(self, batch: int, num_tokens: int, device):
        self.tokens = torch.full((batch, num_tokens), -1, dtype=torch.long, device=device)
        self.count = torch.zeros(batch, dtype=torch.long, device=device)
        self.max_lead = 0

    @property
    def common(self) -> int:
        """c = min_r n_r, the prefix every row has committed."""
        return int(self.count.min())

    def start(self, first: torch.Tensor) -> None:
        self.tokens[:, 0] = first
        self.count.fill_(1)

    def committed(self, c: int, w: int) -> torch.Tensor:
        """(B, w) True where token c + j is committed in row r."""
        return (c + torch.arange(w, device=self.count.device))[None] < self.count[:, None]

    def window(self, c: int, drafts: torch.Tensor) -> torch.Tensor:
        """Tokens c-1 .. c+w-1 of every row, drafts (B, w) where not committed -> (B, w + 1)."""
        w = drafts.shape[1]
        body = torch.where(self.committed(c, w), self.tokens[:, c : c + w], drafts)
        return torch.cat([self.tokens[:, c - 1 : c], body], dim=1)

    def commit(self, c: int, window: torch.Tensor, first: torch.Tensor, new: torch.Tensor) -> None:
        """Row r (unless finished) keeps window tokens c .. c+f_r-1 and `new` at c + f_r."""
        w = window.shape[1] - 1
        active = self.count - c <= w
        extended = torch.cat([window[:, 1:], new[:, None]], dim=1)  # (B, w + 1): tokens c .. c+w
        extended = extended.scatter(1, first[:, None], new[:, None])
        keep = (torch.arange(w + 1, device=first.device)[None] <= first[:, None]) & active[:, None]
        self.tokens[:, c : c + w + 1] = torch.where(keep, extended, self.tokens[:, c : c + w + 1])
        self.count = torch.where(active, c + first + 1, self.count)
        self.max_lead = max(self.max_lead, int(self.count.max() - self.count.min()))


def _acceptance_ratio(p_x: torch.Tensor, q_x: torch.Tensor) -> torch.Tensor:
    """Accept when u < p(x) / q(x), u ~ U[0, 1): probability min(1, p(x) / q(x))."""
    return p_x / q_x


def _verify(p, q, drafts, forced, generator, relax=None, groups=None):
    """Test every row's drafts in order and draw its new token.

    p (B, w+1, V): target probabilities of tokens c .. c+w; q (B, w, V) and drafts (B, w): each draft token
    c + o and the distribution it was drawn from (read where o >= forced); forced (B,) e_r. relax(p, x) ->
    the target to test x against (LANTERN); groups (V, G): test sum_G p / sum_G q over the draft's group
    (GSD). Returns first (B,) f_r (the column of the new token), new (B,), accepted (B,), tested (B,).
    """
    batch, w = drafts.shape
    columns = torch.arange(w, device=drafts.device)
    is_forced = columns[None] < forced[:, None]  # (B, w)
    target = p[:, :w] if relax is None else relax(p[:, :w], drafts)  # (B, w, V)
    if groups is None:
        p_x = target.gather(-1, drafts[..., None]).squeeze(-1)  # (B, w)
        q_x = q.gather(-1, drafts[..., None]).squeeze(-1)
    else:
        members = groups[drafts]  # (B, w, G)
        p_x, q_x = target.gather(-1, members).sum(-1), q.gather(-1, members).sum(-1)
    ratio = _acceptance_ratio(p_x, torch.where(is_forced | (q_x <= 0), torch.ones_like(q_x), q_x))
    u = torch.rand(batch, w, device=p.device, generator=generator)
    accept = is_forced | (u < ratio)
    first = accept.long().cumprod(dim=1).sum(dim=1)  # (B,) in [0, w]
    rejected = first < w
    final = p.gather(1, first[:, None, None].expand(-1, 1, p.shape[-1])).squeeze(1)  # bonus: p at column f
    if w > 0:
        at = first.clamp(max=w - 1)[:, None, None].expand(-1, 1, p.shape[-1])
        residual = (target.gather(1, at) - q.gather(1, at)).squeeze(1).clamp_min(0)  # (B, V)
        total = residual.sum(-1, keepdim=True)
        residual = torch.where(total > 1e-12, residual / total.clamp_min(1e-12), final)  # p == q: rare float
        final = torch.where(rejected[:, None], residual, final)
    new = torch.multinomial(final, 1, generator=generator).squeeze(1)
    accepted = (first - forced).clamp_min(0)
    tested = accepted + (rejected & (forced < w)).long()
    return first, new, accepted, tested


def _stats(target, rows, num_tokens, accepted, tested, start, device) -> dict:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    batch = rows.count.shape[0]
    return {
        "forward_passes": target.passes,
        "tokens_per_pass": num_tokens / target.passes,
        "accepted_per_pass": accepted / (batch * target.passes),
        "acceptance_rate": accepted / tested if tested else 0.0,
        "max_lead": rows.max_lead,
        "wall_time": time.perf_counter() - start,
        "model_batch": target.rows.shape[0],  # rows per forward pass: 2B with guidance
    }


def _check_num_tokens(model, num_tokens):
    num_tokens = model.num_tokens if num_tokens is None else num_tokens
    if not 1 <= num_tokens <= model.num_tokens:
        raise ValueError(f"num_tokens={num_tokens}; the model generates 1 to {model.num_tokens}")
    return num_tokens


# ---- speculative sampling


@torch.no_grad()
def sample_speculative(
    model,
    draft,
    labels: torch.Tensor,
    num_tokens: int | None = None,
    gamma: int = 4,
    cfg_scale: float = 1.0,
    cfg_schedule: str = "constant",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    acceptance: str = "exact",
    lantern_delta: float = 0.0,
    lantern_lambda: float | None = None,
    neighbours: torch.Tensor | None = None,
) -> SampleResult:
    """labels (B,) -> SampleResult with tokens (B, num_tokens) from `model`, drafted by `draft`.

    gamma: drafts per pass (per row: gamma minus its lead over the slowest row, see the module docstring).
    acceptance "exact" or "lantern" (needs `neighbours` (V, k) from `latent_neighbours`; lantern_delta, or
    lantern_lambda for LANTERN++'s bound (lambda - 1) * p(x)). Both models run in eval mode on the target's
    device (their modes are restored afterwards); `generator` must live on that device.
    """
    num_tokens = _check_num_tokens(model, num_tokens)
    cfg_scale_at(0, num_tokens, cfg_scale, cfg_schedule)  # rejects an unknown schedule up front
    if gamma < 1:
        raise ValueError(f"gamma={gamma}; expected >= 1 drafts per pass")
    if draft is model:
        raise ValueError("the draft must be another module than the target: each keeps its own KV cache")
    if draft.num_tokens < num_tokens:
        raise ValueError(f"the draft generates {draft.num_tokens} tokens; {num_tokens} were asked for")
    vocab = getattr(model, "config", {}).get("vocab_size")
    if vocab is not None and getattr(draft, "config", {}).get("vocab_size", vocab) != vocab:
        raise ValueError(f"draft vocab_size {draft.config['vocab_size']} != the target's {vocab}")
    if acceptance not in ACCEPTANCE_RULES:
        raise ValueError(f"acceptance={acceptance!r}; expected one of {ACCEPTANCE_RULES}")
    relax = None
    if acceptance == "lantern":
        if neighbours is None:
            raise ValueError("acceptance='lantern' needs neighbours (V, k): see latent_neighbours")
        if lantern_delta < 0 or (lantern_lambda is not None and lantern_lambda < 1):
            raise ValueError(
                f"lantern_delta={lantern_delta}, lantern_lambda={lantern_lambda}; expected >= 0, >= 1"
            )
        near = neighbours.to(next(model.parameters()).device)

        def relax(p, x):
            return relaxed_target(p, x, near, lantern_delta, lantern_lambda)

    device = next(model.parameters()).device
    labels = labels.to(device)
    settings = (num_tokens, cfg_scale, cfg_schedule, temperature, top_k, top_p)
    rows = _Rows(labels.shape[0], num_tokens, device)
    accepted = tested = 0
    start = time.perf_counter()
    with _Guided(model, labels, *settings) as target, _Guided(draft, labels, *settings) as small:
        rows.start(torch.multinomial(target.prefill()[:, 0], 1, generator=generator).squeeze(1))
        small.prefill()
        while (c := rows.common) < num_tokens:
            w = min(gamma, num_tokens - 1 - c)
            forced = rows.count - c  # (B,)
            committed = rows.committed(c, w)  # (B, w)
            body = rows.tokens[:, c : c + w].clone()  # committed tokens, drafts fill the rest
            q = None  # (B, w, V) the distribution each draft was drawn from
            if w > 0:
                # Catch the draft up on committed tokens it has not read; the last output predicts token c.
                q_k = small.decode(rows.tokens[:, small.length - 1 : c])[:, -1]  # (B, V)
                q = q_k.new_zeros(labels.shape[0], w, q_k.shape[-1])
                for k in range(w):
                    if k > 0:
                        q_k = small.decode(body[:, k - 1 : k])[:, -1]
                    sample = torch.multinomial(q_k, 1, generator=generator).squeeze(1)
                    body[:, k] = torch.where(committed[:, k], body[:, k], sample)
                    q[:, k] = q_k
            window = torch.cat([rows.tokens[:, c - 1 : c], body], dim=1)  # (B, w + 1)
            p = target.decode(window)  # (B, w + 1, V): tokens c .. c+w
            q = p[:, :0] if q is None else q
            first, new, row_accepted, row_tested = _verify(p, q, body, forced, generator, relax)
            active = forced <= w
            accepted += int(row_accepted[active].sum())
            tested += int(row_tested[active].sum())
            rows.commit(c, window, first, new)
            target.truncate(rows.common)
            small.truncate(min(small.length, rows.common))
        stats = _stats(target, rows, num_tokens, accepted, tested, start, device)
        stats["draft_forward_passes"] = small.passes
    return SampleResult(tokens=rows.tokens, labels=labels, stats=stats)
