"""The main job on the embedded default (``make demo``).

Trains small BLIP-shaped models (LAVIS's BlipRetrieval, BlipCaption and BlipVQA
code, sized by ``projects/dlip/demo/*.yaml``) on the embedded demo data with
``runner_dlip``, evaluates each with LAVIS's own metrics, evaluates the same
models untrained for comparison, and prints one table with the time of every
stage. Until distillation lands this is the whole pipeline that DLIP builds on.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

DEMO_DIR = Path(__file__).resolve().parent.parent / "projects" / "dlip" / "demo"

# (config, what to show, metric keys)
TASKS = {
    "retrieval": ("Retrieval R@1/5/10, text then image",
                  ["txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10"]),
    "caption": ("Caption BLEU-4 / METEOR / ROUGE-L / CIDEr", ["Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]),
    "vqa": ("VQA accuracy", ["agg_metrics"]),
}


def _fmt(metrics: dict, keys: list[str]) -> str:
    scale = 100.0 if "CIDEr" in keys else 1.0  # caption scores as percentages, like papers
    return " / ".join(f"{metrics[k] * scale:.1f}" if k in metrics else "-" for k in keys)


def _count_params(cfg_path: Path) -> int:
    """Parameters used at inference (the report's count: no momentum copies or queues)."""
    import lavis.tasks as tasks

    from lavis_dlip.config import load_config
    from lavis_dlip.models.tokenizer import tokenizer_source
    from lavis_dlip.report import count_params

    cfg = load_config(str(cfg_path))
    with tokenizer_source(cfg.model_cfg.get("tokenizer")):
        model = tasks.setup_task(cfg).build_model(cfg)
    return count_params(model)["total"]


def run_demo(tasks: Sequence[str], output_dir: str, options: Sequence[str] = ()) -> list[dict]:
    from lavis_dlip.cli import run

    rows = []
    for name in tasks:
        cfg = DEMO_DIR / f"{name}.yaml"
        opts = [f"run.output_dir={output_dir}/{name}", *options]
        t0 = time.time()
        untrained = run(str(cfg), [*opts, "run.progress=False"], evaluate=True)
        t1 = time.time()
        trained = run(str(cfg), opts)
        t2 = time.time()
        split = "test"
        rows.append({
            "task": name,
            "params": _count_params(cfg),
            "untrained": untrained.get(split, {}),
            "trained": trained.get(split, {}),
            "eval_untrained_s": t1 - t0,
            "train_and_eval_s": t2 - t1,
        })
    return rows


def print_table(rows: list[dict], total_s: float) -> None:
    print("\n## lavis-dlip demo: small BLIP-shaped models trained on the embedded demo data (test split)\n")
    print("| task | params | metric | untrained | trained | train+eval time |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        label, keys = TASKS[row["task"]]
        print(f"| {row['task']} | {row['params'] / 1e6:.1f}M | {label} | {_fmt(row['untrained'], keys)} "
              f"| {_fmt(row['trained'], keys)} | {row['train_and_eval_s'] / 60:.1f} min |")
    print(f"\nTotal wall time: {total_s / 60:.1f} min. Outputs (checkpoints, logs, metrics.json) "
          f"are under the output directory.")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--output-dir", default="output/demo")
    parser.add_argument("--options", nargs="+", default=[], help="key=value overrides for every config")
    parser.add_argument("--json", help="also write the table as JSON to this file")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import lavis_dlip  # noqa: F401
    from lavis_dlip.datasets.demo_data import ensure

    start = time.time()
    data = ensure("demo")
    logging.getLogger(__name__).info("demo data: %s (%.0f s)", data, time.time() - start)
    rows = run_demo(args.tasks, args.output_dir, args.options)
    total = time.time() - start
    print_table(rows, total)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "total_s": total}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
