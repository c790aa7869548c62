"""The README's two commands timed on a fresh clone, as a new user runs them.

Clones this repository's HEAD into an empty directory and, with pip's cache off and empty
demo-data, kept-runs and matplotlib directories, times ``make install``, ``make test``,
``make demo`` (teachers trained, caches built) and ``make demo`` again (teachers and caches
reused); on request ``make study`` (the shipped studies, from nothing: teachers, caches, every
run). Writes docs/benchmarks/fresh_clone.json (rendered into the docs by
benchmarks/doc_tables.py) and copies the first demo's table to docs/benchmarks/demo.json.
A run of some steps replaces those steps' rows and keeps the others, each row with the
date and commit it was measured at. Run it alone on the machine: anything beside it slows
it down.

    python benchmarks/fresh_clone.py [--steps install test demo demo study] [--keep DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "benchmarks"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", nargs="+", default=["install", "test", "demo", "demo"],
                        choices=["install", "test", "demo", "study"])
    parser.add_argument("--keep", help="clone into this (empty) directory and keep it")
    args = parser.parse_args(argv)
    work = Path(args.keep or tempfile.mkdtemp(prefix="dlip-fresh-"))
    clone, cache = work / "lavis-dlip", work / "cache"
    commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    subprocess.check_call(["git", "clone", "-q", str(ROOT), str(clone)])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAVIS_DLIP_", "VIRTUAL_ENV", "PYTHON"))}
    env.update(PIP_NO_CACHE_DIR="1", MPLCONFIGDIR=str(cache / "mpl"), LAVIS_DLIP_KEPT_RUNS=str(cache / "kept_runs"),
               LAVIS_DLIP_DATA_ROOT=str(cache / "demo_data"))
    runs, seen_demo = [], False
    for step in args.steps:
        log = work / f"{len(runs)}-{step}.log"
        start = time.time()
        with log.open("w") as f:
            rc = subprocess.call(["make", step], cwd=clone, env=env, stdout=f, stderr=subprocess.STDOUT)
        wall = time.time() - start
        demo = "second run: every stage kept from the first" if seen_demo else "first run: teachers trained"
        when = {"install": "into an empty venv", "test": "after make install", "demo": demo,
                "study": "the demo's teachers kept" if seen_demo else "from nothing: teachers trained"}[step]
        install = next((r["wall_s"] for r in runs if r["command"] == "make install"), None)
        runs.append({"command": f"make {step}", "when": when, "wall_s": round(wall, 1), "rc": rc, "log": str(log),
                     "date": datetime.date.today().isoformat(), "commit": commit, "install_s": install})
        print(f"make {step} ({when}): {wall / 60:.1f} min, exit {rc}; log {log}", flush=True)
        if step == "demo" and not seen_demo and rc == 0:
            shutil.copy(clone / "output" / "demo" / "demo.json", OUT / "demo.json")
        seen_demo |= step == "demo"
        if rc != 0 and step != "test":  # a failing test is recorded; nothing runs without an install or a demo
            break
    (OUT / "fresh_clone.json").write_text(json.dumps(merged(runs), indent=2) + "\n")
    print(f"wrote {OUT / 'fresh_clone.json'}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["rc"] == 0 for r in runs) else 1


def merged(runs: list[dict]) -> dict:
    """The file's rows with those of ``runs`` replaced (same command, same "when"), in the
    order install, test, first demo, second demo, study. A row's ``install_s`` is the install of its
    own clone (None if that run had none)."""
    path = OUT / "fresh_clone.json"
    old = json.loads(path.read_text()) if path.exists() else {"runs": []}
    for r in old["runs"]:  # rows written before rows carried their own date and commit
        for key in ("date", "commit", "install_s"):
            r.setdefault(key, old.get(key))
    new = {(r["command"], r["when"]) for r in runs}
    rows = [r for r in old["runs"] if (r["command"], r["when"]) not in new] + runs
    order = ["make install", "make test", "make demo", "make study"]
    rows.sort(key=lambda r: (order.index(r["command"]), "second" in r["when"]))
    return {"cpu": os.cpu_count(), "runs": rows}


if __name__ == "__main__":
    sys.exit(main())
