"""Loss terms with known values, layer maps, capture hooks and teacher replay."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

import lavis_dlip  # noqa: F401
from lavis_dlip.errors import ConfigError
from lavis_dlip.distill import Distiller, build_terms, load_teacher
from lavis_dlip.distill.capture import Capture
from lavis_dlip.distill.divergence import feature_loss, prob_kl, soft_kl
from lavis_dlip.distill.outputs import BlipOutputs, DistillError, hardest_negatives, match_rows, positive_pairs

WIDER = {"vision": {"width": 96, "depth": 3, "heads": 3},
         "text": {"width": 96, "heads": 3, "intermediate_size": 192, "layers": 3},
         "decoder": {"layers": 3, "share": True}}

ALL_TERMS = [
    {"name": "itc"}, {"name": "itm"}, {"name": "lm"},
    {"name": "itc_kd", "temperature": 2.0}, {"name": "itm_kd"}, {"name": "lm_kd"},
    {"name": "hidden", "module": "vision"}, {"name": "hidden", "module": "text", "loss": "cosine"},
    {"name": "hidden", "module": "fusion"}, {"name": "hidden", "module": "decoder"},
    {"name": "attention", "module": "vision"}, {"name": "attention", "module": "text"},
    {"name": "attention", "module": "fusion", "maps": "cross"}, {"name": "attention", "module": "decoder"},
    {"name": "embed", "targets": ["image_feat", "text_feat", "itm_cls", "decoder_cls"]},
]


@pytest.fixture(scope="module")
def pair():
    """A `test` dlip_pretrain student and a wider, deeper random teacher."""
    from lavis.models import load_model

    torch.manual_seed(0)
    student = load_model("dlip_pretrain", "test", is_eval=False, device="cpu").train()
    teacher = load_teacher(OmegaConf.create({"arch": "dlip_pretrain", "model_type": "test", "overrides": WIDER}))
    return student, teacher


def batch(n: int = 8) -> dict:
    g = torch.Generator().manual_seed(1)
    texts = ["a red circle left of a blue square", "two green triangles", "a small yellow star",
             "one big blue square on the right", "a purple circle", "three stars", "a cat", "two dogs"]
    return {"image": torch.randn(n, 3, 64, 64, generator=g), "text_input": texts[:n],
            "epoch": 0, "iters": 0, "num_iters_per_epoch": 1}


def terms(specs, pair):
    student, teacher = pair
    return build_terms(OmegaConf.create(specs), student, teacher.model)


# ---------------------------------------------------------------- math
def test_soft_kl_known_values():
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])
    # p_t = (3/4, 1/4), p_s = (1/2, 1/2)
    assert soft_kl(s, t).item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-6)
    # T = 2: p_t = (sqrt3, 1) / (1 + sqrt3), times T^2
    a = math.sqrt(3) / (1 + math.sqrt(3))
    expected = 4 * (a * math.log(2 * a) + (1 - a) * math.log(2 * (1 - a)))
    assert soft_kl(s, t, temperature=2.0).item() == pytest.approx(expected, abs=1e-6)
    x = torch.randn(4, 7)
    assert soft_kl(x, x.clone()).item() == pytest.approx(0.0, abs=1e-7)


def test_lm_kd_from_the_students_own_log_partition_is_soft_kl():
    """Online lm_kd at T = 1 reads the student's log-partition from its loss
    (SmoothedCrossEntropy), and the teacher's log-partition and softmax from its own:
    the same value and the same gradient as soft_kl."""
    from lavis_dlip.distill.divergence import lse_kl
    from lavis_dlip.models.components import SmoothedCrossEntropy

    torch.manual_seed(0)
    z = (torch.randn(6, 50, dtype=torch.float64) * 3).requires_grad_()
    teacher, y = torch.randn(6, 50, dtype=torch.float64) * 3, torch.randint(0, 50, (6,))
    with torch.no_grad():
        _, t_lse, t_probs = SmoothedCrossEntropy.apply(teacher, y, 0.1)
    results = []
    for way in ("soft_kl", "lse_kl", "both losses' lse", "both losses' lse and the teacher's softmax"):
        ce, lse, _ = SmoothedCrossEntropy.apply(z, y, 0.1)
        if way == "soft_kl":
            kl = soft_kl(z, teacher)
        elif way == "lse_kl":
            kl = lse_kl(z, lse, teacher)
        else:
            kl = lse_kl(z, lse, teacher, t_lse, t_probs if "softmax" in way else None)
        results.append((float(kl), torch.autograd.grad(ce.sum() + kl, z)[0]))
    assert results[0][0] > 0.1
    for value, grad in results[1:]:
        assert value == pytest.approx(results[0][0], rel=1e-9)
        torch.testing.assert_close(grad, results[0][1])


def test_masked_rows_are_ignored():
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    base = soft_kl(s, t, mask=mask)
    s2, t2 = s.clone(), t.clone()
    s2[~mask], t2[~mask] = 100.0 * torch.randn(5, 11), -50.0  # padding changes nothing
    assert soft_kl(s2, t2, mask=mask).item() == pytest.approx(base.item(), rel=1e-6)
    manual = torch.stack([soft_kl(s[b, :k], t[b, :k]) * k for b, k in ((0, 3), (1, 2))]).sum() / 5
    assert base.item() == pytest.approx(manual.item(), rel=1e-5)


def test_prob_kl_and_feature_loss_known_values():
    p = torch.tensor([[0.5, 0.5]])
    q = torch.tensor([[0.75, 0.25]])
    assert prob_kl(p, q).item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-6)
    assert prob_kl(q, q).item() == pytest.approx(0.0, abs=1e-7)
    a, b = torch.tensor([[[1.0, 0.0], [3.0, 4.0]]]), torch.tensor([[[0.0, 0.0], [3.0, 0.0]]])
    assert feature_loss(a, b, "mse").item() == pytest.approx((0.5 + 8.0) / 2)
    assert feature_loss(a, b, "mse", mask=torch.tensor([[1, 0]])).item() == pytest.approx(0.5)
    assert feature_loss(a, a, "cosine").item() == pytest.approx(0.0, abs=1e-6)
    assert feature_loss(a[:, 1:], b[:, 1:], "cosine").item() == pytest.approx(1 - 0.6)


# ---------------------------------------------------------------- terms on known outputs
def test_each_term_is_zero_for_identical_outputs_and_matches_a_hand_case(pair):
    itc, itm, lm, hidden, attn, embed = terms([
        {"name": "itc_kd"}, {"name": "itm_kd"}, {"name": "lm_kd"},
        {"name": "hidden", "module": "vision", "layer_map": {0: 0}, "project": False},
        {"name": "attention", "module": "text", "layer_map": {1: 2}},
        {"name": "embed", "targets": ["image_feat"]},
    ], pair)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 3, generator=g)
    same = SimpleNamespace(itc_logits=logits, itm_logits=lambda pairs: logits[:, :2],
                           lm_rows=lambda keep=None: (logits, torch.ones(1, 3, dtype=torch.bool)),
                           lm_lse=lambda: torch.logsumexp(logits, -1),  # as a DLIP decoder's loss gives it
                           lm_probs=lambda: torch.softmax(logits, -1),  # and its softmax
                           image_feat=torch.randn(3, 32, generator=g))
    for term in (itc, itm, lm):
        assert term(same, same).item() == pytest.approx(0.0, abs=1e-6), term.key
    # hand case: a 2-sample batch whose teacher is sure and whose student is uniform
    s = SimpleNamespace(itc_logits=torch.zeros(2, 2), itm_logits=lambda pairs: torch.zeros(2, 2),
                        lm_rows=lambda keep=None: (torch.zeros(1, 2), torch.tensor([[True, False]])),
                        lm_lse=lambda: None)  # a decoder whose loss gave no log-partition (LAVIS's)
    t = SimpleNamespace(itc_logits=torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(3.0)]]),
                        itm_logits=lambda pairs: torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0]]),
                        lm_rows=lambda keep: (torch.tensor([[math.log(3.0), 0.0]]), keep),  # the row keep selects
                        lm_lse=lambda: torch.tensor([math.log(4.0)]),
                        lm_probs=lambda: torch.tensor([[0.75, 0.25]]))  # its loss's softmax
    known = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    for term in (itc, itm, lm):
        assert term(s, t).item() == pytest.approx(known, abs=1e-6), term.key
    s.lm_lse = lambda: torch.tensor([math.log(2.0)])  # the student's own: lm_kd reads both log-partitions
    assert lm(s, t).item() == pytest.approx(known, abs=1e-6)

    # per-layer terms read layer(stream, kind, index) -> (tensor, mask)
    x = torch.randn(2, 5, 64, generator=g)
    probs = torch.softmax(torch.randn(2, 3, 4, 4, generator=g), -1)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    out = SimpleNamespace(layer=lambda stream, kind, i: (x if stream == "vision" else probs, mask))
    other = SimpleNamespace(layer=lambda *a: (torch.randn(2, 4, 96), None))
    with pytest.raises(ConfigError, match=r"terms\[3\]: student vision layer 0 \(2, 5, 64\).*do not align"):
        hidden(out, other)  # 5 tokens vs 4: different image or patch size
    assert attn(out, out).item() == pytest.approx(0.0, abs=1e-6)
    uniform = torch.full((2, 3, 4, 4), 0.25)
    s_att = SimpleNamespace(layer=lambda *a: (uniform, mask))
    t_att = SimpleNamespace(layer=lambda *a: (torch.eye(4).expand(2, 3, 4, 4).clamp_min(0.0), mask))
    # teacher one-hot rows, student uniform: KL = log 4 on each real query row
    assert attn(s_att, t_att).item() == pytest.approx(math.log(4.0), rel=1e-4)
    # embed: the student (32-d ITC features) and teacher (32-d) need no projection; MSE
    a, b = torch.zeros(3, 32), torch.ones(3, 32)
    assert embed(SimpleNamespace(image_feat=a), SimpleNamespace(image_feat=b)).item() == pytest.approx(1.0)
    assert embed(SimpleNamespace(image_feat=a), SimpleNamespace(image_feat=a)).item() == 0.0


def _kl(teacher_row: list[float], student_row: list[float], t: float) -> float:
    """KL(softmax(teacher / t) || softmax(student / t)) * t^2, by hand."""
    def softmax(row):
        e = [math.exp(x / t) for x in row]
        return [x / sum(e) for x in e]
    p, q = softmax(teacher_row), softmax(student_row)
    return t * t * sum(a * math.log(a / b) for a, b in zip(p, q))


def test_kd_terms_on_asymmetric_hand_cases(pair):
    """Cases a half-implemented term fails: an asymmetric teacher (ITC's text-to-image half
    differs from its image-to-text half), temperatures other than 1 on both models, and
    per-head attention with padding that changes the value."""
    itc, itm, attn = terms([{"name": "itc_kd", "temperature": 2.0}, {"name": "itm_kd", "temperature": 3.0},
                            {"name": "attention", "module": "text", "head_map": "matched", "layer_map": {0: 0}}], pair)
    t_itc, s_itc = [[2.0, 0.0, -1.0], [1.0, 1.0, 0.5], [0.0, 3.0, 1.0]], [[0.5, 0.0, 0.0], [0.0, 1.0, 0.0],
                                                                          [1.0, 0.0, -1.0]]
    cols = lambda m: [list(c) for c in zip(*m)]  # noqa: E731
    i2t = sum(_kl(a, b, 2.0) for a, b in zip(t_itc, s_itc)) / 3
    t2i = sum(_kl(a, b, 2.0) for a, b in zip(cols(t_itc), cols(s_itc))) / 3
    assert abs(i2t - t2i) > 0.05  # the case tells the two halves apart
    got = itc(SimpleNamespace(itc_logits=torch.tensor(s_itc)), SimpleNamespace(itc_logits=torch.tensor(t_itc)))
    assert got.item() == pytest.approx(0.5 * (i2t + t2i), rel=1e-5)

    t_itm, s_itm = [[2.0, -1.0], [0.0, 3.0], [1.5, 1.0]], [[0.5, 0.0], [1.0, 2.0], [-1.0, 1.0]]
    want = sum(_kl(a, b, 3.0) for a, b in zip(t_itm, s_itm)) / 3
    assert abs(want - sum(_kl(a, b, 1.0) for a, b in zip(t_itm, s_itm)) / 3) > 0.05  # T matters here
    got = itm(SimpleNamespace(itm_logits=lambda pairs: torch.tensor(s_itm)),
              SimpleNamespace(itm_logits=lambda pairs: torch.tensor(t_itm)))
    assert got.item() == pytest.approx(want, rel=1e-5)

    # attention [B=2, H=2, L=3, L=3]; sample 1's last token is padding: its query row is ignored
    g = torch.Generator().manual_seed(3)
    s_att = torch.softmax(torch.randn(2, 2, 3, 3, generator=g), -1)
    t_att = torch.softmax(3 * torch.randn(2, 2, 3, 3, generator=g), -1)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    kept = [(b, h, q) for b in range(2) for h in range(2) for q in range(3) if mask[b, q]]
    by_hand = sum(float((t_att[b, h, q] * (t_att[b, h, q] / s_att[b, h, q]).log()).sum())
                  for b, h, q in kept) / len(kept)
    everything = float((t_att * (t_att / s_att).log()).sum(-1).mean())
    head_mean = float(prob_kl(s_att.mean(1, keepdim=True), t_att.mean(1, keepdim=True), mask[:, None, :]))
    assert abs(by_hand - everything) > 0.01 and abs(by_hand - head_mean) > 0.01
    got = attn(SimpleNamespace(layer=lambda *a: (s_att, mask)), SimpleNamespace(layer=lambda *a: (t_att, mask)))
    assert got.item() == pytest.approx(by_hand, rel=1e-5)


def test_hidden_projects_when_widths_differ(pair):
    (hidden,) = terms([{"name": "hidden", "module": "vision", "layer_map": {0: 2}}], pair)
    proj = hidden.proj["0"]
    assert isinstance(proj, torch.nn.Linear) and (proj.in_features, proj.out_features) == (64, 96)
    xs, xt = torch.randn(2, 17, 64), torch.randn(2, 17, 96)
    s = SimpleNamespace(layer=lambda *a: (xs, None))
    t = SimpleNamespace(layer=lambda *a: (xt, None))
    assert hidden(s, t).item() == pytest.approx(((proj(xs) - xt) ** 2).mean().item(), rel=1e-6)
    assert hidden.student_points() == {("vision", "hidden", 0)} and hidden.teacher_points() == {("vision", "hidden", 2)}


def test_term_config_errors(pair):
    with pytest.raises(ConfigError, match=r"distill.terms\[0\].name: 'itc_dk' is not a loss term"):
        terms([{"name": "itc_dk"}], pair)
    with pytest.raises(ConfigError, match=r"distill.terms\[0\].*temprature.*temperature"):
        terms([{"name": "itc_kd", "temprature": 2}], pair)
    with pytest.raises(ConfigError, match=r"terms\[0\].temperature: must be > 0"):
        terms([{"name": "itc_kd", "temperature": 0}], pair)
    with pytest.raises(ConfigError, match=r"terms\[1\]: a second term logs as loss_hidden_vision"):
        terms([{"name": "hidden", "module": "vision"}, {"name": "hidden", "module": "vision"}], pair)
    with pytest.raises(ConfigError, match=r"terms\[0\]: missing key 'module'"):
        terms([{"name": "hidden"}], pair)
    with pytest.raises(ConfigError, match=r"terms\[0\].maps: 'cross' is not one of self"):
        terms([{"name": "attention", "module": "vision", "maps": "cross"}], pair)
    assert [t.key for t in terms([{"name": "hidden", "module": "text", "key": "t2"}], pair)] == ["t2"]


# ---------------------------------------------------------------- capture and teacher
def test_capture_records_calls_and_only_requested_layers(pair):
    student, _ = pair
    points = {("vision", "attn", 1), ("text", "hidden", 0), ("fusion", "cross", 1), ("decoder", "hidden", 1)}
    with torch.no_grad(), Capture(student, points) as rec:
        student(batch())
    assert [c.module for c in rec.calls] == ["text", "fusion", "fusion", "decoder"]  # momentum passes unhooked
    assert set(rec.vision_layers) == {("attn", 1)}
    assert rec.vision_layers[("attn", 1)].shape == (8, 2, 17, 17)
    text, pos, neg, dec = rec.calls
    assert set(text.layers) == {("hidden", 0)} and set(pos.layers) == {("cross", 1)} and neg.layers == {}
    assert pos.layers[("cross", 1)].shape[-1] == 17  # queries attend to 16 patches + [CLS]
    assert torch.allclose(pos.layers[("cross", 1)].sum(-1), torch.ones(()))
    assert pos.encoder_hidden_states is rec.image and neg.encoder_hidden_states.shape[0] == 16
    assert torch.equal(text.attention_mask, pos.attention_mask) and dec.labels is not None
    scored = dec.labels[:, 1:] != -100  # the student's decoder computes logits there only
    assert dec.logits is None and dec.scored_logits.shape == (int(scored.sum()), 30524)
    for module in student.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, "hooks left behind"


def test_match_rows():
    table = torch.randn(4, 3, 8)
    assert match_rows(table[[2, 0, 0, 3]], table, "x").tolist() == [2, 0, 0, 3]
    with pytest.raises(DistillError, match="negative_all_rank"):
        match_rows(torch.randn(1, 3, 8), table, "x")


def test_hardest_negatives_skip_an_images_own_captions():
    sim = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.3, 0.7], [0.5, 0.4, 0.6]])
    images = torch.zeros(3, 3, 4, 4)
    same_image = positive_pairs({"image": images, "image_id": torch.tensor([7, 7, 3])})
    assert same_image.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    assert hardest_negatives(sim, same_image).tolist() == [2, 2, 0]
    assert positive_pairs({"image": images[:2]}).tolist() == [[True, False], [False, True]]  # pairs data: the diagonal
    # a batch of one image's captions has no negative: each keeps its most similar own caption
    assert hardest_negatives(sim, torch.ones(3, 3, dtype=torch.bool)).tolist() == [0, 2, 2]


def test_itm_kd_on_mined_pairs_is_the_kl_of_both_models_on_the_teachers_pairs(pair):
    """``pairs: mined``: per image the teacher's most similar caption of another image;
    the student scores the same pairs in one more fused pass of its own."""
    student, teacher = pair
    (term,) = terms([{"name": "itm_kd", "pairs": "mined"}], pair)
    distiller = Distiller([term])
    samples = {**batch(), "image_id": torch.tensor([0, 0, 1, 2, 3, 4, 5, 6])}  # captions 0 and 1: one image
    positives = positive_pairs(samples)
    student.eval()
    try:
        with torch.no_grad(), Capture(student, distiller.student_points) as rec:
            out = student(samples)
        t = teacher.replay(samples["image"], rec, distiller.needs, distiller.teacher_points, positives=positives)
        j = hardest_negatives(t.image_feat @ t.text_feat.t(), positives)
        assert j[0] != 1 and j[1] != 0 and all(j[i] != i for i in range(8))
        fused = rec.find("fusion")
        assert torch.equal(t.mined.input_ids, fused.input_ids[j])
        s = BlipOutputs(student, rec, out)
        with torch.no_grad():
            hidden = student.text_encoder(fused.input_ids[j], attention_mask=fused.attention_mask[j],
                                          encoder_hidden_states=rec.image,
                                          encoder_attention_mask=torch.ones(rec.image.shape[:-1], dtype=torch.long),
                                          return_dict=True).last_hidden_state
            by_hand = student.itm_head(hidden[:, 0])
            expected = soft_kl(torch.cat([s.itm_logits("positives"), by_hand]),
                               torch.cat([t.itm_logits("positives"), t.mined.logits]))
            assert term(s, t).item() == pytest.approx(expected.item(), rel=1e-5)
        with pytest.raises(ValueError, match="positive pairs"):
            teacher.replay(samples["image"], rec, distiller.needs, distiller.teacher_points)
    finally:
        student.train()


def test_itm_kd_on_all_pairs_has_the_teacher_score_exactly_the_students_negatives(pair):
    """``pairs: all``: the teacher's negative logits are its ITM head on the very (text,
    image) pairs the student's hard-negative mining drew, computed here by hand."""
    student, teacher = pair
    (term,) = terms([{"name": "itm_kd", "pairs": "all"}], pair)
    distiller = Distiller([term])
    samples = batch()
    torch.manual_seed(5)
    with torch.no_grad(), Capture(student, distiller.student_points) as rec:
        student(samples)
    t = teacher.replay(samples["image"], rec, distiller.needs, distiller.teacher_points)
    neg = rec.find("fusion", 1)  # LAVIS's negatives: 8 images with mined texts, 8 texts with mined images
    pos = rec.find("fusion")
    images = match_rows(neg.encoder_hidden_states, rec.image, "negatives")
    texts = [next(j for j in range(8) if torch.equal(neg.input_ids[r], pos.input_ids[j])) for r in range(16)]
    assert all(images[r] != texts[r] for r in range(16))  # each a pair of one image and another's caption
    m = teacher.model
    with torch.no_grad():
        embeds = m.visual_encoder.forward_features(samples["image"])[images]
        hidden = m.text_encoder(neg.input_ids, attention_mask=neg.attention_mask, encoder_hidden_states=embeds,
                                encoder_attention_mask=torch.ones(embeds.shape[:-1], dtype=torch.long),
                                return_dict=True).last_hidden_state
        by_hand = m.itm_head(hidden[:, 0])
    logits = t.itm_logits("all")
    assert logits.shape == (24, 2)
    torch.testing.assert_close(logits[8:], by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[:8], t.itm_logits("positives"))


