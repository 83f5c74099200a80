"""BLIP-2 stage 1: teach the Q-Former to read a frozen image encoder (LAVIS' `Blip2Qformer`).

Three losses, summed, on a batch of B (image, caption) pairs:
  ITC  image-text contrastive: similarity = max over the queries of cos(query, text CLS),
       divided by a learned temperature; in-batch cross-entropy both ways, label smoothing 0.1.
  ITM  image-text matching: for each text a hard negative image and for each image a hard
       negative text, drawn from softmax of the ITC similarities (diagonal masked); itm_head on
       the query outputs, averaged over queries; pos/neg/neg batch of 3B.
  ITG  image-grounded text generation: the text, with [DEC] in place of [CLS], decoded causally
       while seeing all queries; LM head (tied to the word embeddings), label smoothing 0.1.

Each objective is one Q-Former pass over [queries; text] with its own (B, T, T) mask, T = Q + L:
  ITC  unimodal: queries see queries, text sees text (queries still cross-attend to the image)
  ITM  bidirectional: everything sees everything
  ITG  multimodal causal (UniLM): queries see queries; text sees all queries and earlier text
This is numerically what LAVIS does with separate passes and cached query keys/values.

Keys are those of Blip2ForImageTextRetrieval plus `temp` and `itg_head.*`, so a checkpoint saved
here loads in transformers' Blip2ForImageTextRetrieval (extra keys are ignored there); ours is
strict, so use `to_retrieval()` to write a pure retrieval checkpoint.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .base import itc_embedding
from .config import Blip2Config, Blip2QFormerConfig
from .layers import activation, causal_lm_loss
from .retrieval import Blip2ForImageTextRetrieval, _Blip2Stage1

LABEL_SMOOTHING = 0.1
TEMP_INIT, TEMP_MIN, TEMP_MAX = 0.07, 0.001, 0.5  # LAVIS clamps temp to [0.001, 0.5] every step


# --- masks: (B, T, T) booleans, True = row position may attend to column position ------------

def _pad_keys(attention_mask: torch.Tensor, Q: int) -> torch.Tensor:
    """(B, L) text padding mask -> (B, 1, Q+L) key mask; queries are never padding."""
    B = attention_mask.shape[0]
    ones = torch.ones(B, Q, dtype=torch.bool, device=attention_mask.device)
    return torch.cat([ones, attention_mask.bool()], dim=1)[:, None, :]


def itc_mask(attention_mask: torch.Tensor, num_query: int) -> torch.Tensor:
    """Unimodal: queries and text are two separate sequences that cannot see each other."""
    Q, L = num_query, attention_mask.shape[1]
    T = Q + L
    idx = torch.arange(T, device=attention_mask.device)
    same_side = (idx[:, None] < Q) == (idx[None, :] < Q)  # (T, T)
    return same_side[None] & _pad_keys(attention_mask, Q)


def itm_mask(attention_mask: torch.Tensor, num_query: int) -> torch.Tensor:
    """Bidirectional: all positions see all (non-padding) positions."""
    T = num_query + attention_mask.shape[1]
    return _pad_keys(attention_mask, num_query).expand(-1, T, -1)


def itg_mask(attention_mask: torch.Tensor, num_query: int) -> torch.Tensor:
    """Multimodal causal: queries see queries only; text token i sees all queries and text j <= i."""
    Q, L = num_query, attention_mask.shape[1]
    T = Q + L
    idx = torch.arange(T, device=attention_mask.device)
    is_q = idx < Q
    rows, cols = idx[:, None], idx[None, :]
    allowed = torch.where(is_q[:, None], is_q[None, :], is_q[None, :] | (cols <= rows))  # (T, T)
    return allowed[None] & _pad_keys(attention_mask, Q)


# --- the math of the losses -----------------------------------------------------------------

def contrastive_loss(sim_i2t: torch.Tensor, label_smoothing: float = LABEL_SMOOTHING,
                     positives: torch.Tensor | None = None) -> torch.Tensor:
    """sim_i2t (B, B) logits (already divided by temp); pair b is (image b, text b).

    positives: optional (B, B) bool, True where image i and text j also match (the same image
    or the same text elsewhere in the batch; LAVIS' image_id). The target then spreads evenly
    over them, as LAVIS does, instead of calling a duplicate a negative."""
    B = sim_i2t.shape[0]
    if positives is None:
        y = torch.arange(B, device=sim_i2t.device)
        return (F.cross_entropy(sim_i2t, y, label_smoothing=label_smoothing)
                + F.cross_entropy(sim_i2t.t(), y, label_smoothing=label_smoothing)) / 2
    pos = positives.float()
    t_i2t = pos / pos.sum(1, keepdim=True)
    t_t2i = pos.t() / pos.t().sum(1, keepdim=True)
    t_i2t = (1 - label_smoothing) * t_i2t + label_smoothing / B
    t_t2i = (1 - label_smoothing) * t_t2i + label_smoothing / B
    return (-(t_i2t * sim_i2t.log_softmax(1)).sum(1).mean() - (t_t2i * sim_i2t.t().log_softmax(1)).sum(1).mean()) / 2


@torch.no_grad()
def hard_negatives(sim_i2t: torch.Tensor, generator: torch.Generator | None = None,
                   positives: torch.Tensor | None = None):
    """Draw one negative per row from softmax(sim) with the positive (or all `positives`) masked out.

    Returns (neg_image (B,) : a negative image for each text, neg_text (B,) : a negative text for each image).
    """
    B = sim_i2t.shape[0]
    if B < 2:
        raise ValueError("ITM hard negatives need a batch of at least 2 pairs")
    eye = torch.eye(B, dtype=torch.bool, device=sim_i2t.device)
    if positives is not None:
        eye = eye | positives.to(eye.device)
    w_t2i = sim_i2t.t().float().masked_fill(eye, -10000.0).softmax(dim=1)
    w_i2t = sim_i2t.float().masked_fill(eye, -10000.0).softmax(dim=1)
    dev = generator.device if generator is not None else sim_i2t.device
    neg_image = torch.multinomial(w_t2i.to(dev), 1, generator=generator).squeeze(1).to(sim_i2t.device)
    neg_text = torch.multinomial(w_i2t.to(dev), 1, generator=generator).squeeze(1).to(sim_i2t.device)
    return neg_image, neg_text


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = LABEL_SMOOTHING) -> torch.Tensor:
    """Next-token cross-entropy: logits (B, L, V) at position i predict labels[:, i + 1]; -100 is ignored."""
    return causal_lm_loss(logits, labels, label_smoothing=label_smoothing)


# --- the model ------------------------------------------------------------------------------

class Blip2QFormerLMHead(nn.Module):
    """BERT's MLM head: dense -> act -> LayerNorm -> decoder (weight tied to the word embeddings)."""

    def __init__(self, config: Blip2QFormerConfig):
        super().__init__()
        C = config.hidden_size
        self.dense = nn.Linear(C, C)
        self.act = activation(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(C, config.vocab_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.LayerNorm(self.act(self.dense(h))))  # (B, L, V)


class Blip2QFormerForPretraining(_Blip2Stage1):
    """Stage-1 model: frozen ViT, trainable queries + Q-Former + projections + heads.

    input_ids are tokenised captions that start with [CLS] (ITC/ITM); for ITG the first id is
    replaced by `config.dec_token_id` (LAVIS' [DEC]; default: the last Q-Former vocabulary id).
    """

    main_input_name = "pixel_values"
    _tied_weights_keys = {"itg_head.decoder.weight": "embeddings.word_embeddings.weight"}

    def __init__(self, config: Blip2Config):
        super().__init__(config)
        qc = config.qformer_config
        if not qc.use_qformer_text_input:
            raise ValueError(
                "stage-1 pre-training runs text through the Q-Former: build the config with "
                "qformer_config.use_qformer_text_input=True"
            )
        if getattr(config, "dec_token_id", None) is None:
            config.dec_token_id = qc.vocab_size - 1
        self.build_image_side(text_embeddings=True)
        self.vision_projection = nn.Linear(qc.hidden_size, config.image_text_hidden_size)
        self.text_projection = nn.Linear(qc.hidden_size, config.image_text_hidden_size)
        self.itm_head = nn.Linear(qc.hidden_size, 2)
        self.itg_head = Blip2QFormerLMHead(qc)
        self.temp = nn.Parameter(torch.full((), TEMP_INIT))
        self.vision_model.requires_grad_(False)  # frozen: the image encoder never trains here
        self.post_init()

    def _init_weights(self, m: nn.Module) -> None:
        super()._init_weights(m)
        if m is self:
            with torch.no_grad():
                self.temp.fill_(TEMP_INIT)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vision_model.eval()  # frozen, so no dropout there either
        return self

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    # --- conversions to and from the retrieval model ---
    def to_retrieval(self) -> Blip2ForImageTextRetrieval:
        """A Blip2ForImageTextRetrieval sharing these weights (drops temp and the ITG head)."""
        cfg = copy.deepcopy(self.config)
        with torch.device("meta"):
            r = Blip2ForImageTextRetrieval(cfg)
        keep = r.state_dict().keys()
        r.load_state_dict({k: v for k, v in self.state_dict().items() if k in keep}, strict=True, assign=True)
        return r.train(self.training)

    @classmethod
    def from_retrieval(cls, r: Blip2ForImageTextRetrieval) -> "Blip2QFormerForPretraining":
        """Start stage 1 from a retrieval model (e.g. blip2-itm-vit-g): fresh ITG head bias/transform, temp 0.07."""
        m = cls(copy.deepcopy(r.config)).to(device=r.device)
        missing, unexpected = m.load_state_dict(r.state_dict(), strict=False)
        if unexpected or not all(k.startswith(("itg_head.", "temp")) for k in missing):
            raise ValueError(f"not a retrieval model's weights: missing {missing}, unexpected {unexpected}")
        return m

    # --- pieces ---
    @torch.no_grad()
    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen ViT's output (B, 1+N, Cv)."""
        return self.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state

    def _qformer(self, image_embeds, input_ids, mask) -> torch.Tensor:
        """One pass over [queries; text] with a (B, T, T) mask -> hidden states (B, Q+L, C)."""
        queries = self.query_tokens.expand(input_ids.shape[0], -1, -1)
        return self.qformer(
            query_embeds=self.embeddings(input_ids=input_ids, query_embeds=queries),
            query_length=queries.shape[1],
            attention_mask=mask,
            encoder_hidden_states=image_embeds,
            return_dict=True,
        ).last_hidden_state

    def itc_features(self, image_embeds, input_ids, attention_mask):
        """-> image_feats (B, Q, E) and text_feat (B, E), both L2-normalised."""
        Q = self.query_tokens.shape[1]
        h = self._qformer(image_embeds, input_ids, itc_mask(attention_mask, Q))
        image_feats = itc_embedding(self.vision_projection, h[:, :Q])
        text_feat = itc_embedding(self.text_projection, h[:, Q])  # the text's [CLS]
        return image_feats, text_feat

    def itc_loss(self, image_embeds, input_ids, attention_mask, positives=None):
        """-> (loss, sim_i2t (B, B) = max-over-queries cosine / temp)."""
        with torch.no_grad():
            self.temp.clamp_(TEMP_MIN, TEMP_MAX)
        image_feats, text_feat = self.itc_features(image_embeds, input_ids, attention_mask)
        sim = torch.einsum("iqe,te->itq", image_feats.float(), text_feat.float()).max(dim=-1).values
        sim_i2t = sim / self.temp
        return contrastive_loss(sim_i2t, positives=positives), sim_i2t

    def itm_logits(self, image_embeds, input_ids, attention_mask) -> torch.Tensor:
        """Pairs (image b, text b) -> (B, 2) [no-match, match] logits, averaged over the queries."""
        Q = self.query_tokens.shape[1]
        h = self._qformer(image_embeds, input_ids, itm_mask(attention_mask, Q))
        return self.itm_head(h[:, :Q]).mean(dim=1)

    def itm_loss(self, image_embeds, input_ids, attention_mask, sim_i2t=None, generator=None, negatives=None,
                 positives=None):
        """negatives: (neg_image, neg_text) index tensors; drawn by `hard_negatives(sim_i2t)` if None."""
        neg_image, neg_text = negatives if negatives is not None else hard_negatives(sim_i2t, generator, positives)
        B = input_ids.shape[0]
        ids = torch.cat([input_ids, input_ids, input_ids[neg_text]])
        mask = torch.cat([attention_mask, attention_mask, attention_mask[neg_text]])
        img = torch.cat([image_embeds, image_embeds[neg_image], image_embeds])
        logits = self.itm_logits(img, ids, mask)  # (3B, 2)
        labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(logits.device)
        return F.cross_entropy(logits.float(), labels)

    def itg_logits(self, image_embeds, input_ids, attention_mask) -> torch.Tensor:
        """Text logits (B, L, V) under the multimodal causal mask; input_ids as given (no [DEC] swap)."""
        Q = self.query_tokens.shape[1]
        h = self._qformer(image_embeds, input_ids, itg_mask(attention_mask, Q))
        return self.itg_head(h[:, Q:])

    def itg_loss(self, image_embeds, input_ids, attention_mask):
        dec = input_ids.clone()
        dec[:, 0] = self.config.dec_token_id
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return lm_loss(self.itg_logits(image_embeds, dec, attention_mask), labels)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        positives: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """-> dict(loss, loss_itc, loss_itm, loss_itg); loss is their sum (LAVIS weights them equally).

        generator seeds the ITM negative sampling (pass one for reproducible runs).
        positives: optional (B, B) bool, True where image i and text j match besides i == j
        (duplicate images or captions in the batch): ITC targets include them, ITM never
        draws them as negatives.
        image_embeds: the frozen ViT's output for these images, computed earlier (a trainer's
        cache); pixel_values is then not read.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        img = self.image_embeds(pixel_values) if image_embeds is None else image_embeds
        loss_itc, sim_i2t = self.itc_loss(img, input_ids, attention_mask, positives)
        loss_itm = self.itm_loss(img, input_ids, attention_mask, sim_i2t, generator, positives=positives)
        loss_itg = self.itg_loss(img, input_ids, attention_mask)
        return dict(loss=loss_itc + loss_itm + loss_itg, loss_itc=loss_itc, loss_itm=loss_itm, loss_itg=loss_itg)
