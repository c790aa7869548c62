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
    lines = ["| command | what | wall time | on a fresh clone, install included | exit | measured |",
             "|---|---|---|---|---|---|"]
    for r in data["runs"]:
        first = r["command"] != "make install" and "second" not in r["when"]
        install = r.get("install_s")  # the install of the same clone
        total = _minutes(install + r["wall_s"]) if first and install else "-"
        status = f"{r['rc']}: " + "; ".join(r["failed"]) + " failed" if r.get("failed") else str(r["rc"])
        lines.append(f"| `{r['command']}` | {r['when']} | {_minutes(r['wall_s'])} | {total} | {status} | "
                     f"{r['date']}, commit {r['commit']} |")
    lines.append(f"| | {data['cpu']} CPU cores | | | | |")
    return lines


def stream() -> list[str]:
    """What streaming costs here (benchmarks/stream_throughput.py) and what BLIP-base-sized
    teachers' outputs weigh (benchmarks/teacher_output_bytes.py)."""
    data, outputs = _load("stream.json"), _load("teacher_outputs.json")
    lines = ["| what | measured | source |", "|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| one data-loading process, `blip_image_train` at {r['image_size']} px ({r['source']}) | "
                     f"{r['samples_per_s']:,.0f} samples/s | [benchmarks/stream.md](benchmarks/stream.md) |")
    for r in {r["source"]: r for r in data["rows"]}.values():  # each source's shards were written once
        lines.append(f"| shard writing, {r['source']} (one process, files in the page cache) | "
                     f"{r['write_samples_per_s']:,.0f} samples/s at {r['bytes_per_sample'] / 1024:.1f} KiB a sample | "
                     "[benchmarks/stream.md](benchmarks/stream.md) |")
    replay = data["rows"][-1]
    lines.append(f"| resume replay (entries read, not decoded), {replay['source']} | "
                 f"{replay['replay_samples_per_s']:,.0f} samples/s | [benchmarks/stream.md](benchmarks/stream.md) |")
    for r in outputs["rows"]:
        lines.append(f"| teacher outputs a sample and augmentation, `{r['config']}` ({r['teacher']}, "
                     f"{r['image_size']} px, {outputs['dtype']}) | {r['bytes_per_entry'] / 1024:,.1f} KiB | "
                     "[benchmarks/teacher_outputs.md](benchmarks/teacher_outputs.md) |")
    return lines


PLAN_PAIRS = (4_000_000, 14_000_000, 129_000_000)
PLAN_GPU_SAMPLES_PER_S = 400  # assumed student training throughput of one GPU (not measured: no GPU here)
PLAN_AUGMENTATIONS = 4


def _bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n / 2**20:,.0f} MiB"


def scale_plan() -> list[str]:
    """4M, 14M and 129M pairs planned from the measurements: the 224 px pre-training case
    (images, the pre-training config's teacher outputs with and without its layer fields,
    one loader process's rate)."""
    rows = _load("stream.json")["rows"]
    images = next(r for r in rows if r["image_size"] == 224)
    teacher = next(r for r in _load("teacher_outputs.json")["rows"] if "pretrain" in r["config"])
    k, gpu = PLAN_AUGMENTATIONS, PLAN_GPU_SAMPLES_PER_S
    per_image, loader = images["bytes_per_sample"], images["samples_per_s"]
    full, light = teacher["bytes_per_entry"], teacher["bytes_per_entry"] - teacher["layer_bytes_per_entry"]
    lines = [f"| pairs | images (N x {per_image / 1024:.1f} KiB) | teacher outputs, every field (N x {k} x "
             f"{full / 1024:,.0f} KiB) | without layer fields (N x {k} x {light / 1024:.1f} KiB) | teacher passes "
             f"(N x {k}) | loader processes a GPU ({gpu} / {loader:.0f}) | GPU-hours an epoch (N / {gpu} / 3600) |",
             "|---|---|---|---|---|---|---|"]
    for n in PLAN_PAIRS:
        lines.append(f"| {n / 1e6:.0f}M | {_bytes(n * per_image)} | {_bytes(n * k * full)} | "
                     f"{_bytes(n * k * light)} | {n * k / 1e6:,.0f}M | {gpu / loader:.1f} | {n / gpu / 3600:,.1f} |")
    return lines


TABLES: dict[str, Callable[[], list[str]]] = {
    "demo": demo, "demo-caches": demo_caches, "compression": compression, "serve-latency": serve_latency,
    "fresh-clone": fresh_clone, "stream": stream, "scale-plan": scale_plan,
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
