"""Where the shipped demo model lives, and the fixed seeds and prompt its recipe and evaluation share."""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).parents[1] / "assets" / "demo"
NAMES = ("captioning", "retrieval")
HELDOUT_SEED = 20231  # held-out scenes; training scenes use Recipe.seed
QA_PROMPT = "Question: {q} Answer:"


def demo_checkpoint(name: str = "captioning") -> Path:
    """The directory of a shipped demo checkpoint: "captioning" (Blip2ForConditionalGeneration,
    captions and VQA) or "retrieval" (Blip2ForImageTextRetrieval, ITM/ITC)."""
    if name not in NAMES:
        raise ValueError(f"demo checkpoints are {NAMES}, not {name!r}")
    d = DEMO_DIR / name
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"the demo checkpoint {d} is missing; rebuild it with `python -m blip2.demo build`")
    return d


def example_images() -> list[Path]:
    """The example images shipped with the package (held-out scenes)."""
    return sorted((DEMO_DIR / "examples").glob("*.png"))
