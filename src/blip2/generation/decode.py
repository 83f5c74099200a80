"""Text generation: greedy, multinomial sampling and beam search over an `LMSession`.

The decoding rules reproduce transformers 5.8.0 `generate` token for token: the same length
bookkeeping, the same logits processors in the same order (in fp32), the same RNG calls when
sampling, and the same vectorized beam search (top 2*num_beams candidates per step, length
penalty applied when a hypothesis is finalised, the same early-stopping heuristic).

The language model is only seen through the `LMSession` protocol, so the loop is the same for a
decoder-only LM (OPT, prompt given as embeddings) and an encoder-decoder one (T5):

    cfg, unused = prepare_generation_config(gen_cfg, model_gen_cfg, prompt_len=T0, ...)
    session = lm.start(..., max_new_tokens=cfg.max_length - T0)   # step() is called < that many times
    out = decode(session, input_ids, cfg)

or in one call `generate(session, input_ids, gen_cfg, model_generation_config=..., **kwargs)`.

`compile=True` (or a torch.compile mode such as "max-autotune") in the generation parameters runs
each decode step as one compiled graph over the session's static KV cache (see OPTSession.compile);
the prefill and the logits processors stay eager. Greedy ids are the same as eager decoding.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

GENERATION_CONFIG_NAME = "generation_config.json"


class LMSession(Protocol):
    """A language model primed with a prompt, holding whatever state it needs to continue it."""

    @property
    def batch_size(self) -> int: ...

    def prefill(self) -> Tensor:
        """(B, V) next-token logits after the prompt (encoder-decoder: after the decoder start token)."""
        ...

    def step(self, tokens: Tensor) -> Tensor:
        """Append `tokens` (B,), one per row; return the (B, V) logits for the token after it."""
        ...

    def reorder(self, index: Tensor) -> None:
        """Rows <- rows[index] (beam reorder; also B -> B*k expansion with a longer index)."""
        ...


# ----------------------------------------------------------------------------------------------
# GenerationConfig
# ----------------------------------------------------------------------------------------------

# Every field the reference's GenerationConfig knows, all defaulting to None: a None means "not
# set", which is what lets generate() tell a user's max_length from the built-in one. The global
# defaults below are filled in only at generate time.
FIELDS = (
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "early_stopping", "max_time",
    "stop_strings", "do_sample", "num_beams", "use_cache", "cache_implementation", "cache_config",
    "temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff",
    "repetition_penalty", "encoder_repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "bad_words_ids", "renormalize_logits", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "sequence_bias", "token_healing", "guidance_scale", "watermarking_config",
    "num_return_sequences", "output_attentions", "output_hidden_states", "output_scores",
    "output_logits", "return_dict_in_generate", "pad_token_id", "bos_token_id", "eos_token_id",
    "encoder_no_repeat_ngram_size", "decoder_start_token_id", "is_assistant", "num_assistant_tokens",
    "num_assistant_tokens_schedule", "assistant_confidence_threshold", "prompt_lookup_num_tokens",
    "max_matching_ngram_size", "assistant_early_exit", "assistant_lookbehind", "target_lookbehind",
    "compile_config", "disable_compile", "continuous_batching_config", "low_memory", "penalty_alpha",
    "dola_layers", "diversity_penalty", "num_beam_groups", "constraints", "force_words_ids",
    "prefill_chunk_size", "_from_model_config", "transformers_version",
    "compile",  # blip2's own: True or a torch.compile mode runs the decode step compiled (never saved)
)

# What an unset field means at generate time (the reference's global defaults).
DEFAULTS: dict[str, Any] = dict(
    max_length=20, min_length=0, do_sample=False, use_cache=True, early_stopping=False, num_beams=1,
    temperature=1.0, top_k=50, top_p=1.0, typical_p=1.0, repetition_penalty=1.0, length_penalty=1.0,
    no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, num_return_sequences=1,
    output_scores=False, return_dict_in_generate=False, remove_invalid_values=False,
    epsilon_cutoff=0.0, eta_cutoff=0.0, encoder_repetition_penalty=1.0, num_assistant_tokens=20,
    num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.4,
    assistant_lookbehind=10, target_lookbehind=10, num_beam_groups=1, diversity_penalty=0.0,
)

_NOT_SERIALIZED = ("_commit_hash", "_original_object_hash")
_METADATA = ("_from_model_config", "_commit_hash", "_original_object_hash", "transformers_version")


class GenerationConfig:
    """Decoding parameters, read from / written to a checkpoint's `generation_config.json`.

    Unknown keys are kept as attributes and written back, so load -> save reproduces the file.
    """

    def __init__(self, **kwargs):
        for k in FIELDS:
            setattr(self, k, kwargs.pop(k, None))
        kwargs.pop("_commit_hash", None)
        if not self._from_model_config:
            for k, v in kwargs.items():  # custom entries ride along
                setattr(self, k, v)
        elif kwargs.get("force_bos_token_to_be_generated", False):  # old BART-style configs
            self.forced_bos_token_id = self.bos_token_id
        self.validate()

    def validate(self) -> None:
        """Raise on parameter combinations the reference rejects outright."""
        if self.early_stopping not in {None, True, False, "never"}:
            raise ValueError(f"`early_stopping` must be a boolean or 'never', but is {self.early_stopping}.")
        if self.max_new_tokens is not None and self.max_new_tokens <= 0:
            raise ValueError(f"`max_new_tokens` must be greater than 0, but is {self.max_new_tokens}.")
        if self.num_return_sequences is not None and self.num_return_sequences > 1:
            if self.num_beams is None or self.num_beams == 1:
                if not self.do_sample:
                    raise ValueError(
                        "Greedy methods (do_sample != True) without beam search do not support "
                        f"`num_return_sequences` different than 1 (got {self.num_return_sequences})."
                    )
            elif self.num_return_sequences > self.num_beams:
                raise ValueError(
                    f"`num_return_sequences` ({self.num_return_sequences}) has to be smaller or equal to "
                    f"`num_beams` ({self.num_beams})."
                )

    def update(self, defaults_only: bool = False, allow_custom_entries: bool = False, **kwargs) -> dict:
        """Set the attributes named in kwargs; return the kwargs that are not attributes (unused).

        defaults_only: only fill attributes that are unset (None). allow_custom_entries: unknown
        keys become attributes instead of being returned.
        """
        used = []
        for k, v in kwargs.items():
            if k in vars(self):
                if not defaults_only or getattr(self, k) is None:
                    setattr(self, k, v)
                    used.append(k)
            elif allow_custom_entries:
                setattr(self, k, v)
                used.append(k)
        self.validate()
        return {k: v for k, v in kwargs.items() if k not in used}

    # --- (de)serialisation ---
    def to_dict(self) -> dict[str, Any]:
        return {k: copy.deepcopy(v) for k, v in vars(self).items() if k not in _NOT_SERIALIZED}

    def to_diff_dict(self) -> dict[str, Any]:
        """Only what differs from a fresh GenerationConfig(): what generation_config.json holds."""
        known = set(FIELDS)
        return {k: v for k, v in self.to_dict().items() if (k not in known or v is not None)}

    def to_json_string(self, use_diff: bool = True) -> str:
        d = self.to_diff_dict() if use_diff else self.to_dict()
        d.pop("compile_config", None)
        d.pop("compile", None)  # a run-time choice, not a property of the checkpoint
        return json.dumps(_str_keys(d), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike, config_file_name: str | None = None) -> None:
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory} is a file; save_pretrained expects a directory")
        os.makedirs(save_directory, exist_ok=True)
        path = Path(save_directory) / (config_file_name or GENERATION_CONFIG_NAME)
        path.write_text(self.to_json_string(use_diff=True), encoding="utf-8")

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs) -> "GenerationConfig":
        return_unused = kwargs.pop("return_unused_kwargs", False)
        cfg = cls(**{**config_dict, **kwargs})
        unused = cfg.update(**kwargs)
        return (cfg, unused) if return_unused else cfg

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, config_file_name: str | None = None,
                        **kwargs) -> "GenerationConfig":
        """Read `generation_config.json` from a checkpoint directory, a file, or a hub id."""
        name = config_file_name or GENERATION_CONFIG_NAME
        p = Path(os.path.expanduser(str(path_or_id)))
        if p.is_file():
            f = p
        else:
            from ..checkpoint.hub import resolve_dir

            f = resolve_dir(str(path_or_id), [name]) / name
        if not f.exists():
            raise FileNotFoundError(f"no {name} in {f.parent}")
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{f} is not valid JSON ({e})") from e
        if kwargs.pop("_from_model_config", False):
            return cls.from_model_config(d)
        return cls.from_dict(d, **kwargs)

    @classmethod
    def from_model_config(cls, model_config) -> "GenerationConfig":
        """The generation defaults a model config implies (special tokens, and any generation keys
        set on the text/decoder sub-config), as the reference builds `model.generation_config`."""
        d = model_config if isinstance(model_config, dict) else model_config.to_dict()
        d = {k: v for k, v in d.items() if v is not None and k != "_from_model_config"}
        cfg = cls(**d, _from_model_config=True)
        if isinstance(model_config, dict):
            text = next((model_config[k] for k in ("decoder", "generator", "text_config") if model_config.get(k)),
                        model_config)
        else:
            text = getattr(model_config, "text_config", None) or getattr(model_config, "decoder", None) or model_config
            text = text.to_dict()
        for k in list(vars(cfg)):
            if k in text and getattr(cfg, k) is None:
                setattr(cfg, k, text[k])
        flags = ("output_attentions", "output_hidden_states", "output_scores", "output_logits")
        if not cfg.return_dict_in_generate and any(getattr(cfg, f, False) for f in flags):
            cfg.return_dict_in_generate = True
        return cfg

    def __eq__(self, other) -> bool:
        if not isinstance(other, GenerationConfig):
            return False
        strip = lambda c: {k: v for k, v in c.to_dict().items() if k not in _METADATA}  # noqa: E731
        return strip(self) == strip(other)

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


def _str_keys(o):
    if isinstance(o, dict):
        return {str(k): _str_keys(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_str_keys(v) for v in o]
    return o


# ----------------------------------------------------------------------------------------------
# length bookkeeping
# ----------------------------------------------------------------------------------------------

def prepare_generation_config(
    generation_config: GenerationConfig | None = None,
    model_generation_config: GenerationConfig | None = None,
    *,
    prompt_len: int,
    inputs_embeds_len: int | None = None,
    max_position_embeddings: int | None = None,
    **kwargs,
) -> tuple[GenerationConfig, dict]:
    """Merge the parameters as the reference does and resolve the lengths.

    Priority: kwargs > `generation_config` > `model_generation_config` > global defaults.
    Returns (config, unused kwargs). In the returned config `max_length` / `min_length` are total
    lengths of the token history (`prompt_len` + new tokens), ready for `decode`.

    prompt_len: length T0 of the `input_ids` given to `decode` (decoder-only: the prompt ids,
        incl. image placeholders and padding, 0 when the prompt is only embeddings;
        encoder-decoder: 1, the decoder start token).
    inputs_embeds_len: decoder-only LMs prefilled from `inputs_embeds`: its length. When it differs
        from `prompt_len` (embeddings without ids), a user-set max_length / min_length count the
        embedded prompt and are shortened by it. None for id prompts and for encoder-decoder LMs.
    max_position_embeddings: the LM config's; caps the *default* max_length (OPT yes, T5 none).
    """
    cfg = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    if model_generation_config is not None:
        cfg.update(**model_generation_config.to_dict(), defaults_only=True, allow_custom_entries=True)
    default_max = cfg.max_length is None and kwargs.get("max_length") is None
    cfg.update(**DEFAULTS, defaults_only=True)
    unused = cfg.update(**kwargs)

    embeds_only = inputs_embeds_len is not None and inputs_embeds_len != prompt_len
    if cfg.max_new_tokens is not None:
        cfg.max_length = cfg.max_new_tokens + prompt_len
    elif embeds_only and not default_max:
        cfg.max_length -= inputs_embeds_len
    elif default_max:  # 20 new tokens by default
        cfg.max_length = cfg.max_length + prompt_len
        if max_position_embeddings is not None:
            cfg.max_length = min(cfg.max_length, max_position_embeddings)
    if cfg.min_new_tokens is not None:
        cfg.min_length = cfg.min_new_tokens + prompt_len
    elif embeds_only:
        cfg.min_length = max(cfg.min_length - inputs_embeds_len, 0)
    return cfg, unused


def generate(
    session: LMSession,
    input_ids: Tensor,
    generation_config: GenerationConfig | None = None,
    *,
    model_generation_config: GenerationConfig | None = None,
    inputs_embeds_len: int | None = None,
    max_position_embeddings: int | None = None,
    **kwargs,
) -> Tensor:
    """Continue the prompt held by `session`; return (B * num_return_sequences, T) token ids.

    input_ids (B, T0): the token history the logits processors see and the output starts with.
      - decoder-only with an ids prompt (BLIP-2 OPT: transformers passes inputs_embeds AND input_ids
        of the same length): the prompt ids incl. image placeholders and left padding;
        inputs_embeds_len = T0 (or None: same result).
      - decoder-only with only inputs_embeds (B, Te, E): input_ids = empty (B, 0) long tensor,
        inputs_embeds_len = Te. The output is then only the new tokens.
      - encoder-decoder (BLIP-2 T5, encoder fed inputs_embeds): input_ids = (B, 1) filled with
        decoder_start_token_id (falling back to bos_token_id), inputs_embeds_len = None.
    model_generation_config: the LM's defaults (special tokens ...). transformers 5.8's Blip2
      generate calls `language_model.generate`, whose config is
      `GenerationConfig.from_model_config(config.text_config)`: the checkpoint's
      generation_config.json is not consulted there.
    max_position_embeddings: the LM config's value (OPT: config.max_position_embeddings, T5: None).
    session: primed with B rows; it is expanded to B*k rows with `reorder` after prefill
      (k = num_beams for beam search, num_return_sequences for sampling).
    kwargs: GenerationConfig fields (max_new_tokens=, num_beams=, ...); anything else is an error.
    """
    cfg, unused = prepare_generation_config(
        generation_config, model_generation_config, prompt_len=input_ids.shape[1],
        inputs_embeds_len=inputs_embeds_len, max_position_embeddings=max_position_embeddings, **kwargs)
    if unused:
        raise ValueError(f"generate() got arguments that are not generation parameters: {sorted(unused)}")
    return decode(session, input_ids, cfg)


# ----------------------------------------------------------------------------------------------
# logits processors: (ids (N, T), scores (N, V) fp32) -> scores, in the reference's order
# ----------------------------------------------------------------------------------------------

Processor = Callable[[Tensor, Tensor], Tensor]


def _special_tokens(cfg: GenerationConfig) -> tuple[list[int] | None, int | None]:
    eos = cfg.eos_token_id
    if eos is not None:
        eos = torch.as_tensor(eos).flatten().tolist()
    pad = cfg.pad_token_id
    if pad is None and eos:  # open-end generation pads finished rows with the (first) eos
        pad = eos[0]
    return eos, pad


def _mask_tokens(scores: Tensor, tokens: Tensor) -> Tensor:
    return scores.masked_fill(torch.isin(torch.arange(scores.shape[-1], device=scores.device), tokens), -math.inf)


def _repetition_penalty(p: float) -> Processor:
    def f(ids, s):
        g = s.gather(1, ids)
        g = torch.where(g < 0, g * p, g / p)  # push seen tokens towards improbable, whatever the sign
        return s.scatter(1, ids, g)
    return f


def _no_repeat_ngram(n: int) -> Processor:
    def f(ids, s):
        N, T = ids.shape
        if T < n:  # no complete n-gram in the history yet
            return s
        win = ids.unfold(1, n, 1)  # (N, T-n+1, n) every n-gram seen
        prefix = ids[:, T - n + 1:]  # (N, n-1) the n-gram the next token would complete
        hit = (win[:, :, :-1] == prefix[:, None, :]).all(-1)  # (N, T-n+1)
        banned = torch.zeros_like(s).scatter_add_(1, win[:, :, -1], hit.to(s.dtype)) > 0
        return s.masked_fill(banned, -math.inf)
    return f


def _top_k(k: int) -> Processor:
    def f(ids, s):
        kk = min(k, s.shape[-1])
        return s.masked_fill(s < torch.topk(s, kk)[0][..., -1:], -math.inf)
    return f


def _top_p(p: float, keep: int) -> Processor:
    def f(ids, s):
        srt, idx = torch.sort(s, descending=False)
        cum = srt.softmax(-1).cumsum(-1)
        drop = cum <= (1 - p)  # the low tail holding 1-p of the mass
        drop[..., -keep:] = False
        return s.masked_fill(drop.scatter(1, idx, drop), -math.inf)
    return f


def _unsupported(cfg: GenerationConfig) -> list[str]:
    bad = [k for k in ("sequence_bias", "bad_words_ids", "exponential_decay_length_penalty", "constraints",
                       "force_words_ids", "watermarking_config", "stop_strings", "max_time", "dola_layers",
                       "assistant_early_exit", "prompt_lookup_num_tokens")
           if getattr(cfg, k, None) is not None]
    for k, off in (("guidance_scale", 1), ("encoder_repetition_penalty", 1.0), ("encoder_no_repeat_ngram_size", 0),
                   ("num_beam_groups", 1), ("remove_invalid_values", False), ("return_dict_in_generate", False),
                   ("token_healing", False), ("low_memory", False)):
        if getattr(cfg, k, None) not in (None, off):
            bad.append(k)
    if (cfg.penalty_alpha or 0) > 0 and (cfg.top_k or 0) > 1 and not cfg.do_sample:
        bad.append("penalty_alpha")
    if cfg.do_sample:
        bad += [k for k in ("min_p", "top_h") if getattr(cfg, k) is not None]
        bad += [k for k, off in (("typical_p", 1.0), ("epsilon_cutoff", 0.0), ("eta_cutoff", 0.0))
                if getattr(cfg, k) not in (None, off) and 0 < getattr(cfg, k) < 1]
    return bad


def build_processors(cfg: GenerationConfig, prompt_len: int, device) -> list[Processor]:
    """The reference's default processor list for `cfg` (in its order)."""
    bad = _unsupported(cfg)
    if bad:
        raise NotImplementedError(f"blip2.generate does not implement {bad}")
    eos, _ = _special_tokens(cfg)
    eos_t = torch.tensor(eos, device=device) if eos else None
    procs: list[Processor] = []
    if cfg.repetition_penalty is not None and cfg.repetition_penalty != 1.0:
        procs.append(_repetition_penalty(float(cfg.repetition_penalty)))
    if cfg.no_repeat_ngram_size:
        procs.append(_no_repeat_ngram(int(cfg.no_repeat_ngram_size)))
    if cfg.min_length and eos_t is not None:
        ml = cfg.min_length
        procs.append(lambda ids, s: _mask_tokens(s, eos_t) if ids.shape[-1] < ml else s)
    if cfg.min_new_tokens and eos_t is not None:
        mn = cfg.min_new_tokens
        procs.append(lambda ids, s: _mask_tokens(s, eos_t) if ids.shape[-1] - prompt_len < mn else s)
    if cfg.forced_bos_token_id is not None:
        procs.append(_force(lambda ids: ids.shape[-1] == 1, cfg.forced_bos_token_id))
    if cfg.forced_eos_token_id is not None:
        L = cfg.max_length
        procs.append(_force(lambda ids: ids.shape[-1] == L - 1, cfg.forced_eos_token_id))
    if cfg.suppress_tokens is not None:
        sup = torch.tensor(list(cfg.suppress_tokens), device=device)
        procs.append(lambda ids, s: _mask_tokens(s, sup))
    if cfg.begin_suppress_tokens is not None:
        bsup = torch.tensor(list(cfg.begin_suppress_tokens), device=device)
        begin = prompt_len if (prompt_len > 1 or cfg.forced_bos_token_id is None) else prompt_len + 1
        procs.append(lambda ids, s: _mask_tokens(s, bsup) if ids.shape[-1] == begin else s)
    if cfg.do_sample:
        # beams keep one more candidate than there are eos tokens, so a beam can always continue
        keep = (len(eos) + 1 if eos else 2) if (cfg.num_beams or 1) > 1 else 1
        if cfg.temperature is not None and cfg.temperature != 1.0:
            t = float(cfg.temperature)
            if not t > 0:
                raise ValueError(f"`temperature` (={t}) has to be a strictly positive float")
            procs.append(lambda ids, s: s / t)
        if cfg.top_k is not None and cfg.top_k != 0:
            procs.append(_top_k(max(int(cfg.top_k), keep)))
        if cfg.top_p is not None and cfg.top_p < 1.0:
            procs.append(_top_p(float(cfg.top_p), keep))
    if cfg.renormalize_logits is True:
        procs.append(lambda ids, s: s.log_softmax(-1))
    return procs


