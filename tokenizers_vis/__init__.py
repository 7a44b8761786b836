"""Visual tokenizers: one file per method, all behind the interface in base.py."""

from . import binary, fq, perturb, teachers, tokenbridge  # noqa: F401  (registers their classes)
from .adaptive import decode_lengths, shortest_prefix
from .base import Exportable, Tokenizer, Tokens, TokenSpec, from_pretrained, register
from .flextok import FlexTok
from .onedpiece import OneDPiece
from .titok import TiTok
from .vqgan import VQGAN

__all__ = [
    "Exportable",
    "FlexTok",
    "OneDPiece",
    "TiTok",
    "VQGAN",
    "Tokenizer",
    "Tokens",
    "TokenSpec",
    "from_pretrained",
    "register",
    "decode_lengths",
    "shortest_prefix",
]
