"""Visual tokenizers: one file per method, all behind the interface in base.py."""

from .base import Tokenizer, Tokens, TokenSpec, from_pretrained
from .titok import TiTok

__all__ = ["Tokenizer", "Tokens", "TokenSpec", "from_pretrained", "TiTok"]