def test_teacher_replay_matches_the_teacher_run_by_hand(pair):
    import torch.nn.functional as F

    student, teacher = pair
    distiller = Distiller(terms(ALL_TERMS, pair))
    samples = batch()
    with torch.no_grad(), Capture(student, distiller.student_points) as rec:
        student(samples)
    t = teacher.replay(samples["image"], rec, distiller.needs, distiller.teacher_points)
    m = teacher.model
    with torch.no_grad():
        img = m.visual_encoder.forward_features(samples["image"])
        text = rec.find("text")
        txt = m.text_encoder(text.input_ids, attention_mask=text.attention_mask, return_dict=True, mode="text")
        expected = F.normalize(m.vision_proj(img[:, 0]), dim=-1) @ F.normalize(m.text_proj(
            txt.last_hidden_state[:, 0]), dim=-1).t() / m.temp.clamp(0.001, 0.5)
    assert torch.allclose(t.itc_logits, expected, atol=1e-5)
    keep = rec.find("decoder").labels[:, 1:] != -100
    with torch.no_grad():  # the teacher's logits at the student's scored positions, as its own decoder gives them
        dec = rec.find("decoder")
        full = m.text_decoder(dec.input_ids, attention_mask=dec.attention_mask, encoder_hidden_states=img,
                              return_dict=True).logits[:, :-1][keep]
    assert t.itm_logits("all").shape == (24, 2)
    assert torch.allclose(t.lm_rows(keep)[0], full, atol=1e-4)
    assert set(t.records.vision_layers) == {(k, i) for _, k, i in distiller.teacher_points if _ == "vision"}


