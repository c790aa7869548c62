"""A study run's record: written into its directory when it finished (what it tested,
how long it took, its options), so that a study run again skips it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Sequence

from lavis_dlip.kept import job_dir

RUN_RECORD = "run.json"


def finished(out: Path) -> Optional[dict]:
    record = out / RUN_RECORD
    if not record.is_file():
        return None
    data = json.loads(record.read_text())
    return data if (Path(data["job"]) / "metrics.json").is_file() else None


def record(out: Path, start: float, options: Sequence[str]) -> dict:
    job = job_dir(out)
    data = {"job": str(job), "seconds": time.time() - start, "options": list(options),
            "test": json.loads((job / "metrics.json").read_text()).get("test", {})}
    tmp = out / (RUN_RECORD + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(out / RUN_RECORD)
    return data
