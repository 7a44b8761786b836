"""The small core every package builds on, importing none of them: `Tokens` and `TokenSpec` (what
tokenizers produce and generators model) and the model registry and export (config.json +
model.safetensors, Hub-ready)."""

from .hub import Exportable, from_pretrained, model_class, read_export, register
from .tokens import TOKEN_KINDS, Tokens, TokenSpec

__all__ = [
    "TOKEN_KINDS",
    "Exportable",
    "TokenSpec",
    "Tokens",
    "from_pretrained",
    "model_class",
    "read_export",
    "register",
]
