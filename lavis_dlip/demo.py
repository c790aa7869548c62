"""The main job on the embedded default (``make demo``): DLIP end to end on CPU.

For retrieval, captioning and VQA (``projects/dlip/demo/{teacher,distill,student}_<task>.yaml``):

1. **teacher**: train a small BLIP model on the embedded demo data (its text
   encoder from the offline all-MiniLM-L6-v2, like BLIP's from BERT);
2. **teacher cache**: run the teacher once over the training split and store what
   the distillation terms read (``python -m lavis_dlip.cache_teacher``);
3. **distilled**: initialise a student from the teacher (``teacher_reduced``) and
   distill it with DLIP's loss terms, reading the teacher's outputs from the cache;
4. **init only**: the distilled student's initialisation, trained without a teacher (its
   own losses only): what distillation adds over inheriting the teacher's weights;
5. **not distilled** (``--not-distilled``): the same student from random weights without a
   teacher (a study's ``no_teacher`` reference, ``docs/study.md``);
6. evaluate them with LAVIS's metrics, time their inference side by side,
   print one table with the time of every stage and plot quality against size
   and latency (``demo.png`` in the output directory).

The training stages of all tasks run two at a time (``--parallel``), one CPU thread
each, a stage as soon as what it reads exists (``run_stages``), each one's output in
``<output-dir>/<task>/<stage>.log``. A trained run and a cache are kept
(``lavis_dlip.kept``) and reused by the next demo with the same yaml, data and options:
a second ``make demo`` evaluates and times what the first trained.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from lavis_dlip.stages import Progress, Stage, run_stages
from lavis_dlip.kept import is_kept, kept_dir, kept_root, train_or_reuse
from lavis_dlip.blip.build import trained_model
from lavis_dlip.cache_teacher import build_cache
from lavis_dlip.datasets.demo_data import ensure
from lavis_dlip.demo_table import TASKS, cache_rows, demo_rows, score, shown
from lavis_dlip.distill.cache import VERSION, read_manifest
from lavis_dlip.distill.losses import teacher_free_terms
from lavis_dlip.report import measure_models

DEMO_DIR = Path(__file__).resolve().parent.parent / "projects" / "dlip" / "demo"

logger = logging.getLogger(__name__)


def cache_dir(cfg_path: Path, teacher_dir: Path, options: Sequence[str]) -> Path:
    """Where the distillation run's teacher-output cache is kept: beside its teacher,
    keyed by the yaml's model, data and distill sections, the options and the cache
    format, not its schedule (the cache's own key refuses anything stale)."""
    from omegaconf import OmegaConf

    raw = OmegaConf.load(cfg_path)
    what = OmegaConf.to_yaml({k: raw.get(k) for k in ("model", "datasets", "distill")})
    key = hashlib.sha256("\n".join([what, *options, f"cache format {VERSION}"]).encode()).hexdigest()[:10]
    return teacher_dir / f"cache-{cfg_path.stem}-{key}"


def build_or_reuse_cache(cfg_path: Path, teacher_dir: Path, options: Sequence[str]) -> dict:
    """The distillation run's teacher-output cache (``cache_dir``), built or reused."""

    directory = cache_dir(cfg_path, teacher_dir, options)
    reused = bool((read_manifest(str(directory)) or {}).get("complete"))
    t0 = time.time()
    stats = build_cache(str(cfg_path), [*options, f"distill.cache={directory}"])
    seconds = time.time() - t0
    return {"dir": directory, "seconds": seconds, "cached": reused, "built_s": stats.get("build_s_this_run"),
            "bytes": stats["bytes"], "entries": stats["entries"], "bytes_per_entry": stats["bytes_per_entry"]}


def load_trained(cfg_path: Path, checkpoint: Path):
    """The model of a run yaml with trained weights (for timing and counting)."""

    return trained_model(str(cfg_path), str(checkpoint))[0]


def timings(models: dict[str, Any], repeats: int) -> dict[str, dict]:
    """Parameters and inference latency (every workload the model serves: image and
    text encoding, ITM re-ranking, caption generation, VQA answering), interleaved
    in this process."""

    costs = measure_models(models, image_size=None, text_len=20, k=16, batch=64, device="cpu",
                           warmup=1, repeats=repeats)
    return {c.name: {"params": c.params["total"], "latency_ms": sum(c.latency_ms.values()), **c.latency_ms}
            for c in costs}


STAGES = ("teacher", "cache", "distilled", "init only", "not distilled")  # a stage reads only stages before it
MODELS = ("teacher", "distilled", "init only", "not distilled")  # the table's rows of a task
OPTIONAL = ("not distilled",)  # stages run only when asked (--not-distilled): make demo stays inside its time


def demo_stages(not_distilled: bool = False) -> tuple[str, ...]:
    """The stages a task runs, in order."""
    return tuple(name for name in STAGES if not_distilled or name not in OPTIONAL)


def own_terms(cfg_path: Path) -> list[dict]:
    """A distillation yaml's terms that need no teacher: the student's own losses."""
    from omegaconf import OmegaConf

    return teacher_free_terms(OmegaConf.load(cfg_path).distill.terms)


def stage_cfgs(task: str) -> dict[str, Path]:
    return {stage: DEMO_DIR / f"{stage}_{task}.yaml" for stage in ("teacher", "distill", "student")}


def task_stages(task: str, data: Path, out: Path, options: Sequence[str]) -> dict[str, Stage]:
    """A task's stages (all of ``STAGES``). Where each writes is known before it runs (the
    teacher's and the cache's directories are keyed by their inputs), so none waits to be planned."""
    cfgs = stage_cfgs(task)
    teacher_dir = kept_dir(cfgs["teacher"], data, options)
    ckpt = teacher_dir / "checkpoint.pth"
    distill_opts = [f"model.init.teacher={ckpt}", f"distill.teacher.checkpoint={ckpt}", *options]
    cache = cache_dir(cfgs["distill"], teacher_dir, distill_opts)

    built = bool((read_manifest(str(cache)) or {}).get("complete"))

    def kept_run(cfg: Path, name: str, opts: Sequence[str], after=(), root=None) -> Stage:
        return Stage(train_or_reuse, (cfg, data, out / name, list(opts), root), after,
                     reused=is_kept(kept_dir(cfg, data, opts, root)))

    return {
        "teacher": kept_run(cfgs["teacher"], "teacher", options),
        "cache": Stage(build_or_reuse_cache, (cfgs["distill"], teacher_dir, distill_opts), ("teacher",),
                       reused=built),
        "distilled": kept_run(cfgs["distill"], "distilled", [*distill_opts, f"distill.cache={cache}"], ("cache",),
                              teacher_dir),
        # the distilled student's init, trained without a teacher: what distillation adds over inheritance
        "init only": kept_run(cfgs["distill"], "init_only",
                              [*distill_opts, f"distill.terms={json.dumps(own_terms(cfgs['distill']))}",
                               "distill.cache=null"], ("teacher",), teacher_dir),
        "not distilled": kept_run(cfgs["student"], "not_distilled", options),
    }


def _done_line(key: tuple[str, str], result: dict) -> str:
    task, name = key
    if name == "cache":
        what = f"{result['entries']} entries, {result['bytes'] / 2**20:.1f} MiB"
    else:
        what = shown(task, result["test"])
    reused = ", reused" if result.get("cached") else ""
    log = f"; log {result['log']}" if "log" in result else ""
    return f"{task} {name}: {what} ({result['seconds'] / 60:.1f} min{reused}{log})"

# Minutes each stage took in a fresh `make demo` on this project's machines (2 cores, two
# stages at a time; docs/benchmarks/demo.json): the plan's estimate until this machine has its own.
REFERENCE_MINUTES = {
    ("retrieval", "teacher"): 4.0, ("caption", "teacher"): 1.6, ("vqa", "teacher"): 0.9,
    ("retrieval", "cache"): 0.9, ("caption", "cache"): 0.6, ("vqa", "cache"): 0.5,
    ("retrieval", "distilled"): 1.6, ("caption", "distilled"): 1.5, ("vqa", "distilled"): 0.9,
    ("retrieval", "init only"): 1.5, ("caption", "init only"): 1.4, ("vqa", "init only"): 0.6,
    # --not-distilled, not in that run: the init-only stage's time (the same student and schedule)
    ("retrieval", "not distilled"): 1.5, ("caption", "not distilled"): 1.4, ("vqa", "not distilled"): 0.6,
}


def task_rows(task: str, results: dict[str, dict], repeats: int) -> list[dict]:
    """The table's rows of one task: scores, and parameters and latency measured side by side."""
    import torch

    cfgs = stage_cfgs(task)
    stage_cfg = {"teacher": cfgs["teacher"], "distilled": cfgs["distill"], "init only": cfgs["distill"],
                 "not distilled": cfgs["student"]}
    stages = {name: results[name] for name in stage_cfg if name in results}
    torch.manual_seed(0)
    cost = timings({name: load_trained(stage_cfg[name], stage["checkpoint"]) for name, stage in stages.items()},
                   repeats)
    teacher_score = score(task, stages["teacher"]["test"])
    rows = []
    for name, stage in stages.items():
        value = score(task, stage["test"])
        rows.append({
            "task": task, "model": name, "params": cost[name]["params"],
            "cfg_path": str(stage_cfg[name]), "checkpoint": str(stage["checkpoint"]),
            "speedup": cost["teacher"]["latency_ms"] / cost[name]["latency_ms"],
            "latency_ms": cost[name]["latency_ms"], "test": stage["test"], "score": value,
            "retained": 100.0 * value / teacher_score if teacher_score else None,
            "seconds": stage["seconds"], "cached": stage.get("cached", False), "trained_s": stage.get("trained_s"),
        })
    rows[1]["teacher_cache"] = {k: str(v) if k == "dir" else v for k, v in results["cache"].items()}
    return rows


def run_demo(output_dir: str, options: Sequence[str] = (), repeats: int = 3, data_preset: str = "demo",
             tasks: Sequence[str] = tuple(TASKS), parallel: int = 2, progress_s: float = 30.0,
             not_distilled: bool = False) -> dict:
    """Teacher, teacher-output cache, distilled and init-only students per task, and with
    ``not_distilled`` the student from random weights (``options`` apply to every stage),
    ``parallel`` stages at a time (``run_stages``), their plan printed first and their
    progress every ``progress_s`` seconds; then latency is timed alone."""

    start = time.time()
    data = ensure(data_preset)
    out = Path(output_dir).resolve()
    per_task = {}
    for task in tasks:
        opts = list(options)
        if data_preset != "demo":
            opts.insert(0, f"datasets.{TASKS[task][0]}.base_dir={data}")
        per_task[task] = task_stages(task, data, out / task, opts)
    # the order among ready stages: the teachers (the retrieval teacher, the longest, first), the
    # caches, then a task's two students together (the retrieval students, the longest, first)
    names = demo_stages(not_distilled)
    order = [(task, name) for name in names[:2] for task in tasks]
    order += [(task, name) for task in tasks for name in names[2:]]
    stages = {(task, name): per_task[task][name] for task, name in order}
    logs = {(task, name): out / task / f"{name.replace(' ', '_')}.log" for task, name in stages}
    times = kept_root() / "stage_times.json" if data_preset == "demo" else None
    progress = Progress.plan("lavis-dlip demo", stages, parallel, times, REFERENCE_MINUTES, interval=progress_s)
    results = run_stages(stages, logs, parallel, progress, describe=_done_line)
    rows = []
    for task in tasks:
        rows += task_rows(task, {name: results[(task, name)] for name in names}, repeats)
    result = {"rows": rows, "total_s": time.time() - start, "data": str(data), "parallel": parallel}
    result["plot"] = str(plot(result, out / "demo.png"))
    return result

MARKERS = {"teacher": "o", "distilled": "*", "init only": "P", "not distilled": "X"}


def plot(result: dict, path: Path) -> Path:
    """Quality against parameters (top row) and against latency (bottom row), one column
    per task: where each model sits on the size/speed/quality trade-off (PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a server
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in result["rows"]))
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.2 * len(tasks), 7.0), squeeze=False)
    for j, task in enumerate(tasks):
        rows = [r for r in result["rows"] if r["task"] == task]
        for i, (key, label, scale) in enumerate((("params", "parameters (M)", 1e-6),
                                                  ("latency_ms", "inference latency (ms, CPU)", 1.0))):
            ax = axes[i][j]
            for r in rows:
                ax.scatter(r[key] * scale, r["score"], marker=MARKERS[r["model"]], s=140, label=r["model"])
            ax.set_xlabel(label)
            ax.set_ylabel(TASKS[task][1])
            ax.set_title(f"{task}: {TASKS[task][1]} vs {label.split(' (')[0]}", fontsize=10)
            ax.set_xlim(left=0)
            ax.grid(alpha=0.3)
    axes[0][0].legend(loc="lower right")
    fig.suptitle("lavis-dlip demo: teacher and students (test split)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def print_table(result: dict) -> None:
    print("\n## lavis-dlip demo: DLIP on the embedded demo data (test split)\n")
    print("\n".join(demo_rows(result)))
    print("\nSpeed-up: inference latency against the teacher (retrieval: image + text encoding and ITM "
          "re-ranking of 16, batch 64; captioning: image encoding and beam-3 generation of 20 tokens; VQA: encoding "
          "and beam-3 generation of 10-token answers), CPU, measured side by side. "
          f"Time: each stage's own wall time, {result.get('parallel', 1)} stage(s) running at once. "
          f"Total wall time: {result['total_s'] / 60:.1f} min.")
    print("\nTeacher-output caches (what the distilled students trained from):\n")
    print("\n".join(cache_rows(result)))
    if result.get("plot"):
        print(f"\nPlot: {result['plot']}")
    student = next((r for r in result["rows"] if r["model"] == "distilled"), None)
    if student:  # the way out of LAVIS (docs/deploy.md)
        print(f"\nExport a student: python -m lavis_dlip.export --cfg-path {student['cfg_path']} "
              f"--checkpoint {student['checkpoint']} --format onnx --out output/export/{student['task']}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--output-dir", default="output/demo")
    parser.add_argument("--options", nargs="+", default=[],
                        help="key=value overrides for every stage (the teacher is cached per options)")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (median)")
    parser.add_argument("--parallel", type=int, default=2,
                        help="stages run at once, sharing the CPU threads (1: one after the other)")
    parser.add_argument("--not-distilled", action="store_true",
                        help="also train each student from random weights without a teacher (a few minutes more)")
    parser.add_argument("--json", help="where to write the table as JSON (default: <output-dir>/demo.json)")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    result = run_demo(args.output_dir, args.options, args.repeats, tasks=args.tasks, parallel=args.parallel,
                      not_distilled=args.not_distilled)
    print_table(result)
    Path(args.json or Path(args.output_dir) / "demo.json").write_text(json.dumps(result, indent=2, default=str))
    return 0

if __name__ == "__main__":
    sys.exit(main())
