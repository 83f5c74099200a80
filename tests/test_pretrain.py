"""Stage-1 pre-training (blip2.models.pretrain): the three masks, each loss against a hand computation,
hard-negative sampling, a few training steps, frozen ViT, and checkpoints that transformers reads."""

import math

import pytest
import torch

import hf_tiny
from blip2.models.config import Blip2Config
from blip2.models.pretrain import (
    Blip2QFormerForPretraining, hard_negatives, itc_mask, itg_mask, itm_mask, lm_loss,
)
from blip2.models.retrieval import Blip2ForImageTextRetrieval

Q, EPS, CLS, PAD = 4, 0.1, 1, 0


def _cfg(dropout=0.0):
    qf = dict(hf_tiny.QFORMER, use_qformer_text_input=True, hidden_dropout_prob=dropout,
              attention_probs_dropout_prob=dropout)
    return Blip2Config(vision_config=hf_tiny.VISION, qformer_config=qf, num_query_tokens=Q, image_text_hidden_size=16)


def _model(seed=0, dropout=0.0):
    m = Blip2QFormerForPretraining(_cfg(dropout))
    hf_tiny.fan_in_init_(m, seed)  # O(1) activations, so a wrong detail shows as an O(1) error
    with torch.no_grad():
        m.temp.fill_(0.07)
    return m.eval()


@pytest.fixture(scope="module")
def model():
    return _model()


def _batch(B=3, L=6, pads=(0, 2, 1), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, 30, 30, generator=g)
    ids = torch.randint(2, 97, (B, L), generator=g)
    ids[:, 0] = CLS
    am = torch.ones(B, L, dtype=torch.long)
    for b, n in enumerate(pads[:B]):
        if n:
            ids[b, -n:], am[b, -n:] = PAD, 0
    return x, ids, am


def _smoothed_ce(logits_row, target, eps=EPS):
    """-(1-eps) log p[y] - eps * mean_k log p[k], written out."""
    row = [float(v) for v in logits_row]
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    logp = [v - lse for v in row]
    return -(1 - eps) * logp[target] - eps * sum(logp) / len(row)


# --- masks ----------------------------------------------------------------------------------

def test_masks_literal():
    am = torch.tensor([[1, 1, 1], [1, 1, 0]])
    T, F_ = True, False
    itc = itc_mask(am, 2)
    itm = itm_mask(am, 2)
    itg = itg_mask(am, 2)
    assert itc.shape == itm.shape == itg.shape == (2, 5, 5) and itc.dtype == torch.bool
    # rows: q0 q1 t0 t1 t2 attending to columns q0 q1 t0 t1 t2; second sample has t2 padded
    assert itc[1].tolist() == [[T, T, F_, F_, F_], [T, T, F_, F_, F_],
                               [F_, F_, T, T, F_], [F_, F_, T, T, F_], [F_, F_, T, T, F_]]
    assert itm[1].tolist() == [[T, T, T, T, F_]] * 5
    assert itg[0].tolist() == [[T, T, F_, F_, F_], [T, T, F_, F_, F_],
                               [T, T, T, F_, F_], [T, T, T, T, F_], [T, T, T, T, T]]
    assert itg[1].tolist() == [[T, T, F_, F_, F_], [T, T, F_, F_, F_],
                               [T, T, T, F_, F_], [T, T, T, T, F_], [T, T, T, T, F_]]


@pytest.mark.parametrize("nq", [1, 4])
def test_masks_query_text_split(nq):
    am = _batch(B=3, L=7, pads=(0, 3, 1))[2]
    L = am.shape[1]
    itc, itm, itg = itc_mask(am, nq), itm_mask(am, nq), itg_mask(am, nq)
    q, t = slice(0, nq), slice(nq, None)
    valid = am.bool()[:, None, :]  # (B, 1, L) real text keys
    assert itc[:, q, q].all() and itg[:, q, q].all() and itm[:, q, q].all()
    assert not itc[:, q, t].any() and not itg[:, q, t].any()  # queries never see text (ITC, ITG)
    assert not itc[:, t, q].any()  # ITC text never sees the queries
    assert itg[:, t, q].all() and itm[:, t, q].all()  # ITG / ITM text sees every query
    assert torch.equal(itm[:, q, t], valid.expand(-1, nq, -1))  # ITM: queries see all real text
    assert torch.equal(itm[:, t, t], valid.expand(-1, L, -1))
    assert torch.equal(itc[:, t, t], valid.expand(-1, L, -1))
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    assert torch.equal(itg[:, t, t], causal[None] & valid)  # text causal in ITG


# --- ITC ------------------------------------------------------------------------------------

