"""How long ``import lavis_dlip`` takes, with LAVIS's unused imports deferred and without.

Every CLI call, demo stage and test subprocess pays this import. ``lavis_dlip.compat``
defers the modules ``import lavis`` loads and a run never uses (``compat.DEFERRED``);
``LAVIS_DLIP_EAGER_IMPORTS=1`` imports them at once, as LAVIS does. Fresh interpreters,
the two settings interleaved, median of ``--repeats``; writes docs/benchmarks/import_time.md
(and .json).

    python benchmarks/import_time.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "benchmarks" / "import_time"
PROBE = ("import time, sys; t = time.perf_counter(); import lavis_dlip; import_s = time.perf_counter() - t; "
         "from lavis_dlip import compat; "
         "print(import_s, sum(type(sys.modules.get(m)).__name__ == '_Deferred' for m in compat.DEFERRED))")
SETTINGS = {"deferred (default)": {}, "eager (LAVIS_DLIP_EAGER_IMPORTS=1)": {"LAVIS_DLIP_EAGER_IMPORTS": "1"}}


def one(env: dict[str, str]) -> tuple[float, float, int]:
    """(seconds of the import, seconds of the whole process, modules still deferred)."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True, cwd=REPO).stdout.split()
    return float(out[0]), time.perf_counter() - start, int(out[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    one({})  # warm the page cache: the first read of 2 GB of site-packages is no import cost
    runs: dict[str, list[tuple[float, float, int]]] = {name: [] for name in SETTINGS}
    for _ in range(args.repeats):
        for name, env in SETTINGS.items():
            runs[name].append(one(env))
    rows = {name: {"import_s": statistics.median(r[0] for r in rs), "process_s": statistics.median(r[1] for r in rs),
                   "deferred_modules": rs[0][2], "runs_import_s": [round(r[0], 3) for r in rs]}
            for name, rs in runs.items()}
    eager, deferred = rows["eager (LAVIS_DLIP_EAGER_IMPORTS=1)"], rows["deferred (default)"]
    ratio = deferred["import_s"] / eager["import_s"]
    from lavis_dlip import compat

    lines = [
        "# `import lavis_dlip`: time (measured)\n",
        f"`python benchmarks/import_time.py --repeats {args.repeats}` on {platform.machine()}, Python "
        f"{platform.python_version()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}: fresh interpreters, "
        "the two settings interleaved, medians. Deferred until first use: "
        + ", ".join(f"`{m}`" for m in compat.DEFERRED) + " (`lavis_dlip/compat.py`).\n",
        "| setting | import | whole process | modules deferred |",
        "|---|---|---|---|",
        *[f"| {name} | {r['import_s']:.2f} s | {r['process_s']:.2f} s | {r['deferred_modules']} |"
          for name, r in rows.items()],
        f"\nDeferred / eager: **{ratio:.2f}** of the import time. A training run imports `torch._dynamo` "
        "when it builds its optimizer, so it gets back about a second of this later; a validation error, "
        "`evaluate` or `export` does not.\n",
    ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.with_suffix(".md").write_text("\n".join(lines))
    OUT.with_suffix(".json").write_text(json.dumps({"repeats": args.repeats, "ratio": ratio, "rows": rows}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
