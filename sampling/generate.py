"""Images from class labels in one call: sample tokens with any sampler, decode them with the tokenizer.

    from core import from_pretrained
    from sampling import generate

    generator = from_pretrained("runs/gpt_quickstart/export")
    tokenizer = from_pretrained("runs/titok_quickstart/export")
    result = generate(generator, tokenizer, labels=[0, 1, 2], cfg_scale=2.0, seed=0)
    result.images       # float (B, 3, H, W) in [-1, 1]
    result.pil()        # a list of PIL images
    result.stats        # forward passes, tokens per pass, wall time

`sampler` names one of sampling.registry.SAMPLERS ("ar", "speculative", "lantern", "sjd", "gsd", ...); other
keyword arguments are that sampler's settings (configs/sampler/<name>.yaml lists them). A sampler that
needs a drafter takes `draft=` (a loaded GPT or EAGLE drafter), LANTERN and GSD take `neighbours=`
(`sampling.tokenizer_neighbours`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core import Tokens

from .registry import get_sampler


@dataclass
class Generated:
    images: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    tokens: Tokens
    labels: torch.Tensor  # (B,)
    stats: dict

    def pil(self) -> list:
        """The images as PIL images (uint8 RGB)."""
        from PIL import Image

        pixels = self.images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
        return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]


@torch.no_grad()
def generate(
    generator,
    tokenizer,
    labels,
    sampler: str = "ar",
    seed: int | None = 0,
    num_tokens: int | None = None,
    **settings,
) -> Generated:
    """labels (a list or a (B,) tensor of class ids) -> Generated images (module docstring)."""
    device = next(generator.parameters()).device
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    seeded = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    sample = get_sampler(sampler)
    result = sample(generator, labels=labels, num_tokens=num_tokens, generator=seeded, **settings)
    tokens = Tokens(generator.config.get("token_kind", "categorical"), result.tokens)
    images = tokenizer.decode(tokens.to(next(tokenizer.parameters()).device), num_tokens=num_tokens)
    return Generated(images, tokens, result.labels, result.stats)
