"""Generators over tokenizer tokens: a LlamaGen-style GPT backbone with pluggable heads (heads.py), and an
EAGLE-style drafter on its hidden states (eagle.py)."""

from . import binary_heads, dimwise_head, factorized_head  # noqa: F401  (register their heads)
from .eagle import EagleDrafter
from .gpt import GPT, GPT_SIZES, KVCache
from .heads import CategoricalEmbedding, CategoricalHead, Head, TokenEmbedding, make_embedding, make_head

__all__ = [
    "EagleDrafter",
    "GPT",
    "GPT_SIZES",
    "KVCache",
    "CategoricalEmbedding",
    "CategoricalHead",
    "Head",
    "TokenEmbedding",
    "make_embedding",
    "make_head",
]
