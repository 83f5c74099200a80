"""Training: stage 1 (Q-Former), stage 2 (generative) and caption fine-tuning.

data.py (examples and their readers), batches.py (images, the frozen encoder's cached output, each
stage's text), trainer.py (config, optimizer, schedule, one step, the loop), state.py (checkpoints
and exact resume), lora.py (LoRA adapters and their merge), finetune.py (what `blip2 finetune` runs)."""

from .batches import image_embeds, lm_batch, stage1_batch
from .data import DataError, Dataset, Example, load_data, read_csv, read_folder, read_jsonl
from .finetune import finetune
from .lora import add_lora, merge_lora
from .state import latest_checkpoint
from .trainer import DataOrder, TrainConfig, TrainResult, cosine_schedule, lr_factor, optimizer_step, train

__all__ = ["DataError", "DataOrder", "Dataset", "Example", "TrainConfig", "TrainResult", "add_lora", "cosine_schedule",
           "finetune", "image_embeds", "latest_checkpoint", "lm_batch", "load_data", "lr_factor", "merge_lora",
           "optimizer_step", "read_csv", "read_folder", "read_jsonl", "stage1_batch", "train"]