def test_step_logs_every_term_and_grads_reach_only_student_and_projections(pair):
    student, teacher = pair
    distiller = Distiller(terms(ALL_TERMS, pair))
    student.dlip_distill = distiller
    try:
        student.zero_grad(set_to_none=True)
        before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
        calls = {"image": 0, "bert": 0, "decoder": 0}

        def count(name):
            return lambda *_: calls.__setitem__(name, calls[name] + 1)

        m = teacher.model
        counters = [m.visual_encoder.norm.register_forward_hook(count("image")),
                    m.text_encoder.embeddings.register_forward_hook(count("bert")),
                    m.text_decoder.register_forward_hook(count("decoder"))]
        loss, logged = distiller.step(student, student, teacher, batch())
        for handle in counters:
            handle.remove()
        # the teacher ran once: one image pass, text + positive + negative fused passes, one decoder pass
        assert calls == {"image": 1, "bert": 3, "decoder": 1}
        assert set(logged) == {f"loss_{t.key}" for t in distiller.terms}
        assert all(torch.isfinite(v) and v.item() >= 0 for v in logged.values())
        expected = sum(t.weight * logged[f"loss_{t.key}"] for t in distiller.terms)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
        loss.backward()
        assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())
        projections = list(distiller.parameters())
        assert projections and all(p.grad is not None and p.grad.abs().sum() > 0 for p in projections)
        for name in ("visual_encoder.blocks.0.attn.qkv.weight",
                     "text_encoder.encoder.layer.0.attention.self.query.weight",
                     "text_decoder.cls.predictions.transform.dense.weight", "itm_head.weight", "vision_proj.weight"):
            assert student.get_parameter(name).grad.abs().sum() > 0, name
        assert all(torch.equal(before[k], v) for k, v in teacher.model.state_dict().items())
    finally:
        del student.dlip_distill
