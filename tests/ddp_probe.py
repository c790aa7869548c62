"""Run by test_distributed.py under ``torchrun``: trains a run config through
lavis_dlip's runner, then saves what this rank ended with, so that the test can
compare the ranks (not a test itself)."""

from __future__ import annotations

import sys

import torch


def main(cfg_path: str, out: str, *options: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from lavis_dlip.cli import build_runner
    from lavis_dlip.config import load_config

    runner = build_runner(load_config(cfg_path, list(options)))
    initial = {k: v.clone() for k, v in runner._model.state_dict().items()}  # before DDP wraps it
    runner.train()
    wrapped = runner.model
    student = runner.unwrap_dist_model(wrapped)
    teacher = runner.task.teacher.model
    teacher_params = {id(p) for p in teacher.parameters()}
    torch.save({
        "world_size": torch.distributed.get_world_size(),
        "ddp": isinstance(wrapped, DistributedDataParallel),
        "teacher_inside_ddp": any(id(p) in teacher_params for p in wrapped.parameters()),
        "teacher_trainable": any(p.requires_grad for p in teacher.parameters()),
        "initial": initial,
        "student": student.state_dict(),
        "teacher": teacher.state_dict(),
        "optimized": sum(len(g["params"]) for g in runner.optimizer.param_groups),
    }, f"{out}/rank{torch.distributed.get_rank()}.pth")


if __name__ == "__main__":
    main(*sys.argv[1:])
