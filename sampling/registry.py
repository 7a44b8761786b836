"""Samplers by name, as `sampler.name` selects them, and how a sampler config becomes its inputs.

    SAMPLERS[name]     (generator, labels, ...) -> SampleResult; names: ar, uniform, speculative,
                       lantern, sjd, gsd
    sampler_inputs     a sampler config's drafter and neighbour settings -> the modules they name

A new sampler is one file in sampling/ plus one entry here and a config in configs/sampler/.
"""

from __future__ import annotations

from pathlib import Path

import torch

from core import from_pretrained

from .ar import sample_ar
from .common import SampleResult
from .jacobi import sample_jacobi
from .speculative import sample_speculative, tokenizer_neighbours


def sample_uniform(
    model,
    labels: torch.Tensor,
    num_tokens: int | None = None,
    generator: torch.Generator | None = None,
    **_,
) -> SampleResult:
    """Uniformly random tokens: the floor any trained generator must beat (no model call)."""
    token_dim = model.config.get("token_dim")  # vector tokens: token_dim elements of vocab_size values each
    shape = (len(labels), num_tokens or model.num_tokens, *([token_dim] if token_dim else []))
    tokens = torch.randint(model.config["vocab_size"], shape, generator=generator, device=labels.device)
    return SampleResult(tokens, labels, {"forward_passes": 0, "tokens_per_pass": 0.0, "wall_time": 0.0})


SAMPLERS = {
    "ar": sample_ar,
    "uniform": sample_uniform,
    "speculative": sample_speculative,
    "lantern": sample_speculative,  # the same sampler, acceptance="lantern" (configs/sampler/lantern.yaml)
    "sjd": sample_jacobi,
    "gsd": sample_jacobi,  # the same sampler with grouped=True (configs/sampler/gsd.yaml)
}

DRAFTERS = {  # sampler.drafter -> the exported class it loads, and the experiment that trains one
    "gpt": ("gpt", "python train.py +experiment=gpt_draft_quickstart"),
    "eagle": ("eagle", "python train.py +experiment=eagle_quickstart"),
}


def get_sampler(name: str):
    """sampler.name -> the sampling function, or a one-line error listing the choices."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler.name={name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]


def load_drafter(kind: str, path, generator, device):
    """sampler.drafter / sampler.drafter_path -> the drafter module (checked against the generator)."""
    if kind not in DRAFTERS:
        raise ValueError(f"sampler.drafter={kind!r}; expected one of {sorted(DRAFTERS)}")
    registry_name, make = DRAFTERS[kind]
    if not path or not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(
            f"sampler.drafter_path={path!r} is not an exported {kind} drafter folder (train one: {make})"
        )
    drafter = from_pretrained(path, device=device)
    if drafter.registry_name != registry_name:
        raise ValueError(
            f"sampler.drafter_path={path} holds a {drafter.registry_name!r} model, not a {kind} drafter: "
            f"set sampler.drafter={'gpt' if drafter.registry_name == 'gpt' else 'eagle'}"
        )
    if kind == "eagle":
        drafter.bind(generator)  # its target config must be the generator's
    return drafter


def sampler_inputs(settings: dict, tokenizer_path, tokenizer, generator, device) -> dict:
    """The sampler's keyword arguments from its config: `drafter` / `drafter_path` become `draft` (a GPT or
    an EAGLE drafter), `neighbours_k` / `neighbours_metric` become `neighbours` (latent neighbours of the
    tokenizer's codes, cached beside its export); every other setting passes through."""
    inputs = dict(settings)
    if "drafter_path" in inputs:
        kind, path = inputs.pop("drafter", "gpt"), inputs.pop("drafter_path")
        inputs["draft"] = load_drafter(kind, path, generator, device)
    if "neighbours_k" in inputs:
        k, metric = inputs.pop("neighbours_k"), inputs.pop("neighbours_metric", "euclidean")
        inputs["neighbours"] = tokenizer_neighbours(tokenizer_path, k, metric, tokenizer=tokenizer).to(device)
    return inputs
