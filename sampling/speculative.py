"""Speculative decoding for class-conditional GPTs: exact speculative sampling ("Fast Inference from
Transformers via Speculative Decoding", Leviathan et al. 2023; "Accelerating Large Language Model Decoding
with Speculative Sampling", Chen et al. 2023) and LANTERN's relaxed acceptance ("LANTERN: Accelerating Visual
Autoregressive Models with Relaxed Speculative Decoding", Jang et al. 2024; LANTERN++ 2025).

One pass per row: a drafter proposes gamma tokens autoregressively (distribution q per token), the target
GPT scores all of them in ONE forward pass (`decode(tokens (B, gamma + 1))`), and each draft x is tested in
order (sampling/engine.py's `verify`):

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

Drafters (`draft`):

    a GPT           a separate, smaller GPT trained on the same codes (gpt_draft_quickstart), with its own
                    KV cache: gamma calls of one token each per pass (the first also re-reads the last
                    committed token, so the rows' catch-up is always two tokens wide).
    EagleDrafter    one layer on the target's own hidden states (generators/eagle.py, eagle_quickstart):
                    the first of its gamma calls reads the (token, target feature) pairs of the tokens the
                    last pass committed (gamma + 1 wide, the uncommitted tail is padding), the others feed
                    back its own predicted features; its distribution is the target's frozen head on them.

Guidance, temperature and filtering: both target and drafter run the stacked batch [conditional; null class]
when cfg_scale != 1 (a GPT drafter with its own null class; the EAGLE drafter on the target's conditional
and unconditional features), combine uncond + s * (cond - uncond) with s = cfg_scale_at(token index)
(sampling/common.py), then the same temperature / top-k / top-p (`filter_logits`) turn logits into p and
q. Everything is compared in float32.

Batches: every row has its own KV-cache length (sampling/engine.py), so each row gets its full gamma drafts
every pass, however many the others accepted, and leaves the batch when it has its N tokens. A row near the
end tests min(gamma, N - 1 - n_r) drafts (its window is padded). The first token of every row comes from
the target's prefill pass (counted), as in sample_ar.

Why the output distribution stays exact. Take one row. Whatever happens in a pass, the token it commits at
index i is drawn, given everything that happened before (its committed prefix x_<i, the other rows, the
caches), either (a) directly from p(. | x_<i) (bonus token), or (b) by the speculative test of a draft
x ~ q(. | x_<i, earlier drafts of this pass), which commits y with probability min(q(y), p(y)) +
(1 - sum_z min(q(z), p(z))) * normalise(max(0, p - q))(y) = p(y). How many drafts a row tests and when it
leaves the batch are functions of what was drawn before: they decide only what gets computed, never the law
of the committed token. By induction over i every row is a sample of prod_i p(x_i | x_<i), the target's
own autoregressive distribution (with guidance and filtering as configured), whichever drafter proposed.
Rows share the random generator but draw independently (one uniform per test and per draw). LANTERN
replaces p by p~_x in (b) and is approximate by design.

Stats: those of sampling/engine.py's `decode_stats`, plus draft_forward_passes (drafter calls of the batch).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

from generators.eagle import EagleDrafter
from tokenizers_vis.quantizers import NEIGHBOUR_METRICS, nearest_codes  # noqa: F401  (NEIGHBOUR_METRICS re-exported)

from .common import SampleResult, cfg_scale_at, compile_step, sample_probs
from .engine import DecodeCounters, GuidedModel, Rows, check_num_tokens, decode_stats, verify

ACCEPTANCE_RULES = ("exact", "lantern")


# ---- LANTERN: latent neighbourhoods and the relaxed target


def latent_neighbours(code_vectors: torch.Tensor, k: int, metric: str = "euclidean") -> torch.Tensor:
    """code_vectors (V, D) -> (V, k) long: for every code the k nearest *other* codes, nearest first
    (tokenizers_vis.quantizers.nearest_codes without the code itself; float64, ties by index)."""
    size = code_vectors.shape[0]
    if not 1 <= k < size:
        raise ValueError(f"k={k} neighbours; a codebook of {size} codes has 1 to {size - 1} other codes")
    return nearest_codes(code_vectors, k, metric=metric, include_self=False)


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

    from core import from_pretrained

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


# ---- drafters


class GPTDraft:
    """A separate draft GPT with its own guided, per-row KV cache. Before the first draft of a pass its
    cache holds the class and the committed tokens up to n - 3 (length n - 1) and it reads tokens n - 2 and
    n - 1 (at the very first pass: length 1, token 0 alone)."""

    def __init__(self, model, labels, max_len, settings, static=False):
        self.guided = GuidedModel(model, labels, **settings, max_len=max_len, static=static)
        self.feed = 1
        self.passes = 0  # drafter calls (the sampler adds gamma per pass)

    def __enter__(self):
        self.guided.__enter__()
        return self

    def __exit__(self, *exc):
        self.guided.__exit__(*exc)

    def start(self, rows: Rows, target_hidden: torch.Tensor) -> None:
        self.guided.prefill()
        self.passes += 1

    def propose(self, rows: Rows, gamma: int, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uniforms (B, gamma, S) -> drafts (B, gamma, S) of positions n .. n + gamma - 1 and their
        distributions q (B, gamma, S, V)."""
        offsets = torch.arange(-self.feed, 0, device=rows.count.device)
        probs, _ = self.guided.decode(rows.at(offsets), rows.count - self.feed + 1)  # last: position n
        q_k = probs[:, -1]
        drafts, q = [], []
        for k in range(gamma):
            if k > 0:
                q_k = self.guided.decode(drafts[-1][:, None], rows.count + k)[0][:, 0]
            drafts.append(sample_probs(q_k, uniform=uniforms[:, k]))
            q.append(q_k)
        self.feed = 2
        return torch.stack(drafts, 1), torch.stack(q, 1)

    def accept(self, rows: Rows, target_hidden: torch.Tensor, first: torch.Tensor) -> None:
        self.guided.truncate(rows.lengths(-1))  # keep the class and tokens up to n' - 3

    def select(self, keep: torch.Tensor) -> None:
        self.guided.select(keep)