def _force(when: Callable[[Tensor], bool], token) -> Processor:
    def f(ids, s):
        if not when(ids):
            return s
        out = torch.full_like(s, -math.inf)
        out[:, token] = 0
        return out
    return f


def _apply(procs: list[Processor], ids: Tensor, s: Tensor) -> Tensor:
    for p in procs:
        s = p(ids, s)
    return s


# ----------------------------------------------------------------------------------------------
# decoding loops
# ----------------------------------------------------------------------------------------------

def decode(session: LMSession, input_ids: Tensor, cfg: GenerationConfig) -> Tensor:
    """Run the decoding strategy `cfg` selects on a config from `prepare_generation_config`."""
    T0 = input_ids.shape[1]
    if T0 >= cfg.max_length:
        raise ValueError(
            f"Input length of input_ids is {T0}, but `max_length` is set to {cfg.max_length}. "
            "Increase `max_length` or, better, set `max_new_tokens`.")
    if session.batch_size != input_ids.shape[0]:
        raise ValueError(f"session has {session.batch_size} rows but input_ids has {input_ids.shape[0]}")
    procs = build_processors(cfg, T0, input_ids.device)
    if cfg.compile:  # True: torch.compile's default mode; a string names the mode
        session.compile(None if cfg.compile is True else str(cfg.compile))
    if (cfg.num_beams or 1) > 1:
        return _beam_search(session, input_ids, cfg, procs)
    return _sample(session, input_ids, cfg, procs)


