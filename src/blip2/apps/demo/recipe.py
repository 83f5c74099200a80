"""The demo model: a small BLIP-2 trained here, from scratch, on the shapes world of scenes.py.

    python -m blip2.demo build      # everything from scratch into src/blip2/apps/assets/demo (2 CPU cores: see README)
    python -m blip2.demo eval       # the quality figures on 200 held-out scenes (and issue 20's targets met)
    python -m blip2.demo teach -o runs/star -- --train lm --steps 6000 --lr 3e-4   # teach it an object it never saw (teach.py)

    blip2.demo_checkpoint("captioning")   # -> the shipped Blip2ForConditionalGeneration directory
    blip2.demo_checkpoint("retrieval")    # -> the shipped Blip2ForImageTextRetrieval directory

The recipe follows the paper's order, with every part small and trained honestly here:
 1. data        TRAIN scenes (a share in scenes.TRAIN_STYLE's looks) rendered at 224 px and preprocessed
                in memory, their captions and QA pairs, and phrasings of them for stage 1 (phrasing.py)
 2. tokenizers  a byte-level BPE for OPT trained on the caption/QA text; a WordPiece vocabulary for the
                Q-Former (BERT-style, lower case, with [DEC] last for ITG) (text.py)
 3. vision      an EVA-style Blip2VisionModel pre-trained with supervision from the scene description:
                each patch predicts which object covers it (soft labels over background + 24 kinds),
                the class token predicts the counts (per shape, colour and size). Then frozen.
                (pretraining.py; Recipe.vision_from reuses a pre-trained one instead)
 4. language    an OPTForCausalLM pre-trained text-only on the caption and QA text. Then frozen.
 5. stage 1     Blip2QFormerForPretraining on captions and phrasings with train(stage="stage1"): ITC +
                ITM + ITG, every pair whose text holds of the image a match (phrasing.Matcher)
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
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from tqdm import tqdm

from ...checkpoint.pretrained import checkpoint_files
from ...models.blip2 import Blip2ForConditionalGeneration
from ...models.config import Blip2Config, Blip2VisionConfig
from ...models.vision import Blip2VisionModel
from ...models.pretrain import Blip2QFormerForPretraining
from ...processing.image import BlipImageProcessor
from ...processing.processor import Blip2Processor
from ...train.data import Example
from ...train.trainer import TrainConfig, train
from . import scenes
from .evaluation import TARGETS, evaluate, generate_captions, parse_caption, quantization_quality, targets_met
from .phrasing import Matcher, describe, training_texts
from .pretraining import KINDS, lm_reads_context, patch_targets, pretrain_lm, pretrain_vision, vision_probe
from .shipped import DEMO_DIR, HELDOUT_SEED, NAMES, QA_PROMPT, demo_checkpoint, example_images
from .text import build_bert_tokenizer, build_opt_tokenizer, corpus, documents

# `blip2.demo` is this module: the names it has always offered
__all__ = ["DEMO_DIR", "HELDOUT_SEED", "KINDS", "NAMES", "QA_PROMPT", "QUICK", "Recipe", "TARGETS", "build",
           "demo_checkpoint", "evaluate", "example_images", "example_scenes", "generate_captions", "main", "parse_caption",
           "patch_targets", "quantization_quality", "targets_met"]


@dataclass
class Recipe:
    seed: int = 0
    n_train: int = 16000  # scenes
    image_size: int = 96
    patch_size: int = 12
    # a checkpoint directory (or "demo": the shipped captioning model) whose image encoder is
    # reused, frozen, instead of phase 3: BLIP-2's own way (a frozen pre-trained ViT); "" trains one
    vision_from: str = ""
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
    s1_steps: int = 2000
    s1_lr: float = 5e-4
    s1_batch: int = 48
    s1_texts: int = 2  # phrasings per training scene besides its caption (phrasing.py, training templates)
    s2_steps: int = 5000
    s2_lr: float = 1e-3
    s2_batch: int = 32
    s2_qa_per_scene: int = 4  # question/answer lines per training scene used in stage 2 (plus its caption)


QUICK = dict(n_train=256, vit_epochs=1, lm_steps=20, s1_steps=10, s1_batch=16, s2_steps=10, s2_batch=16)


def _log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class _Laps:
    """Seconds per phase of the build, logged as each phase ends."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.cpu_last = time.process_time()
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}  # this process's CPU time: what a shared machine's wall time hides

    def __call__(self, name: str) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        self.seconds[name] = round(now - self.last, 1)
        self.cpu_seconds[name] = round(cpu - self.cpu_last, 1)
        self.last, self.cpu_last = now, cpu
        _log(f"{name} done in {self.seconds[name]} s ({self.cpu_seconds[name]} s of CPU)")


