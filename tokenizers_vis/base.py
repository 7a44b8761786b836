"""The contract every tokenizer keeps: a `Tokens` payload, a `TokenSpec`, and save/load without Hydra.

A tokenizer is an `nn.Module` with

    token_spec                         what a generator must model (kind, N, grid, vocabulary sizes)
    encode(images) -> Tokens           images: float (B, 3, H, W) in [-1, 1]
    decode(tokens, num_tokens=None)    -> images (B, 3, H, W)
    forward(images) -> (reconstructions, losses dict, stats dict)
    code_vectors()                     the latent vector behind each discrete code (V, D)

Exported models (tokenizers and generators alike, through `Exportable`) are a folder holding
`config.json` (the class name plus its constructor arguments) and `model.safetensors`;
`from_pretrained(folder)` rebuilds the module from those two files alone, with a strict key check and
without unpickling anything (diffusers' convention).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

TOKEN_KINDS = ("categorical", "factorized", "binary", "dimwise", "continuous")


@dataclass
class TokenSpec:
    """What a generator needs to know about a tokenizer's tokens."""

    kind: str  # one of TOKEN_KINDS
    num_tokens: int  # N, positions per image
    grid: tuple[int, int] | None = None  # (h, w) for 2D tokens, None for 1D sequences
    vocab_size: int | None = None  # values per token element: V codes (categorical, factorized), 2 (binary)
    code_dim: int | None = None  # dimension of the latent vector behind each code
    token_dim: int | None = None  # elements per token: None for one code, K bits, G sub-codes, C channels

    def __post_init__(self):
        if self.kind not in TOKEN_KINDS:
            raise ValueError(f"TokenSpec.kind={self.kind!r}; expected one of {TOKEN_KINDS}")

    @property
    def bits_per_token(self) -> float:
        """Bits of a fixed-length code for one position: token_dim elements of log2(vocab_size) bits each."""
        return (self.token_dim or 1) * math.log2(self.vocab_size)


@dataclass
class Tokens:
    """A batch of tokens: `data` holds codes (B, N) for categorical tokens and (B, N, token_dim) integers for
    binary, factorized and dimwise tokens (DESIGN.md's "Tokens" table)."""

    kind: str
    data: torch.Tensor
    lengths: torch.Tensor | None = None  # (B,) valid prefix lengths of variable-length sequences
    grid: tuple[int, int] | None = None

    def to(self, device) -> Tokens:
        lengths = None if self.lengths is None else self.lengths.to(device)
        return Tokens(self.kind, self.data.to(device), lengths, self.grid)

    def __len__(self) -> int:
        return self.data.shape[0]


_REGISTRY: dict[str, type] = {}


def register(name: str):
    """Class decorator: make a model (tokenizer or generator) loadable by `from_pretrained` under `name`."""

    def wrap(cls):
        cls.registry_name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


class Exportable:
    """Save/load as a folder of config.json + model.safetensors (diffusers' convention), without Hydra.

    Subclasses are nn.Modules that keep their constructor arguments in `self.config` (JSON-serialisable)
    and are registered with `@register(name)`.
    """

    registry_name: str = ""
    config: dict

    def export_metadata(self) -> dict:
        """Extra, informative entries for config.json (ignored when loading)."""
        return {}

    def save_pretrained(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"class": self.registry_name, "config": self.config, **self.export_metadata()}
        (folder / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"))
        return folder


class Tokenizer(Exportable, nn.Module):
    """Base class of every tokenizer (see the module docstring for the interface)."""

    @property
    def token_spec(self) -> TokenSpec:
        raise NotImplementedError

    def encode(self, images: torch.Tensor) -> Tokens:
        raise NotImplementedError

    def decode(self, tokens: Tokens, num_tokens: int | None = None) -> torch.Tensor:
        raise NotImplementedError

    def code_vectors(self) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no discrete codes")

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images))

    def export_metadata(self) -> dict:
        return {"token_spec": asdict(self.token_spec)}


def from_pretrained(folder: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild an exported model from `folder/config.json` + `folder/model.safetensors` (strict keys)."""
    folder = Path(folder)
    config_file, weights_file = folder / "config.json", folder / "model.safetensors"
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"not an exported model: {f} is missing")
    # Importing the packages registers every model class.
    import generators  # noqa: F401
    import tokenizers_vis  # noqa: F401

    meta = json.loads(config_file.read_text())
    if meta.get("class") not in _REGISTRY:
        known = sorted(_REGISTRY)
        raise ValueError(f"{config_file}: unknown model class {meta.get('class')!r}; known: {known}")
    model = _REGISTRY[meta["class"]](**meta["config"])
    model.load_state_dict(load_file(str(weights_file), device=str(device)), strict=True)
    return model.to(device).eval()
