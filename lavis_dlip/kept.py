"""Trained runs kept for reuse by the demo and by studies (teachers, and the demo's
students): a run is trained once per run yaml, data and options, and its checkpoint and
test metrics are kept under ``$LAVIS_DLIP_KEPT_RUNS`` (default
``~/.cache/lavis_dlip/kept_runs``), complete or absent, never half written. Teacher-output
caches built from a kept teacher live beside it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence
from lavis_dlip.checkpoint import atomic_link
from lavis_dlip.cli import run
from lavis_dlip.runs import is_job_id

ENV = "LAVIS_DLIP_KEPT_RUNS"
DEPRECATED_ENV = "LAVIS_DLIP_TEACHER_CACHE"  # its old name: "cache" is the teacher-output cache

logger = logging.getLogger(__name__)


def kept_dir(cfg_path: Path, data_dir: Path, options: Sequence[str], root: Optional[Path] = None) -> Path:
    """Where a trained run is kept: keyed by its yaml, the data and the options, under
    ``root`` (default ``kept_root()``; a student distilled from a kept teacher is kept in
    the teacher's directory, so that it goes when the teacher goes)."""
    key = hashlib.sha256(b"\n".join([cfg_path.read_bytes(), data_dir.name.encode(), *map(str.encode, options)]))
    key = key.hexdigest()[:10]
    return (root or kept_root()) / f"{cfg_path.stem}-{key}"


def kept_root() -> Path:
    """Where the demo and studies keep what they reuse: trained runs, teacher-output caches, stage times."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    if os.environ.get(DEPRECATED_ENV):
        logger.warning("%s is deprecated: set %s (the same directory)", DEPRECATED_ENV, ENV)
        return Path(os.environ[DEPRECATED_ENV])
    return Path.home() / ".cache" / "lavis_dlip" / "kept_runs"


def drop_earlier_runs(stage_dir: Path) -> None:
    """The run directories (``runs.is_job_id``) of a stage's earlier runs: each left every
    epoch's checkpoint (0.07-0.5 GB a demo stage), and only the latest is read. A teacher's
    stored checkpoint is a hard link or a copy, so it stays."""

    if stage_dir.is_dir():
        for job in stage_dir.iterdir():
            if job.is_dir() and is_job_id(job.name):
                shutil.rmtree(job, ignore_errors=True)


def job_dir(root: Path) -> Path:
    """The newest finished run (it wrote metrics.json) under a run.output_dir."""
    return max((p.parent for p in root.rglob("metrics.json")), key=lambda p: p.stat().st_mtime)


def trained_checkpoint(job: Path) -> Path:
    """The checkpoint a run tested: the best by validation, else its last epoch's."""
    best = job / "checkpoint_best.pth"
    return best if best.is_file() else job / "checkpoint_latest.pth"


def is_kept(kept: Path) -> bool:
    return (kept / "checkpoint.pth").is_file() and (kept / "metrics.json").is_file()


def train_or_reuse(cfg_path: Path, data_dir: Path, output_dir: Path, options: Sequence[str],
                   root: Optional[Path] = None) -> dict:
    """A run's checkpoint and test metrics, trained once per yaml, data and options."""

    kept = kept_dir(cfg_path, data_dir, options, root)
    ckpt, metrics = kept / "checkpoint.pth", kept / "metrics.json"
    if is_kept(kept):
        logger.info("reusing the run kept in %s (delete it to retrain)", kept)
        record = json.loads(metrics.read_text())
        return {"checkpoint": ckpt, "test": record["test"], "seconds": 0.0, "cached": True,
                "trained_s": record.get("seconds")}
    drop_earlier_runs(output_dir)
    t0 = time.time()
    run(str(cfg_path), [f"run.output_dir={output_dir}", *options])
    seconds = time.time() - t0
    job = job_dir(output_dir)
    record = json.loads((job / "metrics.json").read_text())
    tmp = kept.with_name(kept.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    atomic_link(str(trained_checkpoint(job)), str(tmp / "checkpoint.pth"))  # a link: the run's file is not stored twice
    (tmp / "metrics.json").write_text(json.dumps({**record, "seconds": seconds}, indent=2))
    shutil.rmtree(kept, ignore_errors=True)
    tmp.rename(kept)  # complete or absent, never half written
    return {"checkpoint": ckpt, "test": record["test"], "seconds": seconds, "cached": False, "trained_s": seconds}
