"""A run's directory under ``run.output_dir``: its job id and claiming it.

LAVIS names a run's directory by ``now()`` (10-minute resolution), so two runs
started in one window write into one directory. Here the id has second resolution,
is the same on every rank, and the directory is claimed with an exclusive ``mkdir``:
a second run that starts in the same second gets ``<id>-2`` (then ``-3``, ...), never
the first run's directory.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

JOB_ID = "%Y%m%d%H%M%S"
_SUFFIXED = re.compile(r"^(\d{14})(?:-([2-9]|[1-9]\d+))?$")


def make_job_id() -> str:
    """This second as a job id, identical on every rank of a process group."""
    import torch.distributed as dist
    from lavis.common.dist_utils import is_dist_avail_and_initialized

    job = [time.strftime(JOB_ID)]
    if is_dist_avail_and_initialized():
        dist.broadcast_object_list(job, src=0)
    return job[0]


def is_job_id(name: str) -> bool:
    """Whether ``name`` is a run directory's name as ``claim_job_dir`` makes it."""
    match = _SUFFIXED.match(name)
    if match is None:
        return False
    try:
        return time.strftime(JOB_ID, time.strptime(match.group(1), JOB_ID)) == match.group(1)
    except ValueError:
        return False


def claim_job_dir(base: Path, job_id: str) -> Path:
    """Create and return ``base/job_id``, or ``base/job_id-N`` for the first N that no
    other run has claimed; ``mkdir`` is atomic, so concurrent runs never share one."""
    base.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        path = base / (job_id if n == 1 else f"{job_id}-{n}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            n += 1
