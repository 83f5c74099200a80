"""blip2: a fast, exact, PyTorch-native BLIP-2."""

from .backends import cpu as _cpu_backend  # noqa: F401  (registers its load hooks: CPU speed on from_pretrained)
from .checkpoint.pretrained import CheckpointError, PreTrainedModel
from .generation import GenerationConfig
from .models.blip2 import Blip2ForConditionalGeneration, Blip2Model
from .models.config import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig, T5Config
from .models.qformer import Blip2QFormerModel
from .models.retrieval import Blip2ForImageTextRetrieval, Blip2TextModelWithProjection, Blip2VisionModelWithProjection
from .models.vision import Blip2VisionModel
from .processing.encoding import BatchEncoding
from .processing.image import BlipImageProcessor, ImageLoadError, load_image
from .processing.processor import AutoProcessor, Blip2Processor
from .processing.tokenization import AutoTokenizer, Blip2Tokenizer

__version__ = "0.1.0"


def __getattr__(name: str):
    # blip2.demo_checkpoint: the shipped demo model belongs to the demo application, which
    # `import blip2` does not import; looked up on first use only.
    if name == "demo_checkpoint":
        from .apps.demo.shipped import demo_checkpoint

        return demo_checkpoint
    raise AttributeError(f"module 'blip2' has no attribute {name!r}")
