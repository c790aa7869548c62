"""Checkpoint files that survive crashes, and RNG state that makes resumes exact."""

from __future__ import annotations

import os
import random
import tempfile
from typing import Any

import numpy as np
import torch


def atomic_save(obj: Any, path: str) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over
    ``path``: a crash mid-write leaves the previous good file in place, and its
    temporary file is removed by the next save. The file gets the permissions of
    any other file the process creates (umask), so a group can read it."""
    directory = os.path.dirname(os.path.abspath(path))
    prefix = ".tmp-" + os.path.basename(path)
    for name in os.listdir(directory):  # left by a save that was killed: never a good file
        if name.startswith(prefix):
            os.unlink(os.path.join(directory, name))
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=directory)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # as the run's other files (mkstemp makes 0600)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from (dropout, ITM negative sampling, augmentation)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load(path: str) -> dict[str, Any]:
    """Load a runner checkpoint on the CPU, with an error that says what is wrong."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"run.resume_ckpt_path: no such file: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise RuntimeError(f"run.resume_ckpt_path: {path} is not a readable checkpoint ({err})") from err
    for key in ("model", "optimizer", "epoch"):
        if key not in checkpoint:
            raise RuntimeError(
                f"run.resume_ckpt_path: {path} has no '{key}' entry; resume needs a checkpoint "
                "written by runner_dlip (checkpoint_latest.pth)"
            )
    return checkpoint
