"""Which ranking should ``teacher_reduced`` use? Measured on the demo's retrieval task.

For each ``model.init.criterion`` (``first``, ``magnitude``, ``activation``) the
student of ``projects/dlip/demo/distill_retrieval.yaml`` is initialised from the
demo teacher and scored on the test split right after initialisation (no
training), then distilled with the demo's schedule and scored again. The score is
the demo's: the mean of the six recalls. One seed per criterion.

    python benchmarks/init_criteria.py            # writes docs/benchmarks/init_criteria.{json,md}

The teacher is the demo's (trained once and cached, as ``make demo`` does).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CRITERIA = ("first", "magnitude", "activation")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="demo", help="demo data preset")
    parser.add_argument("--output-dir", default="output/init_criteria")
    parser.add_argument("--options", nargs="*", default=[], help="key=value overrides for every run")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "init_criteria"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    import lavis_dlip  # noqa: F401
    from lavis_dlip import demo, kept
    from lavis_dlip.cli import run
    from lavis_dlip.datasets.demo_data import ensure

    data = ensure(args.data)
    out = Path(args.output_dir).resolve()
    opts = list(args.options) + ([f"datasets.dlip_local_retrieval.base_dir={data}"] if args.data != "demo" else [])
    teacher = kept.train_or_reuse(demo.DEMO_DIR / "teacher_retrieval.yaml", data, out / "teacher", opts)
    ckpt = teacher["checkpoint"]
    cfg = str(demo.DEMO_DIR / "distill_retrieval.yaml")
    rows = [{"criterion": "teacher", "after_init": demo.score("retrieval", teacher["test"]),
             "after_distillation": None, "test": teacher["test"]}]
    for criterion in CRITERIA:
        common = [f"model.init.teacher={ckpt}", f"distill.teacher.checkpoint={ckpt}",
                  f"model.init.criterion={criterion}", *opts]
        t0 = time.time()
        at_init = run(cfg, [f"run.output_dir={out}/{criterion}/init", *common], evaluate=True)["test"]
        init_s = time.time() - t0
        t0 = time.time()
        distilled = run(cfg, [f"run.output_dir={out}/{criterion}/distill", *common])["test"]
        rows.append({"criterion": criterion, "after_init": demo.score("retrieval", at_init),
                     "after_distillation": demo.score("retrieval", distilled), "init_s": init_s,
                     "distill_s": time.time() - t0, "test_at_init": at_init, "test": distilled})
        print(json.dumps(rows[-1], default=str), flush=True)

    Path(args.out + ".json").write_text(json.dumps({"data": args.data, "options": opts, "rows": rows},
                                                   indent=2, default=str))
    Path(args.out + ".md").write_text(table(args.data, rows, opts))
    print(table(args.data, rows, opts))
    return 0


def table(data: str, rows: list[dict], options: list[str]) -> str:
    teacher, students = rows[0], rows[1:]
    lines = ["| criterion | mean R@k right after init | mean R@k after distillation |", "|---|---|---|"]
    lines += [f"| {r['criterion']} | {r['after_init']:.1f} | {r['after_distillation']:.1f} |" for r in students]
    return ("# `teacher_reduced` criteria on the demo's retrieval task\n\n"
            f"`python benchmarks/init_criteria.py --options {' '.join(options)}` (data preset `{data}`, one seed "
            "each). Mean of the six recalls on the test split (300 images; chance: R@1/5/10 = 0.3/1.7/3.3). "
            f"The teacher scores {teacher['after_init']:.1f}.\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
