"""blip2: a fast, exact, PyTorch-native BLIP-2."""

from .models.config import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig, T5Config
from .generation import GenerationConfig
from .processing.image import BlipImageProcessor, ImageLoadError, load_image
from .models.blip2 import Blip2ForConditionalGeneration, Blip2Model
from .processing.processor import AutoProcessor, Blip2Processor
from .models.qformer import Blip2QFormerModel
from .models.retrieval import Blip2ForImageTextRetrieval, Blip2TextModelWithProjection, Blip2VisionModelWithProjection
from .processing.encoding import BatchEncoding
from .processing.tokenization import AutoTokenizer, Blip2Tokenizer
from .models.vision import Blip2VisionModel
from .checkpoint.pretrained import CheckpointError, PreTrainedModel
from .backends import cpu as _cpu_backend  # noqa: F401  (registers its load hooks: CPU speed on from_pretrained)

__version__ = "0.1.0"


def __getattr__(name: str):
    # blip2.demo_checkpoint without importing the trainer on `import blip2` (and without the
    # double import `python -m blip2.demo` would otherwise warn about)
    if name == "demo_checkpoint":
        from .apps.demo.recipe import demo_checkpoint

        return demo_checkpoint
    raise AttributeError(f"module 'blip2' has no attribute {name!r}")
