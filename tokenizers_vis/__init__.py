"""Visual tokenizers: one file per method, all behind the interface in base.py."""

from .base import Exportable, Tokenizer, Tokens, TokenSpec, from_pretrained, register
from .titok import TiTok

__all__ = ["Exportable", "Tokenizer", "Tokens", "TokenSpec", "from_pretrained", "register", "TiTok"]
