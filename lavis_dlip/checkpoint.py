"""Checkpoint files: read with errors that name the file and the config key,
written so that they survive crashes, with the RNG state that makes resumes exact."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import tempfile
from typing import Any

import numpy as np
import torch

from lavis_dlip.errors import CheckpointError, RunStopped
from lavis_dlip.paths import is_url, local_path


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
    except BaseException as err:
        full = isinstance(err, (OSError, RuntimeError)) and _no_space(directory, err)
        if os.path.exists(tmp):
            os.unlink(tmp)
        if full:  # torch says "unexpected pos ...", which names neither the file nor the cause
            kept = "the previous file is kept" if os.path.exists(path) else "nothing was written"
            raise RunStopped(f"cannot write {path}: no space left on the device "
                             f"({shutil.disk_usage(directory).free / 2**20:.0f} MiB free after removing "
                             f"the partial file); {kept}") from None
        raise


FULL_BELOW = 16 * 2**20  # bytes free under which a failed write is taken for a full disk


def _no_space(directory: str, err: BaseException) -> bool:
    """Whether a write failed for want of space: ENOSPC, or (torch's zip writer drops the
    errno) the file system has next to nothing left while the partial file is still there."""
    if getattr(err, "errno", None) == errno.ENOSPC:
        return True
    try:
        return shutil.disk_usage(directory).free < FULL_BELOW
    except OSError:
        return False


def atomic_link(src: str, path: str) -> None:
    """``path`` becomes the same file as ``src``: a hard link where the file system has
    them (no second copy on disk: a run's per-epoch checkpoint and its latest one share
    their bytes), a copy otherwise; renamed into place like ``atomic_save``. Saving over
    either name later replaces that name only, never the bytes of the other."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".tmp-{os.path.basename(path)}-link")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    try:
        try:
            os.link(src, tmp)
        except OSError:  # no hard links here (another device, some network file systems)
            shutil.copy2(src, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
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


def check_exists(source: str, key: str) -> None:
    """Fail early for a local checkpoint that is not there (URLs are fetched later)."""
    path = local_path(source)
    if not is_url(path) and not os.path.isfile(path):
        what = "a directory, not a checkpoint file" if os.path.isdir(path) else "no such file"
        raise CheckpointError(f"{key}: {source}: {what}; give the path of a .pth file (or a URL)")


def download(url: str, source: str, key: str) -> str:
    """A URL's local copy (LAVIS's download cache); failing, one line naming the file and ``key``."""
    from lavis.common.dist_utils import download_cached_file  # LAVIS: imported once compat has fixed torchvision

    try:
        return download_cached_file(url, check_hash=False, progress=True)
    except Exception as err:  # offline, 404: urllib's message names neither key nor file
        raise CheckpointError(f"{key}: cannot download {source} ({first_line(err)}); "
                              "download it elsewhere and give the local path") from None


def load_bytes(file: Any, source: str, key: str) -> Any:
    """``torch.load`` on the CPU of a path or file object; any failure one line naming ``source`` and ``key``."""
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:  # pickle and zip errors name neither the file nor the fix
        raise CheckpointError(f"{key}: {source} is not a readable PyTorch checkpoint, truncated or of "
                              f"another format ({type(err).__name__}: {first_line(err)})") from None


def read(source: str, key: str) -> Any:
    """``torch.load`` of a path or URL on the CPU; any failure is one line naming the
    file and ``key`` (the config key that named it)."""
    path = local_path(source)
    if is_url(path):
        path = download(path, source, key)
    check_exists(path, key)
    return load_bytes(path, source, key)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_resume(path: str) -> dict[str, Any]:
    """A runner checkpoint to resume from, checked for what resuming needs."""
    checkpoint = read(path, "run.resume_ckpt_path")
    for entry in ("model", "optimizer", "epoch"):
        if not isinstance(checkpoint, dict) or entry not in checkpoint:
            raise CheckpointError(
                f"run.resume_ckpt_path: {path} has no '{entry}' entry; resume needs a checkpoint "
                "written by runner_dlip (checkpoint_latest.pth)"
            )
    return checkpoint