@torch.no_grad()
def test_itc_loss_by_hand(model):
    x, ids, am = _batch()
    loss, sim = model.itc_loss(model.image_embeds(x), ids, am)
    # cosine max-over-queries from the retrieval model, which runs image and text in separate passes
    cos = model.to_retrieval()(x, ids, am).logits_per_image  # (B, B)
    t, B = model.temp.item(), ids.shape[0]
    torch.testing.assert_close(sim, cos / t, rtol=1e-5, atol=1e-5)
    total = 0.0
    for i in range(B):
        total += _smoothed_ce([cos[i, j] / t for j in range(B)], i)  # image -> texts
        total += _smoothed_ce([cos[j, i] / t for j in range(B)], i)  # text -> images
    assert abs(loss.item() - total / (2 * B)) < 1e-5


def test_temp_is_learned_and_clamped():
    m = _model()
    with torch.no_grad():
        m.temp.fill_(5.0)
    x, ids, am = _batch()
    loss, _ = m.itc_loss(m.image_embeds(x), ids, am)
    assert m.temp.item() == pytest.approx(0.5)
    loss.backward()
    assert m.temp.grad is not None and m.temp.grad.abs() > 0


# --- ITM ------------------------------------------------------------------------------------

@torch.no_grad()
def test_itm_loss_by_hand(model):
    x, ids, am = _batch()
    neg_image, neg_text = torch.tensor([2, 0, 1]), torch.tensor([1, 2, 0])
    loss = model.itm_loss(model.image_embeds(x), ids, am, negatives=(neg_image, neg_text))
    r = model.to_retrieval()

    def logits(i, t):  # the retrieval model's ITM head on one (image, text) pair, 2-D padding mask
        i, t = int(i), int(t)
        return r(x[i:i + 1], ids[t:t + 1], am[t:t + 1], use_image_text_matching_head=True).logits_per_image[0]

    B, terms = 3, []
    for b in range(B):
        terms.append(_smoothed_ce(logits(b, b), 1, eps=0.0))  # positive pair
    for b in range(B):
        terms.append(_smoothed_ce(logits(neg_image[b], b), 0, eps=0.0))  # text b with a wrong image
    for b in range(B):
        terms.append(_smoothed_ce(logits(b, neg_text[b]), 0, eps=0.0))  # image b with a wrong text
    assert abs(loss.item() - sum(terms) / len(terms)) < 1e-5


def test_hard_negatives_follow_the_similarities():
    B = 4
    sim = torch.zeros(B, B)
    sim += 100 * torch.eye(B)  # the positives, which must never be drawn
    for i in range(B):
        sim[i, (i + 1) % B] = 50.0  # image i looks like text i+1
    neg_image, neg_text = hard_negatives(sim, torch.Generator().manual_seed(0))
    assert neg_text.tolist() == [(i + 1) % B for i in range(B)]  # for image i: text i+1
    assert neg_image.tolist() == [(t - 1) % B for t in range(B)]  # for text t: image t-1
    with pytest.raises(ValueError):
        hard_negatives(torch.zeros(1, 1))


def test_hard_negatives_frequencies_and_seed():
    sim = torch.tensor([[3.0, 1.0, 0.0], [0.5, 2.0, 1.5], [2.0, 0.0, 1.0]])
    a = hard_negatives(sim, torch.Generator().manual_seed(3))
    b = hard_negatives(sim, torch.Generator().manual_seed(3))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    g, n = torch.Generator().manual_seed(1), 2000
    drawn = torch.stack([hard_negatives(sim, g)[1] for _ in range(n)])  # (n, 3): image i drew text [:, i]
    counts = torch.stack([torch.bincount(drawn[:, i], minlength=3) for i in range(3)]).float()
    for i in range(3):  # softmax over the other texts, by hand
        z = sum(math.exp(sim[i, j]) for j in range(3) if j != i)
        for j in range(3):
            want = 0.0 if i == j else math.exp(sim[i, j]) / z
            assert abs(counts[i, j].item() / n - want) < 0.035, (i, j)


# --- ITG ------------------------------------------------------------------------------------

def test_lm_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[5, 3, 1, 4, -100], [2, 6, -100, -100, -100]])
    terms = [_smoothed_ce(logits[b, i], labels[b, i + 1]) for b in range(2) for i in range(4) if labels[b, i + 1] >= 0]
    assert abs(lm_loss(logits, labels).item() - sum(terms) / len(terms)) < 1e-5


@torch.no_grad()
def test_itg_loss_by_hand(model):
    x, ids, am = _batch()
    img = model.image_embeds(x)
    loss = model.itg_loss(img, ids, am)
    dec = ids.clone()
    dec[:, 0] = model.config.dec_token_id  # [DEC] replaces [CLS]
    logits = model.itg_logits(img, dec, am)
    terms = []
    for b in range(ids.shape[0]):
        for i in range(ids.shape[1] - 1):
            if am[b, i + 1]:  # predict each real next token; padding is not a target
                terms.append(_smoothed_ce(logits[b, i], ids[b, i + 1]))
    assert abs(loss.item() - sum(terms) / len(terms)) < 1e-5
    # the first id is replaced, and padding ids are never read
    ids2 = ids.clone()
    ids2[:, 0] = 7
    ids2[am == 0] = 42
    assert abs(model.itg_loss(img, ids2, am).item() - loss.item()) < 1e-6


