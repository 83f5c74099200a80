"""`blip2 finetune --model demo|DIR --data DATA -o OUT_DIR`: fine-tune a captioning checkpoint on
one's own images (train/finetune.py does the work).

DATA is a folder of images with a .txt caption beside each, or a .jsonl / .csv file of image paths
with a caption (`text`) or a `question` and `answer` each. OUT_DIR gets the fine-tuned model (load
it with `blip2 caption --model OUT_DIR`, or transformers), finetune.json and checkpoint-N/
directories; running the same command again resumes from the newest of them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import UsageError, check_template, model_dir, pick_device


def add_parser(sub, at_least, in_range) -> list[str]:
    p = sub.add_parser("finetune", help="fine-tune a captioning model on your images (captions or QA)",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--model", required=True, help="checkpoint directory, hub id, or 'demo' (the shipped demo model)")
    p.add_argument("--data", required=True, help="folder of images + .txt captions, or a .jsonl / .csv file")
    p.add_argument("--output", "-o", required=True, metavar="OUT_DIR", help="where the fine-tuned model goes")
    p.add_argument("--train", default="qformer", choices=["qformer", "lora", "lm", "vision"],
                   help="what trains: qformer (queries, Q-Former, projection; default), lora (also LoRA adapters "
                        "and token embeddings of the language model), lm (also the whole language model), "
                        "vision (also the image encoder's last block and final norm)")
    p.add_argument("--stage", default="caption", choices=["caption", "stage2"],
                   help="the trainer's stage (the same loss and frozen parts; recorded with the run)")
    p.add_argument("--steps", type=at_least(1), default=None, help="optimizer steps (default: from the data size)")
    p.add_argument("--batch-size", type=at_least(1), default=None, help="examples per step (default: from the data size)")
    p.add_argument("--lr", type=in_range(0), default=None, help="peak learning rate (default: by --train)")
    p.add_argument("--warmup", type=at_least(0), default=None, help="linear warmup steps (default: a tenth, at most 100)")
    p.add_argument("--eval-split", type=in_range(-1e-9, 0.9), default=0.1,
                   help="share of the images held out for the evaluation at the end (0: none; default 0.1)")
    p.add_argument("--prompt", default="", help="text the captions continue, as `blip2 caption --prompt` will use it")
    p.add_argument("--template", default="Question: {} Answer:", help="prompt of question/answer examples")
    p.add_argument("--max-length", type=at_least(2), default=40, help="text tokens per example (prompt + target)")
    p.add_argument("--save-every", type=at_least(1), default=None, help="steps between checkpoints (default: a quarter)")
    p.add_argument("--lora-rank", type=at_least(1), default=8)
    p.add_argument("--lora-alpha", type=in_range(0), default=16.0)
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,out_proj,fc1,fc2",
                   help="comma-separated names of the language model's linear layers that get adapters")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--restart", action="store_true", help="ignore OUT_DIR's checkpoints and start over")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: CUDA if present)")
    return ["finetune"]


def _data(path: str):
    from ...train.data import DataError, load_data

    p = Path(path)
    if not p.exists():
        raise UsageError(f"--data {path}: no such file or directory")
    if p.is_file() and p.suffix.lower() not in (".jsonl", ".json", ".csv"):
        raise UsageError(f"--data {path}: give a folder of images + .txt captions, or a .jsonl or .csv file")
    try:
        data = load_data(p, skip_bad=True)
    except DataError as e:
        raise UsageError(str(e)) from None
    if not data:
        raise UsageError(f"--data {path}: no usable examples" + (" (every image was unreadable)" if data.skipped else ""))
    return data


def run(args: argparse.Namespace) -> int:
    from ...train.finetune import finetune

    check_template(args.template)
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {out}: exists and is not a directory")
    d = model_dir(args.model)
    device = pick_device(args.device)
    data = _data(args.data)
    for line in data.skipped_lines:
        print(f"blip2: skipped {line}", file=sys.stderr)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--output {out}: {e.strerror or e}") from None
    try:
        summary = finetune(d, data, out, stage=args.stage, train_mode=args.train, steps=args.steps,
                           batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, eval_split=args.eval_split,
                           seed=args.seed, prompt=args.prompt, qa_prompt=args.template.replace("{}", "{q}", 1),
                           max_length=args.max_length, save_every=args.save_every, lora_rank=args.lora_rank,
                           lora_alpha=args.lora_alpha, lora_targets=tuple(t.strip() for t in args.lora_targets.split(",")),
                           device=str(device), restart=args.restart)
    except (ValueError, TypeError, KeyError, RuntimeError, ArithmeticError) as e:  # data, checkpoint or options
        raise UsageError(f"cannot fine-tune {d} on {args.data}: {' '.join(str(e).split())}") from None
    print(json.dumps({k: summary[k] for k in ("steps", "train_examples", "held_out_examples", "held_out_before",
                                              "held_out_after", "seconds")}))
    return 1 if data.skipped else 0
