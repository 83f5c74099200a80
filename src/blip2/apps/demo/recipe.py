"""The demo model: a small BLIP-2 trained here, from scratch, on the shapes world of scenes.py.

    python -m blip2.demo build      # everything from scratch into src/blip2/apps/assets/demo (2 CPU cores: see README)
    python -m blip2.demo eval       # the quality figures on 200 held-out scenes

    blip2.demo_checkpoint("captioning")   # -> the shipped Blip2ForConditionalGeneration directory
    blip2.demo_checkpoint("retrieval")    # -> the shipped Blip2ForImageTextRetrieval directory

The recipe follows the paper's order, with every part small and trained honestly here:
 1. data        TRAIN scenes rendered at 224 px, with captions.jsonl and qa.jsonl (scenes.write_jsonl)
 2. tokenizers  a byte-level BPE for OPT trained on the caption/QA text; a WordPiece vocabulary for the
                Q-Former (BERT-style, lower case, with [DEC] last for ITG) (text.py)
 3. vision      an EVA-style Blip2VisionModel pre-trained with supervision from the scene description:
                each patch predicts which object covers it (soft labels over background + 24 kinds),
                the class token predicts the counts. Then frozen. (pretraining.py)
 4. language    an OPTForCausalLM pre-trained text-only on the caption and QA text. Then frozen.
 5. stage 1     Blip2QFormerForPretraining on captions with train(stage="stage1"): ITC + ITM + ITG
 6. stage 2     Blip2ForConditionalGeneration (stage-1 Q-Former, frozen ViT and OPT) with
                train(stage="stage2") on captions and question/answer pairs
 7. ship        captioning/ (stage 2) and retrieval/ (stage 1 as Blip2ForImageTextRetrieval), fp32,
                Hugging Face layout: config.json, model.safetensors, tokenizer and processor files
Then the held-out evaluation (evaluation.py). Every phase trains through the trainer's loop
machinery (blip2.train). Everything is seeded, so a rebuild gives the same weights on the same
machine and torch version.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ...models.blip2 import Blip2ForConditionalGeneration
from ...models.config import Blip2Config, Blip2VisionConfig
from ...models.pretrain import Blip2QFormerForPretraining
from ...processing.image import BlipImageProcessor
from ...processing.processor import Blip2Processor
from ...train.data import read_jsonl
from ...train.trainer import TrainConfig, train
from . import scenes
from .evaluation import evaluate, parse_caption, quantization_quality
from .pretraining import KINDS, lm_reads_context, patch_targets, pretrain_lm, pretrain_vision, vision_probe
from .shipped import DEMO_DIR, HELDOUT_SEED, NAMES, QA_PROMPT, demo_checkpoint, example_images
from .text import build_bert_tokenizer, build_opt_tokenizer, corpus, documents

# `blip2.demo` is this module: the names it has always offered
__all__ = ["DEMO_DIR", "HELDOUT_SEED", "KINDS", "NAMES", "QA_PROMPT", "QUICK", "Recipe", "build", "demo_checkpoint",
           "evaluate", "example_images", "main", "parse_caption", "patch_targets", "quantization_quality"]


@dataclass
class Recipe:
    seed: int = 0
    n_train: int = 16000  # scenes
    image_size: int = 96
    patch_size: int = 12
    vision: dict = field(default_factory=lambda: dict(
        hidden_size=96, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, layer_norm_eps=1e-6))
    qformer: dict = field(default_factory=lambda: dict(
        hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
        cross_attention_frequency=1, max_position_embeddings=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    opt: dict = field(default_factory=lambda: dict(
        hidden_size=128, ffn_dim=512, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=128, dropout=0.0, attention_dropout=0.0))
    num_query_tokens: int = 16
    embed_dim: int = 64  # ITC projection
    bpe_vocab: int = 384
    # step counts and learning rates per phase
    vit_epochs: int = 10
    vit_lr: float = 3e-3
    lm_steps: int = 2000
    lm_doc_lines: int = 6  # lines per text document (one scene: its caption and QA lines, shuffled)
    lm_lr: float = 3e-3
    s1_steps: int = 1600
    s1_lr: float = 5e-4
    s1_batch: int = 48
    s2_steps: int = 4000
    s2_lr: float = 1e-3
    s2_batch: int = 32
    s2_qa_per_scene: int = 3  # question/answer lines per training scene used in stage 2 (plus its caption)


QUICK = dict(n_train=256, vit_epochs=1, lm_steps=20, s1_steps=10, s1_batch=16, s2_steps=10, s2_batch=16)


def _log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class _Laps:
    """Seconds per phase of the build, logged as each phase ends."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self.last, 1)
        self.last = now
        _log(f"{name} done in {self.seconds[name]} s")


