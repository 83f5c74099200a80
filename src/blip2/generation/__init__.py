"""Decoding: the generation config and the search loops (greedy, beam, sampling)."""

from .decode import GenerationConfig

__all__ = ["GenerationConfig"]