@torch.no_grad()
def test_itg_is_causal_and_image_grounded(model):
    x, ids, am = _batch(pads=(0, 0, 0))
    img = model.image_embeds(x)
    full = model.itg_logits(img, ids, am)
    for k in range(1, ids.shape[1]):
        # a prefix decodes exactly as inside the full text: nothing after position k is seen
        pre = model.itg_logits(img, ids[:, :k], am[:, :k])
        torch.testing.assert_close(pre, full[:, :k], rtol=1e-5, atol=1e-5)
    changed = ids.clone()
    changed[:, 3] = (changed[:, 3] + 1) % 97 + 1
    after = model.itg_logits(img, changed, am)
    assert (after[:, 3:] - full[:, 3:]).abs().amax() > 1e-3  # and the token itself is read
    other = model.itg_logits(model.image_embeds(x.flip(0)), ids, am)
    assert (other - full).abs().amax() > 1e-3  # text sees the queries, which see the image
    # the queries in the ITG pass are exactly the queries reading the image alone
    h = model._qformer(img, ids, itg_mask(am, Q))[:, :Q]
    torch.testing.assert_close(h, model.query_image(img).last_hidden_state, rtol=1e-5, atol=1e-5)


# --- training -------------------------------------------------------------------------------

def test_training_lowers_loss_and_keeps_vit_frozen():
    torch.manual_seed(0)
    m = _model(seed=1).train()
    assert not m.vision_model.training and m.qformer.training
    x, ids, am = _batch(B=4, pads=(0, 2, 1, 3), seed=1)
    vit = {k: v.clone() for k, v in m.vision_model.state_dict().items()}
    qf = {k: v.clone() for k, v in m.qformer.state_dict().items()}
    params = [p for p in m.parameters() if p.requires_grad]
    assert params and not any(p.requires_grad for p in m.vision_model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)

    def losses():  # same ITM negatives every time, so the numbers compare
        return m(x, ids, am, generator=torch.Generator().manual_seed(0))

    first = {k: v.item() for k, v in losses().items()}
    for _ in range(8):
        out = losses()
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert all(p.grad is None for p in m.vision_model.parameters())
    last = {k: v.item() for k, v in losses().items()}
    assert last["loss"] < first["loss"] - 0.1, (first, last)
    assert last["loss"] == pytest.approx(last["loss_itc"] + last["loss_itm"] + last["loss_itg"], rel=1e-5)
    assert all(torch.equal(v, m.vision_model.state_dict()[k]) for k, v in vit.items())
    changed = [k for k, v in qf.items() if not torch.equal(v, m.qformer.state_dict()[k])]
    assert len(changed) > len(qf) // 2
    assert 0.001 <= m.temp.item() <= 0.5


# --- checkpoints ----------------------------------------------------------------------------

@torch.no_grad()
def test_checkpoint_round_trip_and_transformers(model, tmp_path):
    import transformers

    x, ids, am = _batch()
    model.save_pretrained(tmp_path / "pt")
    back = Blip2QFormerForPretraining.from_pretrained(tmp_path / "pt")
    assert back.itg_head.decoder.weight is back.embeddings.word_embeddings.weight  # tied again
    assert back.config.dec_token_id == model.config.dec_token_id
    for k, v in model(x, ids, am, generator=torch.Generator().manual_seed(0)).items():
        w = back(x, ids, am, generator=torch.Generator().manual_seed(0))[k]
        torch.testing.assert_close(w, v, rtol=0, atol=0)

    ours = model.to_retrieval()
    hf = transformers.Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "pt").eval()  # ignores temp, itg_head
    for itm in (True, False):
        a = ours(x, ids, am, use_image_text_matching_head=itm).logits_per_image
        b = hf(x, ids, am, use_image_text_matching_head=itm).logits_per_image
        hf_tiny.assert_close(a, b, what=f"itm={itm}")

    ours.save_pretrained(tmp_path / "ret")  # a pure retrieval checkpoint our strict loader reads
    r = Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "ret")
    torch.testing.assert_close(r(x, ids, am).logits_per_image, ours(x, ids, am).logits_per_image)
    again = Blip2QFormerForPretraining.from_retrieval(r).eval()
    assert again.temp.item() == pytest.approx(0.07)
    torch.testing.assert_close(again.itc_loss(again.image_embeds(x), ids, am)[0],
                               model.itc_loss(model.image_embeds(x), ids, am)[0])
