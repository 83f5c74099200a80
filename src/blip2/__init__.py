"""blip2: a fast, exact, PyTorch-native BLIP-2."""

from .config import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig, T5Config
from .generation import GenerationConfig
from .image_processing import BlipImageProcessor, ImageLoadError, load_image
from .model import Blip2ForConditionalGeneration, Blip2Model
from .processing import AutoProcessor, Blip2Processor
from .qformer import Blip2QFormerModel
from .retrieval import Blip2ForImageTextRetrieval, Blip2TextModelWithProjection, Blip2VisionModelWithProjection
from .tokenization import AutoTokenizer, BatchEncoding, Blip2Tokenizer
from .vision import Blip2VisionModel
from .weights import CheckpointError, PreTrainedModel

__version__ = "0.1.0"


def __getattr__(name: str):
    # blip2.demo_checkpoint without importing the trainer on `import blip2` (and without the
    # double import `python -m blip2.demo` would otherwise warn about)
    if name == "demo_checkpoint":
        from .demo import demo_checkpoint

        return demo_checkpoint
    raise AttributeError(f"module 'blip2' has no attribute {name!r}")