def _processors(r: Recipe, work: Path, texts: list[str]) -> tuple[Blip2Processor, Blip2Processor]:
    ip = BlipImageProcessor(size={"height": r.image_size, "width": r.image_size})
    opt_tok = build_opt_tokenizer(texts, work / "tok-opt", r.bpe_vocab)
    bert_tok = build_bert_tokenizer(texts, work / "tok-bert")
    cap = Blip2Processor(ip, opt_tok, num_query_tokens=r.num_query_tokens)  # adds <image>
    ret = Blip2Processor(ip, bert_tok)
    return cap, ret


def _pixels(ip: BlipImageProcessor, images: list) -> torch.Tensor:
    """Preprocessed pixels (N, 3, H, W) in fp16 of image paths or PIL images."""
    out = torch.empty(len(images), 3, ip.size["height"], ip.size["width"], dtype=torch.float16)
    for i, im in enumerate(tqdm(images, desc="images", unit="img", file=sys.stderr, leave=False)):
        if isinstance(im, (str, Path)):
            with Image.open(im) as f:
                im = f.convert("RGB")
        out[i] = ip(im, return_tensors="pt")["pixel_values"][0].half()
    return out


def _stage2_data(captions: list, qa: list, per_scene: int, seed: int) -> list:
    """Every caption, plus per_scene question/answer lines of each scene drawn without replacement."""
    by_image: dict[Path, list] = {}
    for ex in qa:
        by_image.setdefault(ex.image, []).append(ex)
    g = np.random.default_rng(seed)
    data = list(captions)
    for exs in by_image.values():
        data += [exs[i] for i in g.choice(len(exs), size=min(per_scene, len(exs)), replace=False)]
    return data


def build(out_dir: str | Path = DEMO_DIR, work_dir: str | Path | None = None, recipe: Recipe | None = None,
          examples: int = 6, eval_scenes: int = 200) -> dict:
    """Train the demo model from scratch and write captioning/ and retrieval/ (and examples/) to out_dir.
    Returns the evaluation figures (also written to out_dir/quality.json)."""
    r = recipe or Recipe()
    torch.set_flush_denormal(True)
    lap = _Laps()
    out, work = Path(out_dir), Path(work_dir) if work_dir else Path.cwd() / "demo-work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    # 1. data
    cap_path, qa_path = scenes.write_jsonl(work / "data", r.n_train, seed=r.seed)
    scs = scenes.dataset(r.n_train, seed=r.seed)
    texts = corpus(scs)
    lap("data")
    # 2. tokenizers
    cap_proc, ret_proc = _processors(r, work, texts)
    lap("tokenizers")
    # 3. vision
    captions = read_jsonl(cap_path, check_images=False)
    pixels = _pixels(cap_proc.image_processor, [ex.image for ex in captions])
    vcfg = Blip2VisionConfig(**r.vision, image_size=r.image_size, patch_size=r.patch_size)
    vit, heads = pretrain_vision(vcfg, scs, pixels, epochs=r.vit_epochs, lr=r.vit_lr, seed=r.seed)
    vit.save_pretrained(work / "vision")  # the frozen image encoder, loadable on its own
    held = scenes.dataset(200, seed=HELDOUT_SEED + 2)
    probe = vision_probe(vit, heads, held, _pixels(cap_proc.image_processor, [scenes.render(s) for s in held]))
    _log(f"vision probe on held-out scenes: {probe}")
    lap("vision")
    # 4. language
    lm = pretrain_lm(r.opt, cap_proc.tokenizer, documents(scs, r.lm_doc_lines, r.seed), steps=r.lm_steps,
                     lr=r.lm_lr, seed=r.seed + 1)
    lm.save_pretrained(work / "language")
    cap_proc.tokenizer.save_pretrained(work / "language")
    lm_context = lm_reads_context(lm, cap_proc.tokenizer, scenes.dataset(30, seed=HELDOUT_SEED + 2))
    _log(f"language model answers {lm_context:.1%} of held-out questions from a caption in context")
    lap("language")
    # 5. stage 1
    qf = dict(r.qformer, vocab_size=len(ret_proc.tokenizer), encoder_hidden_size=vit.config.hidden_size,
              use_qformer_text_input=True)
    s1cfg = Blip2Config(vision_config=vit.config.to_dict(), qformer_config=qf, num_query_tokens=r.num_query_tokens,
                        image_text_hidden_size=r.embed_dim)
    torch.manual_seed(r.seed + 2)
    s1 = Blip2QFormerForPretraining(s1cfg)
    s1.vision_model.load_state_dict(vit.state_dict())
    # pixels decoded once and the frozen ViT run once per image, both shared by the two stages
    cache = {ex.image: px.float() for ex, px in zip(captions, pixels)}
    embeds: dict = {}
    tc1 = TrainConfig(stage="stage1", lr=r.s1_lr, warmup_steps=50, batch_size=r.s1_batch, max_steps=r.s1_steps,
                      seed=r.seed, output_dir=str(work / "stage1"), log_every=50, cache_images=True,
                      cache_image_embeds=True, weight_decay=0.05)
    res1 = train(s1, ret_proc, captions, tc1, image_cache=cache, embed_cache=embeds)
    lap("stage1")
    # 6. stage 2
    s2_data = _stage2_data(captions, read_jsonl(qa_path, check_images=False), r.s2_qa_per_scene, r.seed)
    s2cfg = Blip2Config(vision_config=vit.config.to_dict(), qformer_config=dict(qf, use_qformer_text_input=False),
                        text_config=lm.config.to_dict(), num_query_tokens=r.num_query_tokens,
                        image_token_index=cap_proc.image_token_id)
    torch.manual_seed(r.seed + 3)
    s2 = Blip2ForConditionalGeneration(s2cfg)
    missing, unexpected = s2.load_state_dict(s1.state_dict(), strict=False)
    assert all(k.startswith(("language_model.", "language_projection.")) for k in missing), missing
    s2.language_model.load_state_dict(lm.state_dict())
    tc2 = TrainConfig(stage="stage2", lr=r.s2_lr, warmup_steps=50, batch_size=r.s2_batch, max_steps=r.s2_steps,
                      seed=r.seed, output_dir=str(work / "stage2"), log_every=50, cache_images=True,
                      cache_image_embeds=True, max_length=40, qa_prompt=QA_PROMPT)
    res2 = train(s2, cap_proc, s2_data, tc2, image_cache=cache, embed_cache=embeds)
    lap("stage2")
    # 7. ship
    out.mkdir(parents=True, exist_ok=True)
    for name in NAMES:
        if (out / name).exists():
            shutil.rmtree(out / name)
    s2.eval()
    s2.generation_config.max_new_tokens = 30
    s2.save_pretrained(out / "captioning")
    cap_proc.save_pretrained(out / "captioning")
    ret = s1.to_retrieval().eval()
    ret.save_pretrained(out / "retrieval")
    ret_proc.save_pretrained(out / "retrieval")
    _write_examples(out / "examples", examples)
    lap("ship")
    figures = evaluate(out / "captioning", out / "retrieval", n=eval_scenes)
    figures.pop("captions")
    lap("eval")
    record = dict(figures=figures, seconds=lap.seconds, total_seconds=round(time.perf_counter() - lap.start, 1),
                  vision_probe=probe, lm_answers_from_context=round(lm_context, 4), stage1_final_loss=res1.losses[-1],
                  stage2_final_loss=res2.losses[-1], recipe=asdict(r), torch=torch.__version__,
                  threads=torch.get_num_threads())
    (out / "quality.json").write_text(json.dumps(record, indent=2) + "\n")
    _log(f"built in {record['total_seconds']} s: {json.dumps(figures)}")
    return record


