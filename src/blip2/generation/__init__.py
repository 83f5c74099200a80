"""Decoding, as transformers 5.8's `generate` does it, for any language model that offers a
`DecodingSession`:

    config.py   GenerationConfig (generation_config.json) and prepare_generation_config
    logits.py   the logits processors, in the reference's order
    search.py   decode(): greedy, sampling and beam search over a DecodingSession
"""

from .config import GenerationConfig, prepare_generation_config, special_tokens
from .search import DecodingSession, decode

__all__ = ["DecodingSession", "GenerationConfig", "decode", "prepare_generation_config", "special_tokens"]
