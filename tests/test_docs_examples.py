"""The documentation's own examples, run as written except the import line and the checkpoint
path, on a tiny checkpoint (model + processor files written by transformers). Both libraries run
the same code; the texts must agree."""

import json
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import hf_tiny

CORPUS = [
    "two cats laying on a couch", "a photo of a dog", "Question: how many cats are there? Answer: two",
    "a large red circle and a small blue square", "a man riding a horse on the beach",
] * 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    import transformers as hf
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("doc-ckpt")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in json.loads(tk.to_str())["model"]["merges"]]
    tok = hf.GPT2Tokenizer(vocab=tk.get_vocab(), merges=merges, bos_token="</s>", eos_token="</s>",
                           unk_token="</s>", pad_token="<pad>", add_bos_token=True)
    proc = hf.Blip2Processor(image_processor=hf.BlipImageProcessorPil(size={"height": 30, "width": 30}),
                             tokenizer=tok, num_query_tokens=4)
    proc.save_pretrained(str(d))
    V = len(proc.tokenizer)
    cfg = hf_tiny.blip2_config("opt", text_config=dict(
        vocab_size=V, word_embed_proj_dim=32, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    cfg.image_token_index = proc.tokenizer.convert_tokens_to_ids("<image>")
    hf_tiny.save_hf("Blip2ForConditionalGeneration", cfg, d)
    return d


DOC_EXAMPLE = '''
from PIL import Image
from {lib} import Blip2Processor, Blip2ForConditionalGeneration
import torch

device = "cuda" if torch.cuda.is_available() else "cpu"

processor = Blip2Processor.from_pretrained("{path}")
model = Blip2ForConditionalGeneration.from_pretrained("{path}", dtype=torch.float16)
model.to(device)
image = Image.open("{image}")

# Image captioning (without providing a text prompt)
inputs = processor(images=image, return_tensors="pt").to(device, torch.float16)
generated_ids = model.generate(**inputs)
caption = processor.batch_decode(generated_ids, skip_special_tokens=True)[0].strip()

# Visual question answering (prompt = question)
prompt = "Question: how many cats are there? Answer:"
inputs = processor(images=image, text=prompt, return_tensors="pt").to(device=device, dtype=torch.float16)
generated_ids = model.generate(**inputs)
answer = processor.batch_decode(generated_ids, skip_special_tokens=True)[0].strip()
'''


def _run(lib, path, image):
    ns = {}
    exec(textwrap.dedent(DOC_EXAMPLE.format(lib=lib, path=path, image=image)), ns)
    return ns


def test_captioning_and_vqa_examples(ckpt, tmp_path):
    img = tmp_path / "cats.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(img)
    ours = _run("blip2", ckpt, img)
    ref = _run("transformers", ckpt, img)
    assert isinstance(ours["caption"], str) and isinstance(ours["answer"], str)
    assert ours["generated_ids"].tolist() == ref["generated_ids"].tolist()
    assert (ours["caption"], ours["answer"]) == (ref["caption"], ref["answer"])
    assert ours["answer"].startswith("Question: how many cats are there? Answer:")  # the prompt is returned too