def _write_examples(d: Path, n: int) -> None:
    """n held-out scenes as PNGs named after their captions' first words, plus captions.json."""
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    truth = {}
    for i, s in enumerate(scenes.dataset(n, seed=HELDOUT_SEED + 1)):
        name = f"{i + 1:02d}-" + "-".join(scenes.caption(s).replace(",", "").split()[:3]) + ".png"
        scenes.render(s).save(d / name)
        truth[name] = dict(caption=scenes.caption(s), questions=dict(scenes.questions(s)))
    (d / "scenes.json").write_text(json.dumps(truth, indent=2) + "\n")


# --- command line -----------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m blip2.demo", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train the demo model from scratch")
    b.add_argument("--output", default=str(DEMO_DIR))
    b.add_argument("--work-dir", default=None, help="data and intermediate checkpoints (default: ./demo-work)")
    b.add_argument("--quick", action="store_true", help="a few steps of everything: checks the pipeline, not the quality")
    b.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    b.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override recipe fields")
    e = sub.add_parser("eval", help="quality figures on held-out scenes")
    e.add_argument("--captioning", default=None)
    e.add_argument("--retrieval", default=None)
    e.add_argument("-n", type=int, default=200)
    e.add_argument("--quantized", action="store_true", help="bf16 vs int8 / int4 language model (shipped model)")
    a = ap.parse_args(argv)
    if a.cmd == "build":
        kw = dict(QUICK) if a.quick else {}
        for kv in a.set:
            k, v = kv.split("=", 1)
            kw[k] = type(getattr(Recipe(), k))(v)
        if a.threads:
            torch.set_num_threads(a.threads)
        rec = build(a.output, a.work_dir, Recipe(**kw))
        print(json.dumps(rec["figures"], indent=2))
    else:
        if a.quantized:
            print(json.dumps(quantization_quality(n=a.n), indent=2))
        else:
            fig = evaluate(a.captioning, a.retrieval, n=a.n)
            fig.pop("captions")
            print(json.dumps(fig, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
