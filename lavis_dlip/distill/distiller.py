"""One distillation step: the student's LAVIS forward under capture hooks, the
frozen teacher replayed once on what the student saw, and the weighted terms."""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from lavis_dlip.errors import ConfigError

from lavis_dlip.distill.cache import CacheReader
from lavis_dlip.distill.capture import Capture
from lavis_dlip.distill.losses import LossTerm
from lavis_dlip.distill.outputs import BlipOutputs, positive_pairs
from lavis_dlip.distill.teacher import FrozenTeacher

ATTRIBUTE = "dlip_distill"  # where the terms live on the student (their projections train with it)
BALANCE = ("none", "initial")  # distill.balance

logger = logging.getLogger(__name__)


class Distiller(nn.Module):
    """The configured loss terms. Attached to the student as ``dlip_distill`` so
    that their projections are optimised, synchronised under DDP and saved in
    resume checkpoints with it; students built for inference do not have it and
    drop these keys when loading a checkpoint."""

    def __init__(self, terms: list[LossTerm], balance: str = "none"):
        super().__init__()
        if balance not in BALANCE:
            raise ConfigError(f"distill.balance: '{balance}' is not one of {', '.join(BALANCE)}")
        self.terms = nn.ModuleList(terms)
        self.balance = balance
        self.needs: set[str] = set().union(*(t.needs for t in terms))
        self.student_points = set().union(*(t.student_points() for t in terms))
        self.teacher_points = set().union(*(t.teacher_points() for t in terms))
        self.uses_teacher = not all(t.teacher_free for t in terms)
        # distill.balance: initial: each term's factor, set on the first step; buffers, so that a
        # resume checkpoint (the student's state) holds them and a resumed run keeps them
        self.register_buffer("balance_scales", torch.ones(len(terms)))
        self.register_buffer("balanced", torch.tensor(balance == "none"))

    def weighted(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """The step's loss: the terms' weighted sum, balanced (``distill.balance: initial``)
        so that on the first step each term is its weight's share of the total: factor
        c_k = T / (W v_k), T = sum_k w_k v_k, W = sum_k w_k, v_k term k's first value (the
        processes' mean under DDP). The total stays T; a term whose first value is not positive keeps 1."""
        if self.balance == "none":
            return sum(term.weight * values[term.key] for term in self.terms)
        if not bool(self.balanced):
            first = torch.stack([values[t.key].detach().float() for t in self.terms])
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(first)
                first /= torch.distributed.get_world_size()
            weights = torch.tensor([t.weight for t in self.terms], device=first.device)
            total, share = (weights * first).sum(), weights.sum()
            scales = torch.where(first > 0, total / (share * first.clamp_min(1e-12)), torch.ones_like(first))
            self.balance_scales.copy_(scales)
            self.balanced.fill_(True)
            logger.info("distill.balance: initial: %s",
                        ", ".join(f"{t.key} x{float(c):.3g}" for t, c in zip(self.terms, scales)))
        return sum(term.weight * self.balance_scales[i] * values[term.key] for i, term in enumerate(self.terms))

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
            loss = self.weighted(values)
            return {"loss": loss, **{f"loss_{k}": v for k, v in values.items()}}

        student.forward = forward  # this call only: the instance attribute shadows the class's forward
        try:
            out = model(samples)
        finally:
            del student.forward
        return out.pop("loss"), out