def _processors(r: Recipe, work: Path, texts: list[str], s1_texts: list[str]) -> tuple[Blip2Processor, Blip2Processor]:
    ip = BlipImageProcessor(size={"height": r.image_size, "width": r.image_size})
    opt_tok = build_opt_tokenizer(texts, work / "tok-opt", r.bpe_vocab)
    bert_tok = build_bert_tokenizer(texts + s1_texts, work / "tok-bert")
    cap = Blip2Processor(ip, opt_tok, num_query_tokens=r.num_query_tokens)  # adds <image>
    ret = Blip2Processor(ip, bert_tok)
    return cap, ret


class _Rendered:
    """The scenes' images at 224 px, drawn as they are read (a list of 16,000 would take gigabytes)."""

    def __init__(self, scs: list):
        self.scs = scs

    def __len__(self) -> int:
        return len(self.scs)

    def __getitem__(self, i: int):
        return scenes.render(self.scs[i])


def _reused_vision(src: str, vcfg: Blip2VisionConfig) -> Blip2VisionModel:
    """The image encoder (the vision_model.* weights) of the checkpoint in src, frozen; its
    configuration must be the recipe's."""
    d = demo_checkpoint("captioning") if src == "demo" else Path(src)
    have = Blip2Config.from_json_file(d / "config.json").vision_config.to_dict()
    want = vcfg.to_dict()
    diff = {k: (have.get(k), v) for k, v in want.items() if k in RECIPE_VISION_KEYS and have.get(k) != v}
    if diff:
        raise ValueError(f"the image encoder in {d} is not the recipe's: {diff}")
    sd = {}
    for f in checkpoint_files(d)[0]:
        sd.update({k[len("vision_model."):]: v for k, v in load_file(str(f)).items() if k.startswith("vision_model.")})
    vit = Blip2VisionModel(vcfg)
    vit.load_state_dict(sd)
    return vit.eval()


RECIPE_VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "image_size", "patch_size")


def _pixels(ip: BlipImageProcessor, images) -> torch.Tensor:
    """Preprocessed pixels (N, 3, H, W) in fp16 of image paths or PIL images."""
    out = torch.empty(len(images), 3, ip.size["height"], ip.size["width"], dtype=torch.float16)
    for i, im in enumerate(tqdm(images, desc="images", unit="img", file=sys.stderr, leave=False)):
        if isinstance(im, (str, Path)):
            with Image.open(im) as f:
                im = f.convert("RGB")
        out[i] = ip(im, return_tensors="pt")["pixel_values"][0].half()
    return out


def _stage1_data(captions: list, scs: list, k: int, seed: int) -> tuple[list, Matcher]:
    """Stage 1's texts: each scene's caption and k phrasings of the training templates, and the
    Matcher that marks every pair of a batch whose text holds of the image."""
    rng = random.Random(seed)
    data, scene_of, query_of = [], {}, {}
    for ex, s in zip(captions, scs):
        scene_of[ex.image] = s
        for text, q in [describe(s, rng, "grammar")] + training_texts(s, rng, k):
            data.append(Example(ex.image, text, where=ex.where))
            query_of.setdefault(text, q)
    return data, Matcher(scene_of, query_of)


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
          examples: int = 4, eval_scenes: int = 200) -> dict:
    """Train the demo model from scratch and write captioning/ and retrieval/ (and examples/: `examples`
    scenes of each object count) to out_dir.
    Returns the evaluation figures (also written to out_dir/quality.json)."""
    r = recipe or Recipe()
    torch.set_flush_denormal(True)
    lap = _Laps()
    out, work = Path(out_dir), Path(work_dir) if work_dir else Path.cwd() / "demo-work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    # 1. data
    scs = scenes.dataset(r.n_train, seed=r.seed, style=scenes.TRAIN_STYLE)
    texts = corpus(scs)
    # each scene's image is known by a name; its pixels are made here and fill the trainer's cache,
    # so no file is ever written or read
    names = [work / "data" / f"{i:06d}.png" for i in range(r.n_train)]
    captions = [Example(p, scenes.caption(s), where=f"scene {i}") for i, (p, s) in enumerate(zip(names, scs))]
    qa = [Example(p, question=q, answer=a, where=f"scene {i}")
          for i, (p, s) in enumerate(zip(names, scs)) for q, a in scenes.questions(s)]
    s1_data, matcher = _stage1_data(captions, scs, r.s1_texts, r.seed)
    lap("data")
    # 2. tokenizers
    cap_proc, ret_proc = _processors(r, work, texts, [ex.text for ex in s1_data])
    lap("tokenizers")
    # 3. vision
    pixels = _pixels(cap_proc.image_processor, _Rendered(scs))
    vcfg = Blip2VisionConfig(**r.vision, image_size=r.image_size, patch_size=r.patch_size)
    probe = None
    if r.vision_from:
        vit = _reused_vision(r.vision_from, vcfg)
        _log(f"image encoder reused from {r.vision_from}")
    else:
        vit, heads = pretrain_vision(vcfg, scs, pixels, epochs=r.vit_epochs, lr=r.vit_lr, seed=r.seed)
        held = scenes.dataset(200, seed=HELDOUT_SEED + 2)
        probe = vision_probe(vit, heads, held, _pixels(cap_proc.image_processor, _Rendered(held)))
        _log(f"vision probe on held-out scenes: {probe}")
    vit.save_pretrained(work / "vision")  # the frozen image encoder, loadable on its own
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
                      cache_image_embeds=True, weight_decay=0.05, matches=matcher)
    res1 = train(s1, ret_proc, s1_data, tc1, image_cache=cache, embed_cache=embeds)
    lap("stage1")
    # 6. stage 2
    s2_data = _stage2_data(captions, qa, r.s2_qa_per_scene, r.seed)
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
    # 7. ship: each directory written beside its place, then swapped in (others may be reading it)
    s2.eval()
    s2.generation_config.max_new_tokens = 30
    ret = s1.to_retrieval().eval()
    for name, model, proc in (("captioning", s2, cap_proc), ("retrieval", ret, ret_proc)):
        _swap_in(out / name, lambda d, m=model, p=proc: (m.save_pretrained(d), p.save_pretrained(d)))
    _swap_in(out / "examples", lambda d: _write_examples(d, examples))
    lap("ship")
    figures = evaluate(out / "captioning", out / "retrieval", n=eval_scenes)
    figures.pop("captions")
    lap("eval")
    record = dict(figures=figures, seconds=lap.seconds, total_seconds=round(time.perf_counter() - lap.start, 1),
                  cpu_seconds=lap.cpu_seconds, targets=TARGETS, targets_met=targets_met(figures),
                  vision_probe=probe, lm_answers_from_context=round(lm_context, 4), stage1_final_loss=res1.losses[-1],
                  stage2_final_loss=res2.losses[-1], recipe=asdict(r), torch=torch.__version__,
                  threads=torch.get_num_threads())
    (out / "quality.json").write_text(json.dumps(record, indent=2) + "\n")
    _log(f"built in {record['total_seconds']} s: {json.dumps(figures)}")
    return record


