"""Build a distillation config's student, teacher and terms with random weights,
offline: checks that a paper-scale config fits together (shapes, layer maps,
projections) and measures its cost, without downloading a checkpoint or data."""

from __future__ import annotations

from typing import Optional, Sequence

from lavis_dlip.config import load_config
from lavis_dlip.models.tokenizer import tokenizer_source

RANDOM = ("model.init=null", "distill.teacher.load_weights=False", "distill.teacher.checkpoint=null")


def build_random(cfg_path: str, tokenizer: Optional[str] = None, options: Sequence[str] = ()):
    """``(task, student)``; the frozen teacher is ``task.teacher`` and the terms
    ``student.dlip_distill``. ``tokenizer`` replaces both models' (same vocabulary)."""
    import lavis.tasks as tasks

    opts = list(RANDOM)
    if tokenizer:
        opts += [f"model.tokenizer={tokenizer}", f"distill.teacher.overrides.tokenizer={tokenizer}"]
    cfg = load_config(cfg_path, [*opts, *options])
    task = tasks.setup_task(cfg)
    with tokenizer_source(cfg.model_cfg.get("tokenizer")):
        model = task.build_model(cfg)
    return task, model
