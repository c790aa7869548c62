"""One distillation step: the student's LAVIS forward under capture hooks, the
frozen teacher replayed once on what the student saw, and the weighted terms."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lavis_dlip.distill.cache import CacheReader
from lavis_dlip.distill.capture import Capture
from lavis_dlip.distill.losses import LossTerm
from lavis_dlip.distill.outputs import BlipOutputs, positive_pairs
from lavis_dlip.distill.teacher import FrozenTeacher

ATTRIBUTE = "dlip_distill"  # where the terms live on the student (their projections train with it)


class Distiller(nn.Module):
    """The configured loss terms. Attached to the student as ``dlip_distill`` so
    that their projections are optimised, synchronised under DDP and saved in
    resume checkpoints with it; students built for inference do not have it and
    drop these keys when loading a checkpoint."""

    def __init__(self, terms: list[LossTerm]):
        super().__init__()
        self.terms = nn.ModuleList(terms)
        self.needs: set[str] = set().union(*(t.needs for t in terms))
        self.student_points = set().union(*(t.student_points() for t in terms))
        self.teacher_points = set().union(*(t.teacher_points() for t in terms))
        self.uses_teacher = not all(t.teacher_free for t in terms)

    def step(self, model: nn.Module, student: nn.Module, teacher: Optional[FrozenTeacher],
             samples: dict, cache: Optional[CacheReader] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``model`` is what to call (the student, maybe DDP-wrapped); ``student`` the
        module itself; ``cache``: read the teacher's outputs instead of replaying it.
        Returns the weighted loss and every term, unweighted.

        The whole step runs as the student's forward, inside ``model(samples)``: under DDP
        the terms' projections are then in the graph of the forward's output, which
        ``find_unused_parameters`` searches (computed after the forward, they would be taken
        for unused and then receive gradients: "marked ready twice")."""
        lavis_forward = student.forward

        def forward(batch: dict) -> dict[str, torch.Tensor]:
            with Capture(student, self.student_points) as records:
                output = lavis_forward(batch)
            s = BlipOutputs(student, records, output)
            t = None
            if self.uses_teacher and cache is not None:
                t = cache.outputs(batch, records, teacher)
            elif self.uses_teacher:
                t = teacher.replay(batch["image"], records, self.needs, self.teacher_points,
                                   positives=positive_pairs(batch))
            values = {term.key: term(s, t) for term in self.terms}
            loss = sum(term.weight * values[term.key] for term in self.terms)
            return {"loss": loss, **{f"loss_{k}": v for k, v in values.items()}}

        student.forward = forward  # this call only: the instance attribute shadows the class's forward
        try:
            out = model(samples)
        finally:
            del student.forward
        return out.pop("loss"), out
