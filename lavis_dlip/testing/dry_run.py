"""Build a distillation config's student, teacher and terms with random weights,
offline: checks that a paper-scale config fits together (inheritance, shapes,
layer maps, projections) and measures its cost, without downloading a checkpoint
or data.

What would be downloaded is replaced by random weights of the same shape: the
distillation teacher and a ``model.init.teacher`` given as ``{arch, model_type}``
are built with random weights (``load_weights: False``); a ``pretrained`` vision
source given by URL becomes a random 12-block timm ViT of the student's width
and ``source_heads`` (DeiT's depth). Inheritance then runs as it would for real.
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional, Sequence

from omegaconf import OmegaConf

from lavis_dlip.config import load_config
from lavis_dlip.blip.tokenizer import tokenizer_source
from lavis_dlip.models.components import vision_config
from lavis_dlip.models.sources import TIMM
from lavis_dlip.testing.stand_ins import timm_vit_checkpoint

RANDOM = ("distill.teacher.load_weights=False", "distill.teacher.checkpoint=null")
STAND_IN_DEPTH = 12  # DeiT's
# stand-in ViTs are deterministic (seed 0): written once per shape, reused by every dry run
STAND_INS = os.path.join(os.path.expanduser("~"), ".cache", "lavis_dlip", "stand_ins")


def random_init_options(cfg_path: str, options: Sequence[str] = (), workdir: Optional[str] = None) -> list[str]:
    """``--options`` that replace the downloads of ``model.init`` by random weights
    (a stand-in ViT file in ``workdir``, default ``STAND_INS``)."""

    opts = []
    cfg = load_config(cfg_path, [*options, *RANDOM])
    init = cfg.model_cfg.get("init") or {}
    if OmegaConf.is_dict(init.get("teacher")):
        opts += ["model.init.teacher.load_weights=False", "model.init.teacher.checkpoint=null"]
    vision = init.get("vision")
    source = str(vision.get("source")) if OmegaConf.is_dict(vision) else ""
    if vision is not None and vision.get("strategy") == "pretrained" and ("://" in source or source.startswith(TIMM)):
        v = vision_config(cfg.model_cfg)
        heads = int(vision.get("source_heads") or v["heads"])  # a timm model's heads: the student's
        name = f"vit_{v['width']}x{STAND_IN_DEPTH}_{heads}h_{v['image_size']}px_p{v['patch_size']}.pth"
        path = os.path.join(workdir or STAND_INS, name)
        if not os.path.isfile(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:  # complete or absent: runs share it
                part = timm_vit_checkpoint(os.path.join(tmp, name), v["width"], STAND_IN_DEPTH, heads,
                                           image_size=v["image_size"], patch_size=v["patch_size"])
                os.replace(part, path)
        opts += [f"model.init.vision.source={path}", f"model.init.vision.source_heads={heads}"]
    return opts


def build_random(cfg_path: str, tokenizer: Optional[str] = None, options: Sequence[str] = (),
                 workdir: Optional[str] = None, random_init: bool = True):
    """``(task, student)``; the frozen teacher is ``task.teacher`` and the terms
    ``student.dlip_distill``. ``tokenizer`` replaces both models' (same vocabulary);
    ``random_init=False`` keeps ``model.init``'s sources (give local ones in ``options``)."""
    import lavis.tasks as tasks

    opts = [*RANDOM, *options]
    if tokenizer:
        opts += [f"model.tokenizer={tokenizer}", f"distill.teacher.overrides.tokenizer={tokenizer}"]
    if random_init:
        opts += random_init_options(cfg_path, opts, workdir)
    cfg = load_config(cfg_path, opts)
    task = tasks.setup_task(cfg)
    with tokenizer_source(cfg.model_cfg.get("tokenizer")):
        model = task.build_model(cfg)
    return task, model
