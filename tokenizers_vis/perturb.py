"""Latent perturbation: RobustTok / RobusTok, "Robust Latent Matters: Boosting Image Generation with Sampling
Error Synthesis" (Qiu et al., 2025, arXiv 2503.08354) and "Image Tokenizer Needs Post-Training" (arXiv
2509.12474).

A generator's samples are not an encoder's codes: a token that is slightly off (a near code instead of the
exact one) is the typical sampling error. Training the decoder on such tokens makes the latent space robust
to it. For a fraction beta of the images in a batch, each token is, with probability alpha, replaced by a
code drawn uniformly among its delta nearest codes (euclidean distance between `code_vectors()`; the code
itself is one of the delta, so a draw may return it and the expected share of changed tokens is
alpha * beta * (delta - 1) / delta).

Deliberate choices (docs/METHODS.md, "Latent perturbation, pFID and decoder post-training"):
- Images are picked by an independent Bernoulli(beta) draw each (not exactly round(beta * B) of them), so
  the expected replacement rate is exact at every batch size; tokens by Bernoulli(alpha) each.
- The delta nearest codes always include the code itself (its distance is forced to -1), also when two
  codes share a vector; ties among the others fall to `torch.topk`. Neighbours are computed only for the
  tokens selected for replacement, against the current codebook: a learned VQ codebook moves every step
  (so sampling.speculative's cached `tokenizer_neighbours`, which serve a frozen export, do not fit), and
  an FSQ grid of 64,000 codes never needs a V x V distance matrix. Chunks of `chunk` tokens bound memory.
- Straight-through: a replaced position becomes quantized + sg(code_vectors[new] - quantized), so the
  decoder sees the perturbed code's vector while the gradient flows back exactly as for the quantised
  latent (identity to the encoder output). Unreplaced positions are returned untouched (bit-identical).
- Applied after the quantiser: its commitment/codebook losses see the true codes, only the decoder's
  losses (pixel, perceptual, GAN, flow) see the perturbation. Tokenizers take it as a hook,
  `forward(images, perturb=fn)` with fn(quantized (B, N, D), codes (B, N)) -> quantized (B, N, D), called
  between the quantiser and the decoder; `training/tokenizer_module.py` builds fn (`module.perturb`).
- Schedule ("robustok", docs/METHODS.md): full strength until 20% of training, then alpha and delta decay
  linearly to half their values by 60%, then stay there; delta is rounded to an integer >= 1. "constant"
  keeps full strength throughout. A function of progress = step / max_steps, so a resumed run continues
  exactly.
- pFID (scripts/evaluate.py mode=pfid) perturbs every image (beta = 1) at a fixed alpha and delta with the
  same code (`perturb_codes`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .quantizers import nearest_codes

SCHEDULES = ("robustok", "constant")


def schedule_factor(progress: float, schedule: str = "robustok") -> float:
    """Strength factor at progress = step / max_steps: 1 until 0.2, linear to 0.5 at 0.6, then 0.5."""
    if schedule not in SCHEDULES:
        raise ValueError(f"perturbation schedule={schedule!r}; expected one of {SCHEDULES}")
    if schedule == "constant" or progress <= 0.2:
        return 1.0
    if progress >= 0.6:
        return 0.5
    return 1.0 - 0.5 * (progress - 0.2) / 0.4


@dataclass
class Perturbed:
    codes: torch.Tensor  # (B, N) long, the codes the decoder sees
    replaced: torch.Tensor  # (B, N) bool, where codes differ from the input codes
    alpha: float  # the strengths in force (after the schedule)
    delta: int


class LatentPerturbation:
    """RobustTok's latent perturbation (module docstring). Plain object, no parameters.

    alpha: per-token replacement probability; beta: share of images perturbed; delta: neighbourhood size
    (capped at the codebook size); schedule: "robustok" or "constant".
    """

    def __init__(self, alpha: float, beta: float = 0.1, delta: int = 100, schedule: str = "robustok"):
        if not 0 <= alpha <= 1 or not 0 <= beta <= 1:
            raise ValueError(f"perturbation alpha={alpha}, beta={beta}: both must lie in [0, 1]")
        if int(delta) < 1:
            raise ValueError(f"perturbation delta={delta}: expected an integer >= 1")
        schedule_factor(0.0, schedule)  # validates the name
        self.alpha, self.beta, self.delta, self.schedule = float(alpha), float(beta), int(delta), schedule

    def __repr__(self) -> str:
        return (
            f"LatentPerturbation(alpha={self.alpha}, beta={self.beta}, delta={self.delta}, "
            f"schedule={self.schedule!r})"
        )

    def strength(self, progress: float = 0.0) -> tuple[float, int]:
        """(alpha, delta) at progress = step / max_steps in [0, 1]."""
        factor = schedule_factor(progress, self.schedule)
        return self.alpha * factor, max(1, round(self.delta * factor))

    @torch.no_grad()
    def perturb_codes(
        self,
        codes: torch.Tensor,
        code_vectors: torch.Tensor,
        progress: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Perturbed:
        """codes (B, N) long, code_vectors (V, D) -> Perturbed (codes (B, N), replaced (B, N), alpha, delta).

        Draws come from `generator` (on codes' device) or torch's global RNG."""
        alpha, delta = self.strength(progress)
        batch = codes.shape[0]
        device = codes.device
        images = torch.rand(batch, device=device, generator=generator) < self.beta  # (B,)
        tokens = torch.rand(codes.shape, device=device, generator=generator) < alpha  # (B, N)
        selected = tokens & images.view(batch, *([1] * (codes.dim() - 1)))  # (B, N)
        new = codes.clone()
        picked = codes[selected]  # (S,)
        if picked.numel() and delta > 1:
            size = min(delta, code_vectors.shape[0])  # the neighbourhood, capped at the codebook
            neighbours = nearest_codes(code_vectors, size, picked, dtype=torch.float32)  # (S, size)
            draw = torch.randint(neighbours.shape[1], (picked.numel(),), device=device, generator=generator)
            new[selected] = neighbours.gather(1, draw[:, None]).squeeze(1)
        return Perturbed(new, new != codes, alpha, delta)

    def __call__(
        self,
        quantized: torch.Tensor,
        codes: torch.Tensor,
        code_vectors: torch.Tensor,
        progress: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, Perturbed]:
        """quantized (B, N, D) straight-through latents, codes (B, N), code_vectors (V, D)
        -> (perturbed latents (B, N, D), Perturbed); see the module docstring for the gradient."""
        result = self.perturb_codes(codes, code_vectors, progress, generator)
        vectors = code_vectors.detach().to(quantized.dtype)[result.codes]  # (B, N, D)
        shifted = quantized + (vectors - quantized).detach()  # value: the new code; gradient: as quantized
        return torch.where(result.replaced[..., None], shifted, quantized), result

    def hook(
        self,
        code_vectors: Callable[[], torch.Tensor],
        progress: float = 0.0,
        record: dict | None = None,
        generator: torch.Generator | None = None,
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The `perturb` callable tokenizers take: fn(quantized (B, N, D), codes (B, N)) -> (B, N, D).

        `code_vectors` is called when the hook runs (the codebook of this very step); `record`, if given,
        receives the last call's Perturbed under "perturbed" and the input codes under "codes"."""

        def perturb(quantized: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
            latents, result = self(quantized, codes, code_vectors(), progress, generator)
            if record is not None:
                record.update(perturbed=result, codes=codes)
            return latents

        return perturb


def perturbation_for(tokenizer, settings) -> LatentPerturbation | None:
    """The LatentPerturbation of `module.perturb` ({alpha, beta, delta[, schedule]} or None) for `tokenizer`,
    checked to take the `perturb` hook and to have discrete codes; errors name the setting."""
    if settings is None:
        return None
    name = type(tokenizer).__name__
    if "perturb" not in inspect.signature(tokenizer.forward).parameters:
        raise ValueError(
            f"module.perturb is set, but {name}.forward takes no `perturb` hook (tokenizers_vis/perturb.py)"
        )
    spec = tokenizer.token_spec
    if spec.kind != "categorical":
        raise ValueError(f"module.perturb needs categorical codes; {name} has {spec.kind} tokens")
    unknown = set(settings) - {"alpha", "beta", "delta", "schedule"}
    if unknown:
        raise ValueError(
            f"module.perturb: unknown keys {sorted(unknown)}; expected alpha, beta, delta, schedule"
        )
    return LatentPerturbation(**dict(settings))


def perturbation_logs(record: dict) -> dict[str, torch.Tensor]:
    """A hook's record -> {perturb_rate (measured share of changed tokens), perturb_alpha, perturb_delta}."""
    result: Perturbed = record["perturbed"]
    return {
        "perturb_rate": result.replaced.float().mean(),
        "perturb_alpha": torch.tensor(result.alpha),
        "perturb_delta": torch.tensor(float(result.delta)),
    }
