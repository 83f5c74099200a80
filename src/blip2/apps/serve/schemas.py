"""What each endpoint accepts. Every model forbids unknown fields and bounds every number, so a bad
request is refused before it reaches the model; app.py turns a ValidationError into OpenAI's
400 error shape, naming the field."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_TOKENS = 4096  # and the model's own positions, checked once the prompt is known
MAX_N = 16
MAX_ITEMS = 64  # images, questions or texts in one request


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class ImageURL(Strict):
    url: str = Field(max_length=64 * 1024 * 1024)
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(Strict):
    type: Literal["text"]
    text: str = Field(max_length=100_000)


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part]
    name: str | None = None


class StreamOptions(Strict):
    include_usage: bool = False


class Generation(Strict):
    """Sampling fields shared by chat and caption."""
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)


class ChatRequest(Generation):
    model: str | None = None
    messages: list[Message] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    min_tokens: int = Field(0, ge=0, le=MAX_TOKENS)  # vLLM's extension: no EOS before this many tokens
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    timeout: float | None = Field(None, gt=0)  # extension: seconds this request may take (at most --request-timeout)
    user: str | None = None

    def stops(self) -> list[str]:
        s = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [x for x in s if x]


class CaptionRequest(Generation):
    model: str | None = None
    images: list[str] = Field(min_length=1, max_length=MAX_ITEMS)
    prompt: str | None = Field(None, max_length=10_000)
    num_beams: int | None = Field(None, ge=1, le=8)
    n: int = Field(1, ge=1, le=8)


class AskRequest(Generation):
    model: str | None = None
    image: str
    questions: list[str] = Field(min_length=1, max_length=MAX_ITEMS)
    template: str = Field("Question: {} Answer:", max_length=1000)
    num_beams: int | None = Field(None, ge=1, le=8)


class MatchRequest(Strict):
    model: str | None = None
    images: list[str] = Field(min_length=1, max_length=MAX_ITEMS)
    texts: list[str] = Field(min_length=1, max_length=MAX_ITEMS)


class EmbeddingImage(Strict):
    type: Literal["image_url"]
    image_url: ImageURL


EmbeddingItem = Union[str, EmbeddingImage]


class EmbeddingRequest(Strict):
    model: str | None = None
    input: str | list[EmbeddingItem] = Field(min_length=1, max_length=MAX_ITEMS)
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


MAX_K = 100  # hits per search
MAX_RERANK = 200  # ITM re-ranking encodes each candidate image again, on the model thread


class SearchRequest(Strict):
    """A text (`query`) or an image (`image`, a data: URL) to search the index with; one of them
    (app.py checks, naming both fields)."""
    model: str | None = None
    query: str | None = Field(None, min_length=1, max_length=10_000)
    image: str | None = Field(None, max_length=64 * 1024 * 1024)
    k: int = Field(10, ge=1, le=MAX_K)
    rerank: int = Field(50, ge=0, le=MAX_RERANK)  # as `blip2 search --rerank`; 0: ITC only; text queries only