def _swap_in(d: Path, write) -> None:
    """write(tmp) into a fresh directory beside d, then put it in d's place by renames."""
    tmp, old = d.with_name(f".{d.name}.new"), d.with_name(f".{d.name}.old")
    for x in (tmp, old):
        if x.exists():
            shutil.rmtree(x)
    tmp.mkdir(parents=True)
    write(tmp)
    if d.exists():
        d.rename(old)
    tmp.rename(d)
    if old.exists():
        shutil.rmtree(old)


def example_scenes(per_count: int = 4) -> list:
    """The shipped examples: the first per_count scenes with one, two and three objects of the
    held-out stream (seed HELDOUT_SEED + 1), in the stream's order; a rule, so none is picked."""
    out, seen, rng = [], {1: 0, 2: 0, 3: 0}, random.Random(HELDOUT_SEED + 1)
    while min(seen.values()) < per_count:
        s = scenes.make_scene(rng)
        if seen[len(s.objects)] < per_count:
            seen[len(s.objects)] += 1
            out.append(s)
    return out


def _write_examples(d: Path, per_count: int) -> None:
    """example_scenes(per_count) as PNGs named after their captions' first words, plus scenes.json
    (each one's caption and questions with their answers)."""
    d.mkdir(parents=True, exist_ok=True)
    truth = {}
    for i, s in enumerate(example_scenes(per_count)):
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
    t = sub.add_parser("teach", help="fine-tune the shipped model on an object it never saw (teach.py)")
    t.add_argument("--output", "-o", required=True, help="folder for the data, the model and teach.json")
    t.add_argument("-n", type=int, default=400, help="scenes with the new object to fine-tune on (default 400)")
    t.add_argument("--model", default="demo", help="the captioning checkpoint to teach (default: the shipped one)")
    t.add_argument("--rehearsal", type=int, default=1200, help="scenes of the known world mixed in (default 1200)")
    t.add_argument("finetune_args", nargs=argparse.REMAINDER, help="after --: more `blip2 finetune` options")
    a = ap.parse_args(argv)
    if a.cmd == "teach":
        from .teach import teach

        extra = a.finetune_args[1:] if a.finetune_args[:1] == ["--"] else a.finetune_args
        rec = teach(Path(a.output), a.n, tuple(extra), a.model, a.rehearsal)
        print(json.dumps({k: v for k, v in rec.items() if k != "finetune"}, indent=2))
        return 0
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
            print(json.dumps(dict(figures=fig, targets_met=targets_met(fig)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
