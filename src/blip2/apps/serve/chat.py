"""An OpenAI conversation as one BLIP-2 prompt.

BLIP-2 has no chat template. Its papers and demos ask a question as "Question: {} Answer:" and
keep a conversation by writing the earlier turns in front, in the same shape:

    [system text] Question: <user 1> Answer: <assistant 1> Question: <user 2> Answer:

(one space between the parts; Flan-T5 checkpoints get the same text as their encoder input).
A user turn with no text asks for a caption: the prompt is then the text before it (for a
first turn with no text at all, no prompt: the model captions the image from BOS, as `blip2
caption` does). The conversation carries exactly one image (the model sees one), which must be
in a user turn; the prompt is that image's query placeholders followed by the text's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...models.prompt import image_prompt

QUESTION = "Question: {} Answer:"


class ChatError(ValueError):
    """The conversation cannot be rendered (no image, two images, an assistant turn last...): 400."""


@dataclass
class Rendered:
    text: str  # the prompt's text ("" when captioning)
    image_url: str  # the one image's URL (data: or http(s))


def render(messages: list[dict]) -> Rendered:
    """messages: [{"role": ..., "content": str | [parts]}] as validated by schemas.py. Consecutive
    user messages make one turn (an image in one, the question in the next)."""
    images: list[str] = []
    system: list[str] = []
    turns: list[list] = []  # [question, answer or None]
    for i, m in enumerate(messages):
        texts, imgs = _parts(m["content"])
        if imgs and m["role"] != "user":
            raise ChatError(f"messages[{i}]: images go in user messages, not in a {m['role']} message")
        images += imgs
        text = " ".join(t.strip() for t in texts if t.strip())
        if m["role"] in ("system", "developer"):
            if turns:
                raise ChatError(f"messages[{i}]: a {m['role']} message must come before the conversation")
            system.append(text)
        elif m["role"] == "user":
            if turns and turns[-1][1] is None:
                turns[-1][0] = f"{turns[-1][0]} {text}".strip()
            else:
                turns.append([text, None])
        else:  # assistant
            if not turns or turns[-1][1] is not None:
                raise ChatError(f"messages[{i}]: an assistant message must answer a user message")
            turns[-1][1] = text
    if not turns or turns[-1][1] is not None:
        raise ChatError("the last message must be a user message (the one to answer)")
    if len(images) != 1:
        raise ChatError("the conversation must hold exactly one image (an image_url part in a user message); "
                        f"it holds {len(images)}")
    parts = [*system]
    for q, a in turns:
        parts.append(QUESTION.format(q) if q else "")
        parts.append(a or "")
    return Rendered(text=" ".join(p for p in parts if p), image_url=images[0])


def _parts(content) -> tuple[list[str], list[str]]:
    if isinstance(content, str):
        return [content], []
    texts = [p["text"] for p in content if p["type"] == "text"]
    imgs = [p["image_url"]["url"] for p in content if p["type"] == "image_url"]
    return texts, imgs


def prompt_ids(tokenizer, text: str, num_query_tokens: int, image_token_index: int, bos: int | None) -> list[int]:
    """The prompt as ids, as Blip2Processor builds it: Q image placeholders, then the text's tokens
    (BOS first for OPT). An empty text captions: BOS alone, as `generate` starts without a prompt."""
    if text:
        ids = tokenizer(text)["input_ids"]
    else:
        ids = [bos] if bos is not None else tokenizer("")["input_ids"]
    return image_prompt(ids, num_query_tokens, image_token_index)
