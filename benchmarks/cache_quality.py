"""Does a student distilled from the teacher-output cache match online distillation?

For each demo task (``projects/dlip/demo/distill_<task>.yaml``): the demo's teacher
and cache (trained and built by ``make demo``, reused here; built if absent), then
the distilled student trained twice per seed, once online (the teacher replayed
every step) and once from the cache, on two seeds. The answer is in the spread:
cached and online should differ by no more than two online seeds differ.

Writes docs/benchmarks/cache_quality.md (and .json).

    python benchmarks/cache_quality.py [--tasks retrieval caption vqa] [--seeds 42 43]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "benchmarks" / "cache_quality"


def run_task(task: str, seeds: list[int], out: Path) -> dict:
    from lavis_dlip import demo, kept
    from lavis_dlip.datasets.demo_data import ensure

    cfg = demo.DEMO_DIR / f"distill_{task}.yaml"
    teacher = kept.train_or_reuse(demo.DEMO_DIR / f"teacher_{task}.yaml", ensure("demo"),
                                              out / "teacher", [])
    ckpt = teacher["checkpoint"]
    opts = [f"model.init.teacher={ckpt}", f"distill.teacher.checkpoint={ckpt}"]
    cache = demo.build_or_reuse_cache(cfg, ckpt.parent, opts)
    runs = []
    for seed in seeds:
        for mode, extra in (("online", []), ("cached", [f"distill.cache={cache['dir']}"])):
            stage = demo.train_student(cfg, out / f"{mode}_{seed}", [*opts, *extra, f"run.seed={seed}"])
            runs.append({"mode": mode, "seed": seed, "score": demo.score(task, stage["test"]),
                         "seconds": stage["seconds"], "test": stage["test"]})
            print(f"{task} {mode} seed {seed}: {demo.TASKS[task][1]} {runs[-1]['score']:.2f} "
                  f"({stage['seconds']:.0f} s)", flush=True)
    return {"task": task, "metric": demo.TASKS[task][1], "teacher": demo.score(task, teacher["test"]), "runs": runs}


def summary(result: dict) -> dict:
    by = {m: [r["score"] for r in result["runs"] if r["mode"] == m] for m in ("online", "cached")}
    mean = {m: sum(v) / len(v) for m, v in by.items()}
    spread = max(by["online"]) - min(by["online"])  # run-to-run spread over seeds
    seconds = {m: sum(r["seconds"] for r in result["runs"] if r["mode"] == m) / len(by[m]) for m in by}
    return {"scores": by, "mean": mean, "online_seed_spread": spread,
            "cached_minus_online": mean["cached"] - mean["online"], "mean_seconds": seconds,
            "within_spread": abs(mean["cached"] - mean["online"]) <= spread}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["retrieval", "caption", "vqa"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43])
    parser.add_argument("--output-dir", default="output/cache_quality")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import lavis_dlip  # noqa: F401

    start = time.time()
    results = [run_task(t, args.seeds, Path(args.output_dir).resolve() / t) for t in args.tasks]
    for r in results:
        r["summary"] = summary(r)
        r["measured"] = time.strftime("%Y-%m-%d")
    # tasks not run this time keep their earlier rows (each row says when it was measured)
    earlier = json.loads(OUT.with_suffix(".json").read_text()) if OUT.with_suffix(".json").is_file() else []
    results += [r for r in earlier if r["task"] not in args.tasks]
    seeds = ", ".join(map(str, args.seeds))
    lines = [
        "# Cached against online distillation (demo)",
        "",
        "`python benchmarks/cache_quality.py`: each demo distillation (`projects/dlip/demo/distill_*.yaml`, "
        f"the demo's teachers and caches) trained online and from the teacher-output cache, seeds {seeds}; "
        f"test split scores. Wall time {(time.time() - start) / 60:.1f} min on "
        f"{os.cpu_count()} CPU cores for {', '.join(args.tasks)}; other rows are kept from an earlier run "
        "(the demo yamls of that day).",
        "",
        "| task | measured | metric | teacher | online (per seed) | cached (per seed) | online seed spread "
        "| cached - online (means) | within spread | s per run online / cached |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["summary"]
        online, cached = (" / ".join(f"{v:.1f}" for v in s["scores"][m]) for m in ("online", "cached"))
        lines.append(
            f"| {r['task']} | {r.get('measured', 'an earlier session')} | {r['metric']} "
            f"| {r['teacher']:.1f} | {online} "
            f"| {cached} | {s['online_seed_spread']:.1f} "
            f"| {s['cached_minus_online']:+.1f} | {'yes' if s['within_spread'] else 'no'} "
            f"| {s['mean_seconds']['online']:.0f} / {s['mean_seconds']['cached']:.0f} |")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")
    OUT.with_suffix(".json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
