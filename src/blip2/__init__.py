"""blip2: a fast, exact, PyTorch-native BLIP-2."""

from .config import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig, T5Config

__version__ = "0.1.0"