def _prefill_expanded(session: LMSession, k: int) -> Tensor:
    logits = session.prefill()
    if k > 1:  # the reference repeats every input row k times (row-major: b0,b0,b1,b1,...)
        B = logits.shape[0]
        session.reorder(torch.arange(B, device=logits.device).repeat_interleave(k))
        logits = logits.repeat_interleave(k, dim=0)
    return logits


@torch.no_grad()
def _sample(session: LMSession, input_ids: Tensor, cfg: GenerationConfig, procs: list[Processor]) -> Tensor:
    """Greedy (argmax) or multinomial sampling, one token per row per step."""
    eos, pad = _special_tokens(cfg)
    k = cfg.num_return_sequences or 1
    ids0 = input_ids.repeat_interleave(k, dim=0) if k > 1 else input_ids
    N, T0 = ids0.shape
    L = cfg.max_length
    ids = torch.zeros((N, L), dtype=torch.long, device=ids0.device)  # the whole history, preallocated
    ids[:, :T0] = ids0
    eos_t = torch.tensor(eos, device=ids.device) if eos else None
    alive = torch.ones(N, dtype=torch.bool, device=ids.device)
    logits = _prefill_expanded(session, k)
    t = T0
    while True:
        s = _apply(procs, ids[:, :t], logits.to(torch.float32))  # scores in fp32 whatever the LM dtype
        if cfg.do_sample:
            nxt = torch.multinomial(F.softmax(s, dim=-1), num_samples=1).squeeze(1)
        else:
            nxt = torch.argmax(s, dim=-1)
        if eos_t is not None:
            nxt = torch.where(alive, nxt, pad)  # finished rows are padded
            alive &= ~torch.isin(nxt, eos_t)
        ids[:, t] = nxt
        t += 1
        if t >= L or (eos_t is not None and not bool(alive.any())):  # the one host sync per step
            break
        logits = session.step(nxt)
    return ids[:, :t].contiguous()


