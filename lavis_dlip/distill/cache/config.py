"""The cache's settings (``distill.cache``), format version and manifest, and its error."""

from __future__ import annotations

import contextvars
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from lavis_dlip.errors import ConfigError, check_keys


VERSION = 2  # 2: chunks packed into one buffer per dtype (save_chunk)
CACHE_KEYS = ("dir", "augmentations", "topk", "dtype", "chunk", "seed")
DEFAULTS = {"augmentations": 1, "topk": 32, "dtype": "float16", "chunk": 256, "seed": 0}
DTYPES = {"float16": torch.float16, "float32": torch.float32}
MANIFEST = "manifest.json"
CACHED = "teacher_cache"  # the batch key of the teacher's outputs, as ReplayDataset collates them
BUILD_COMMAND = "python -m lavis_dlip.cache_teacher --cfg-path <the same yaml>"

# Set while the cache is being built: the directory need not hold a cache yet.
BUILDING: contextvars.ContextVar[bool] = contextvars.ContextVar("lavis_dlip_cache_building", default=False)


class CacheError(ConfigError):
    """The teacher-output cache is missing, incomplete or built for something else."""


def cache_config(raw: Any, base_dir: str = ".") -> Optional[dict[str, Any]]:
    """``distill.cache`` (a directory, or a mapping) with defaults; None when unset."""
    if raw is None:
        return None
    cfg = {"dir": raw} if isinstance(raw, str) else dict(raw)
    check_keys(cfg, CACHE_KEYS, "distill.cache")
    if not cfg.get("dir"):
        raise ConfigError("distill.cache.dir: give the cache directory (python -m lavis_dlip.cache_teacher builds it)")
    cfg = {**DEFAULTS, **cfg}
    for key in ("augmentations", "topk", "chunk"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise ConfigError(f"distill.cache.{key} must be an integer >= 1, got {cfg[key]!r}")
    if not isinstance(cfg["seed"], int) or cfg["seed"] < 0:
        raise ConfigError(f"distill.cache.seed must be an integer >= 0, got {cfg['seed']!r}")
    if cfg["dtype"] not in DTYPES:
        raise ConfigError(f"distill.cache.dtype must be one of {', '.join(DTYPES)}, got {cfg['dtype']!r}")
    cfg["dir"] = os.path.join(base_dir, os.path.expanduser(str(cfg["dir"])))
    if not BUILDING.get():
        complete_manifest(cfg["dir"])
    return cfg


def read_manifest(directory: str) -> Optional[dict[str, Any]]:
    path = Path(directory) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def complete_manifest(directory: str) -> dict[str, Any]:
    """The manifest of a finished cache, or a ``CacheError`` that says how to build it."""
    manifest = read_manifest(directory)
    if manifest is None or not manifest.get("complete"):
        state = "holds no cache" if manifest is None else "holds an unfinished cache (the build was stopped)"
        raise CacheError(f"distill.cache: {directory} {state}; build it with {BUILD_COMMAND}")
    return manifest




def write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)
