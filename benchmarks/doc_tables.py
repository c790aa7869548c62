"""The README's and docs' tables, rendered from the committed benchmark files.

A table sits between ``<!-- table: NAME -->`` and ``<!-- /table: NAME -->`` in README.md
or docs/*.md; NAME is a key of ``TABLES``, each read from one file in docs/benchmarks/.
``python benchmarks/doc_tables.py`` rewrites every such table; ``--check`` only lists the
stale ones and exits 1 (tests/test_docs.py runs it), so a figure in the docs is the
committed file's figure.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable

from lavis_dlip.demo_table import cache_rows, demo_rows

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "docs" / "benchmarks"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table: (?P=name) -->)", re.S)


def _load(name: str):
    path = BENCH / name
    if not path.is_file():
        raise SystemExit(f"{path.relative_to(ROOT)} is missing: the benchmark that writes it "
                         "(see its table's function in benchmarks/doc_tables.py) has not been run")
    return json.loads(path.read_text())


def demo() -> list[str]:
    """The demo's table (``make demo`` writes output/demo/demo.json; docs/benchmarks/demo.json
    is the fresh clone's run)."""
    return demo_rows(_load("demo.json"))


def demo_caches() -> list[str]:
    return cache_rows(_load("demo.json"))


def compression() -> list[str]:
    """The retrieval presets against BLIP-base: parameters, FLOPs, the two latencies."""
    data = _load("compression.json")
    section = next(v for k, v in data.items() if k.startswith("retrieval"))
    ref, k = section["models"][0], section["settings"]["k"]
    lines = [f"| retrieval model | params | FLOPs | image encoding | ITM re-ranking (k={k}) |", "|---|---|---|---|---|",
             f"| LAVIS `{ref['name']}` (BLIP-base) | {ref['params']['total'] / 1e6:.1f}M "
             f"| {ref['flops']['total'] / 1e9:.1f} G | {ref['latency_ms']['image_encoding']:.0f} ms "
             f"| {ref['latency_ms']['itm_rerank'] / 1000:.2f} s |"]
    for model, ratio in zip(section["models"][1:], section["ratios"][1:]):
        if model["name"].endswith(":base"):
            continue  # the same shape as the reference
        lines.append(f"| `{model['name']}` | {model['params']['total'] / 1e6:.1f}M ({100 * ratio['params']:.1f}%) "
                     f"| {100 * ratio['flops']:.1f}% | {ratio['speedup_image_encoding']:.2f}x faster "
                     f"| {ratio['speedup_itm_rerank']:.2f}x faster |")
    return lines


SERVE_COLUMNS = (("image", "image"), ("text", "text"), ("itm", "ITM k=16"), ("caption", "caption"))


def serve_latency() -> list[str]:
    """BLIP-base in PyTorch against the exported tiny student in ONNX Runtime, ms, with
    the speed-up over the first in brackets."""
    rows = [r for r in _load("serve_latency.json")
            if r["system"].endswith("(ONNX Runtime)") == r["system"].startswith("dlip_")]
    lines = ["| task | batch | n | system | " + " | ".join(label for _, label in SERVE_COLUMNS) + " |",
             "|---" * (4 + len(SERVE_COLUMNS)) + "|"]
    for r in rows:
        ref = next(x for x in rows if x["task"] == r["task"] and x["batch"] == r["batch"])
        cells = [f"{r['ms'][key]:.0f} ({ref['ms'][key] / r['ms'][key]:.1f}x)" if key in r["ms"] else "-"
                 for key, _ in SERVE_COLUMNS]
        lines.append(f"| {r['task']} | {r['batch']} | {r['repeats']} | {r['system']} | " + " | ".join(cells) + " |")
    return lines


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def fresh_clone() -> list[str]:
    """``make install``, ``make test`` and ``make demo`` timed on a fresh clone
    (benchmarks/fresh_clone.py); a fresh clone's ``make test`` or ``make demo`` installs
    first, so its time is the install's plus its own."""
    data = _load("fresh_clone.json")
    install = data["install_s"] or 0.0
    lines = ["| command | what | wall time | on a fresh clone, install included | exit |", "|---|---|---|---|---|"]
    for r in data["runs"]:
        first = r["command"] != "make install" and "second" not in r["when"]
        total = _minutes(install + r["wall_s"]) if first and install else "-"
        status = f"{r['rc']}: " + "; ".join(r["failed"]) + " failed" if r.get("failed") else str(r["rc"])
        lines.append(f"| `{r['command']}` | {r['when']} | {_minutes(r['wall_s'])} | {total} | {status} |")
    lines.append(f"| | measured {data['date']} at commit {data['commit']}, {data['cpu']} CPU cores | | | |")
    return lines


TABLES: dict[str, Callable[[], list[str]]] = {
    "demo": demo, "demo-caches": demo_caches, "compression": compression, "serve-latency": serve_latency,
    "fresh-clone": fresh_clone,
}


def render(text: str, where: Path) -> str:
    def fill(match: re.Match) -> str:
        name = match["name"]
        if name not in TABLES:
            raise SystemExit(f"{where}: <!-- table: {name} --> names no table; known: {', '.join(TABLES)}")
        return match.group(1) + "\n".join(TABLES[name]()) + "\n" + match.group(4)

    return BLOCK.sub(fill, text)


def stale(paths=DOCS) -> list[Path]:
    """The docs whose tables differ from what the benchmark files give."""
    return [p for p in paths if render(p.read_text(), p) != p.read_text()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="list stale docs and exit 1; write nothing")
    args = parser.parse_args(argv)
    if args.check:
        bad = stale()
        for p in bad:
            print(f"{p.relative_to(ROOT)}: tables differ from docs/benchmarks (python benchmarks/doc_tables.py)")
        return 1 if bad else 0
    for p in DOCS:
        text = p.read_text()
        new = render(text, p)
        if new != text:
            p.write_text(new)
            print(f"rewrote {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
