"""Plain autoregressive sampling: one new token per row per forward pass (LlamaGen's sampler).

Per step: logits of the next position; with guidance (cfg_scale != 1) a doubled batch [conditional; null
class] goes through the model as one call and the two halves combine as uncond + s * (cond - uncond); then
temperature, top-k, top-p and one draw (sampling/common.py's `sample_probs`).

`use_cache=True` prefills the class position and decodes one token per step against the KV cache
(`compile=True`: the decode step through torch.compile, on a static cache);
`use_cache=False` recomputes the whole prefix with the full forward pass every step (the baseline of
scripts/bench_sampling.py). Both issue the same random draws in the same order, so under the same seeded
generator they give the same tokens. Guidance scale 1 skips the doubled batch entirely, so it is exactly
conditional sampling.

The model protocol (generators.GPT; test stubs implement the same): `num_tokens`, `null_class`,
`setup_cache(batch_size, max_len)`, `prefill(labels) -> (B, 1, D)`, `decode(tokens (B, k)) -> (B, k, D)`,
`clear_cache()`, `forward_prefix(tokens (B, T), labels) -> (B, 1 + T, D)`, and `head` (generators/heads.py):
`head.token_shape` and `head.sample_stacked(hidden, guided, cfg_scale, temperature, top_k, top_p, generator)`,
which draws one position's token for every kind of token (a categorical code, bits, sub-codes, channel bins,
a Token-Shuffle window of s^2 codes) from the backbone's stacked [conditional; unconditional] hidden states;
`num_positions` (the sequence length: N, or N / s^2 windows with Token-Shuffle) and
`image_tokens(sequence)`, which returns the sampled sequence in the tokenizer's layout.
"""

from __future__ import annotations

import time

import torch

from .common import SampleResult, cfg_scale_at, compile_step, filter_logits, guided_logits, sample_probs
from .engine import check_num_tokens


@torch.no_grad()
def sample_ar(
    model,
    labels: torch.Tensor,
    num_tokens: int | None = None,
    cfg_scale: float = 1.0,
    cfg_schedule: str = "constant",
    cfg_ramp: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    compile: bool = False,
) -> SampleResult:
    """labels (B,) -> SampleResult with tokens (B, num_tokens[, token_dim]) in the tokenizer's layout;
    num_tokens defaults to N.

    compile: run each cached step (decode, head, guidance, filtering, the draw from a uniform drawn before
    it) through torch.compile (`compile_step`: a static cache with fixed shapes; CUDA graphs on GPUs);
    heads other than the categorical one compile the decode and draw eagerly. The model runs in eval mode
    on its own device (its previous mode is restored afterwards); `generator` must live on that device.
    """
    if compile and not use_cache:
        raise ValueError("compile=True compiles the cached decode step: it needs use_cache=True")
    num_tokens = check_num_tokens(model, num_tokens)  # positions: tokens, or windows with Token-Shuffle
    cfg_scale_at(0, num_tokens, cfg_scale, cfg_schedule, cfg_ramp)  # rejects a bad schedule up front
    device = next(model.parameters()).device
    labels = labels.to(device)
    guided = cfg_scale != 1.0
    rows = torch.cat([labels, torch.full_like(labels, model.null_class)]) if guided else labels  # (B or 2B,)

    def doubled(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x]) if guided else x

    shape = (labels.shape[0], num_tokens, *model.head.token_shape)
    tokens = torch.zeros(shape, dtype=torch.long, device=device)  # (B, positions, *token_shape)
    passes = 0
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        decode, fused = model.decode, None
        if use_cache:
            static = {"static": True} if compile else {}  # fixed shapes for the compiled step
            model.setup_cache(rows.shape[0], max_len=num_tokens, **static)  # class + tok0 .. tok(N-2)
            hidden = model.prefill(rows)[:, -1]  # (B or 2B, D)
            passes += 1
            if compile and model.head.kind == "categorical":
                fused = fused_step(model, guided, temperature, top_k, top_p, device)
            elif compile:  # other heads draw with the generator: only the decode is compiled
                decode = compile_step(model.decode, device)
        for step in range(num_tokens):
            if not use_cache:
                hidden = model.forward_prefix(doubled(tokens[:, :step]), rows)[:, -1]
                passes += 1
            if fused is None or step == 0:
                scale = cfg_scale_at(step, num_tokens, cfg_scale, cfg_schedule, cfg_ramp)
                tokens[:, step] = model.head.sample_stacked(
                    hidden, guided, scale, temperature, top_k, top_p, generator
                )  # the head runs once over [conditional; unconditional]
            if use_cache and step + 1 < num_tokens:
                passes += 1
                previous = doubled(tokens[:, step : step + 1])
                if fused is None:
                    hidden = decode(previous)[:, -1]
                    continue
                scale = torch.tensor(
                    cfg_scale_at(step + 1, num_tokens, cfg_scale, cfg_schedule, cfg_ramp), device=device
                )
                uniform = torch.rand(
                    labels.shape[0], *model.head.token_shape, device=device, generator=generator
                )
                tokens[:, step + 1] = fused(previous, scale, uniform)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        if use_cache:
            model.clear_cache()
        model.train(was_training)
    stats = {
        "forward_passes": passes,
        "passes_per_row": passes,  # every row takes part in every pass
        "tokens_per_pass": num_tokens / passes,
        "wall_time": time.perf_counter() - start,
        "model_batch": rows.shape[0],  # rows per forward pass: 2B with guidance
    }
    return SampleResult(tokens=model.image_tokens(tokens), labels=labels, stats=stats)


def fused_step(model, guided: bool, temperature: float, top_k: int, top_p: float, device):
    """A categorical GPT's whole decode step, compiled: (previous token (B*, 1[, S]), guidance scale (0-d
    tensor), uniform (B[, S])) -> the next token (B[, S]): decode, head, guidance, filtering and the draw
    in one graph (the uniform is drawn outside, so the graph needs no generator)."""

    def step(previous, scale, uniform):
        logits = model.head(model.decode(previous)[:, -1]).float()  # (B or 2B[, S], V)
        if guided:
            logits = guided_logits(*logits.chunk(2), scale)
        return sample_probs(filter_logits(logits, temperature, top_k, top_p).softmax(-1), uniform=uniform)

    return compile_step(step, device)