@torch.no_grad()
def _beam_search(session: LMSession, input_ids: Tensor, cfg: GenerationConfig, procs: list[Processor]) -> Tensor:
    """The reference's vectorized beam search (and beam sampling when do_sample).

    Per input b: `run` holds num_beams live hypotheses, `fin` the num_beams best finished ones.
    Each step takes the top K = 2*num_beams (more with several eos) continuations over all live
    beams, finalises those among the first num_beams that hit eos / max_length (score divided by
    gen_len ** length_penalty), and keeps the best num_beams unfinished ones running.
    """
    eos, pad = _special_tokens(cfg)
    nb, L = cfg.num_beams, cfg.max_length
    lp, es = cfg.length_penalty, cfg.early_stopping
    nrs = cfg.num_return_sequences or 1
    dev = input_ids.device
    B, T0 = input_ids.shape
    K = max(2, 1 + (len(eos) if eos else 0)) * nb
    top_nb = torch.arange(K, device=dev) < nb  # only these may be finalised

    fill = (pad or eos[0]) if eos else -1  # as the reference fills (note: pad id 0 falls back to eos)
    run = torch.full((B, nb, L), fill, dtype=torch.long, device=dev)  # (B, nb, L)
    run[:, :, :T0] = input_ids[:, None, :]
    fin = run.clone()
    run_score = torch.zeros((B, nb), dtype=torch.float32, device=dev)
    run_score[:, 1:] = -1e9  # only beam 0 is real at the start: no duplicate continuations
    fin_score = torch.full((B, nb), -1e9, dtype=torch.float32, device=dev)
    fin_done = torch.zeros((B, nb), dtype=torch.bool, device=dev)
    fin_len = torch.zeros((B, nb), dtype=torch.long, device=dev)  # generated tokens per finished hyp
    improvable = torch.ones((B, 1), dtype=torch.bool, device=dev)
    offset = torch.arange(B, device=dev)[:, None] * nb
    eos_t = torch.tensor(eos, device=dev) if eos else None

    logits = _prefill_expanded(session, nb)
    t = T0
    while True:
        logp = F.log_softmax(logits.to(torch.float32), dim=-1)  # (B*nb, V)
        logp = _apply(procs, run[:, :, :t].reshape(B * nb, t), logp)
        V = logp.shape[-1]
        acc = (logp.view(B, nb, V) + run_score[:, :, None]).view(B, nb * V)
        if cfg.do_sample:
            top_i = torch.multinomial(F.softmax(acc, dim=-1), num_samples=K)
            top_lp = acc.gather(1, top_i)
        else:
            top_lp, top_i = torch.topk(acc, K)  # (B, K)
        src = top_i // V  # which beam each candidate extends
        tok = top_i % V
        cand = torch.take_along_dim(run, src[:, :, None], dim=1)  # (B, K, L)
        cand[:, :, t] = tok
        hits = torch.full_like(tok, t + 1 >= L, dtype=torch.bool)
        if eos_t is not None:
            hits |= torch.isin(tok, eos_t)

        # live beams for the next step: the best candidates that did not just finish
        run_lp = top_lp + hits.to(torch.float32) * -1.0e9
        keep = torch.topk(run_lp, k=nb)[1]  # (B, nb)
        run = torch.take_along_dim(cand, keep[:, :, None], dim=1)
        run_score = run_lp.gather(1, keep)
        beam_idx = (src.gather(1, keep) + offset).view(-1)  # flat source row of each live beam

        # finished hypotheses: merge the new ones into the best-nb list
        just = hits & top_nb[None, :]
        cand_score = top_lp / ((t + 1 - T0) ** lp)
        full = fin_done.all(-1, keepdim=True) & (es is True)
        cand_score += full.to(torch.float32) * -1.0e9
        cand_score += (~improvable).to(torch.float32) * -1.0e9
        cand_score += (~just) * -1.0e9
        m_score = torch.cat((fin_score, cand_score), dim=1)
        sel = torch.topk(m_score, k=nb)[1]
        fin = torch.take_along_dim(torch.cat((fin, cand), dim=1), sel[:, :, None], dim=1)
        fin_score = m_score.gather(1, sel)
        fin_len = torch.cat((fin_len, torch.full_like(tok, t + 1 - T0)), dim=1).gather(1, sel)
        fin_done = torch.cat((fin_done, just), dim=1).gather(1, sel)

        t += 1
        # can a live beam still beat the worst finished one? (the reference's heuristic)
        best_len = (L - T0) if (es == "never" and lp > 0.0) else (t - T0)
        best_run = run_score[:, :1] / (best_len ** lp)
        worst_fin = torch.where(fin_done, fin_score.min(dim=1, keepdim=True)[0], -1.0e9)
        improvable = improvable & (best_run > worst_fin).any(dim=-1, keepdim=True)
        go = improvable.any() & ~(fin_done.all() & (es is True)) & ~hits.all()
        if not bool(go):  # the one host sync per step
            break
        session.reorder(beam_idx)
        logits = session.step(run[:, :, t - 1].reshape(-1))

    out = fin[:, :nrs].reshape(B * nrs, L)
    n_gen = int(fin_len[:, :nrs].max())
    return out[:, :T0 + n_gen].contiguous()