class EagleDraft:
    """The EAGLE drafter (generators/eagle.py) on the target's features, with its own per-row KV cache:
    draft position i holds the pair (token i, f_i), f_i the target's hidden state that predicted token i."""

    def __init__(self, drafter: EagleDrafter, target: GuidedModel, max_len: int, static: bool = False):
        self.drafter, self.target, self.max_len, self.static = drafter, target, max_len, static
        self.was_training = drafter.training
        self.passes = 0  # drafter calls (the sampler adds gamma per pass)

    def __enter__(self):
        self.drafter.eval()
        self.drafter.setup_cache(self.target.labels.shape[0], max_len=self.max_len, static=self.static)
        return self

    def __exit__(self, *exc):
        self.drafter.clear_cache()
        self.drafter.train(self.was_training)

    def start(self, rows: Rows, target_hidden: torch.Tensor) -> None:
        """After the target's prefill: the first pair is (token 0, the class position's hidden state)."""
        self.pairs = (rows.tokens[:, :1], target_hidden)  # (B, 1), (B or 2B, 1, D)
        self.last = torch.zeros_like(rows.count)  # the column of the last true pair
        self.true_length: int | torch.Tensor = 0  # drafter positions holding pairs of committed tokens

    def _draft(self, tokens, features, column, first_index):
        """Pairs (tokens (B, T, S), features (B*, T, D)) appended; the prediction at `column` (B*,) -> that
        predicted feature (B*, D) and the guided distribution (B, S, V) of position first_index it gives."""
        predicted = self.drafter.decode(self.target.stack(self.target.model_tokens(tokens)), features)
        feature = predicted[torch.arange(predicted.shape[0], device=predicted.device), column]
        return feature, self.target.probs(feature[:, None], first_index)[:, 0]

    def propose(self, rows: Rows, gamma: int, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, features = self.pairs
        self._truncate(self.true_length)
        # the pairs of the committed tokens (W wide, padded); the last true pair predicts token n
        feature, q_k = self._draft(tokens, features, self.target.stack(self.last), rows.count)
        self.true_length = rows.lengths()  # pairs 0 .. n - 1 hold committed tokens; drop the padding
        self._truncate(self.true_length)
        column = torch.zeros_like(self.target.stack(self.last))
        drafts, q = [], []
        for k in range(gamma):
            if k > 0:  # the drafter's own (draft, predicted feature) pair predicts token n + k
                feature, q_k = self._draft(drafts[-1][:, None], feature[:, None], column, rows.count + k)
            drafts.append(sample_probs(q_k, uniform=uniforms[:, k]))
            q.append(q_k)
        return torch.stack(drafts, 1), torch.stack(q, 1)

    def _truncate(self, lengths: int | torch.Tensor) -> None:
        self.drafter.truncate_cache(lengths if isinstance(lengths, int) else self.target.stack(lengths))

    def accept(self, rows: Rows, target_hidden: torch.Tensor, first: torch.Tensor) -> None:
        """The pass committed tokens n_old .. n_old + f: their pairs are the target's window outputs."""
        width = target_hidden.shape[1]
        offsets = torch.arange(width, device=first.device)
        self.pairs = (rows.gather((rows.count - first - 1)[:, None] + offsets), target_hidden)
        self.last = first

    def select(self, keep: torch.Tensor) -> None:
        self.drafter.select_cache_rows(self.target.stacked_rows(keep))
        if not isinstance(self.true_length, int):
            self.true_length = self.true_length[keep]


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
    cfg_ramp: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    acceptance: str = "exact",
    lantern_delta: float = 0.0,
    lantern_lambda: float | None = None,
    neighbours: torch.Tensor | None = None,
    compile: bool = False,
) -> SampleResult:
    """labels (B,) -> SampleResult with tokens (B, num_tokens) from `model`, drafted by `draft` (a smaller
    GPT on the same codes, or an EagleDrafter trained for `model`).

    gamma: drafts per pass and row. acceptance "exact" or "lantern" (needs `neighbours` (V, k) from
    `latent_neighbours`; lantern_delta, or lantern_lambda for LANTERN++'s bound (lambda - 1) * p(x)).
    compile: each pass (drafting, verification, commit) through torch.compile on static caches, its random
    numbers drawn before it. Both models run in eval mode on the target's device (their modes are restored
    afterwards); `generator` must live on that device.
    """
    num_tokens = check_num_tokens(model, num_tokens)
    cfg_scale_at(0, num_tokens, cfg_scale, cfg_schedule, cfg_ramp)  # rejects a bad schedule up front
    if gamma < 1:
        raise ValueError(f"gamma={gamma}; expected >= 1 drafts per pass")
    if draft is model:
        raise ValueError("the draft must be another module than the target: each keeps its own KV cache")
    eagle = isinstance(draft, EagleDrafter)
    if eagle:
        draft.bind(model)
    else:
        if draft.num_positions < num_tokens:
            raise ValueError(
                f"the draft generates {draft.num_positions} positions; {num_tokens} were asked for"
            )
        for key in ("vocab_size", "shuffle"):  # the draft must propose tokens of the target's layout
            if draft.config.get(key) != model.config.get(key):
                raise ValueError(
                    f"draft {key}={draft.config.get(key)} != the target's {model.config.get(key)}"
                )
    if acceptance not in ACCEPTANCE_RULES:
        raise ValueError(f"acceptance={acceptance!r}; expected one of {ACCEPTANCE_RULES}")
    device = next(model.parameters()).device
    relax = None
    if acceptance == "lantern":
        if neighbours is None:
            raise ValueError("acceptance='lantern' needs neighbours (V, k): see latent_neighbours")
        if lantern_delta < 0 or (lantern_lambda is not None and lantern_lambda < 1):
            raise ValueError(
                f"lantern_delta={lantern_delta}, lantern_lambda={lantern_lambda}; expected >= 0, >= 1"
            )
        near = neighbours.to(device)

        def relax(p, x):
            return relaxed_target(p, x, near, lantern_delta, lantern_lambda)

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
    max_len = num_tokens + gamma + 1  # windows padded past the last token
    slots = model.head.token_shape[0] if model.head.token_shape else 1  # S: tokens per position
    rows = Rows(labels.shape[0], num_tokens, gamma + 1, device, host_lengths=not compile, slots=slots)
    counters = DecodeCounters(device)
    start = time.perf_counter()
    with GuidedModel(model, labels, **settings, max_len=max_len, static=compile) as target:
        if eagle:
            drafter = EagleDraft(draft, target, max_len, static=compile)
        else:
            drafter = GPTDraft(draft, labels, max_len, settings, static=compile)

        def one_pass(uniforms: torch.Tensor):
            """Draft, verify and commit for every row; uniforms (B, 2 gamma + 1, S): the pass's draws."""
            limit = (num_tokens - 1 - rows.count).clamp(max=gamma)  # drafts each row may test
            drafts, q = drafter.propose(rows, gamma, uniforms[:, :gamma])  # (B, gamma, S), (B, gamma, S, V)
            window = torch.cat([rows.last(), drafts], dim=1)  # (B, gamma + 1, S): positions n-1 .. n+gamma-1
            p, hidden = target.decode(window, rows.count)  # (B, gamma + 1, S, V): positions n .. n + gamma
            first, new, tested = verify(p, q, drafts, limit, uniforms[:, gamma:], relax)
            rows.commit(window, first, new)
            counters.add(first, tested)
            return hidden, first

        step = compile_step(one_pass, device) if compile else one_pass
        with drafter:
            probs, hidden = target.prefill()
            rows.start(sample_probs(probs[:, 0], generator))
            drafter.start(rows, hidden)
            model_batch = target.labels.shape[0]
            rows.advance(target.passes)
            while rows.running:
                uniforms = torch.rand(rows.running, 2 * gamma + 1, slots, device=device, generator=generator)
                hidden, first = step(uniforms)
                target.passes += 1
                drafter.passes += gamma
                keep = rows.advance(target.passes)  # the pass's one host synchronisation
                if not rows.running:
                    break
                if keep is not None:
                    hidden, first = hidden[target.stacked_rows(keep)], first[keep]
                    drafter.select(keep)  # first: the EAGLE drafter indexes its rows as the target's
                    target.select(keep)
                target.truncate(rows.lengths())
                drafter.accept(rows, hidden, first)
            stats = decode_stats(target, rows, counters, start, model_batch)
        stats["draft_forward_passes"] = drafter.passes
    tokens = model.image_tokens(target.model_tokens(rows.tokens_out))  # the tokenizer's layout
    return SampleResult(tokens=tokens, labels=labels, stats=stats)
