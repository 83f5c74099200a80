"""Training: stage 1 (Q-Former), stage 2 (generative) and caption fine-tuning."""

from .trainer import (  # noqa: F401
    DataError, Dataset, Example, TrainConfig, TrainResult, latest_checkpoint, lm_batch, load_data, lr_factor,
    read_folder, read_jsonl, stage1_batch, train,
)
