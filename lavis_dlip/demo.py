"""The main job on the embedded default (``make demo``): DLIP end to end on CPU.

1. **teacher**: train a small BLIP retrieval model (``projects/dlip/demo/teacher_retrieval.yaml``)
   on the embedded demo data, or reuse its cached checkpoint;
2. **distilled**: initialise a student from it (``teacher_reduced``) and distill
   it with DLIP's loss terms (``distill_retrieval.yaml``);
3. **not distilled**: train the same student without a teacher (``student_retrieval.yaml``);
4. evaluate all three with LAVIS's retrieval evaluation, time their inference
   side by side, and print one table with the time of every stage.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

DEMO_DIR = Path(__file__).resolve().parent.parent / "projects" / "dlip" / "demo"
ENV_CACHE = "LAVIS_DLIP_TEACHER_CACHE"
RECALLS = ["txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10"]

logger = logging.getLogger(__name__)


def teacher_cache(cfg_path: Path, data_dir: Path, options: Sequence[str]) -> Path:
    """Where a trained demo teacher is kept: keyed by its yaml, the data and the options."""
    key = hashlib.sha256(b"\n".join([cfg_path.read_bytes(), data_dir.name.encode(), *map(str.encode, options)]))
    key = key.hexdigest()[:10]
    root = Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "lavis_dlip" / "demo_teachers")
    return root / f"{cfg_path.stem}-{key}"


def _job_dir(root: Path) -> Path:
    return max((p.parent for p in root.rglob("metrics.json")), key=lambda p: p.stat().st_mtime)


def train_or_reuse_teacher(cfg_path: Path, data_dir: Path, output_dir: Path, options: Sequence[str]) -> dict:
    """The teacher's checkpoint and test metrics, trained once per yaml, data and options."""
    from lavis_dlip.cli import run

    cache = teacher_cache(cfg_path, data_dir, options)
    ckpt, metrics = cache / "checkpoint_best.pth", cache / "metrics.json"
    if ckpt.is_file() and metrics.is_file():
        logger.info("reusing the demo teacher in %s (delete it to retrain)", cache)
        record = json.loads(metrics.read_text())
        return {"checkpoint": ckpt, "test": record["test"], "seconds": 0.0, "cached": True,
                "trained_s": record.get("seconds")}
    t0 = time.time()
    run(str(cfg_path), [f"run.output_dir={output_dir}", *options])
    seconds = time.time() - t0
    job = _job_dir(output_dir)
    record = json.loads((job / "metrics.json").read_text())
    tmp = cache.with_name(cache.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy2(job / "checkpoint_best.pth", tmp / "checkpoint_best.pth")
    (tmp / "metrics.json").write_text(json.dumps({**record, "seconds": seconds}, indent=2))
    shutil.rmtree(cache, ignore_errors=True)
    tmp.rename(cache)  # complete or absent, never half written
    return {"checkpoint": ckpt, "test": record["test"], "seconds": seconds, "cached": False, "trained_s": seconds}


def train_student(cfg_path: Path, output_dir: Path, options: Sequence[str]) -> dict:
    from lavis_dlip.cli import run

    t0 = time.time()
    metrics = run(str(cfg_path), [f"run.output_dir={output_dir}", *options])
    job = _job_dir(output_dir)
    return {"checkpoint": job / "checkpoint_best.pth", "test": metrics.get("test", {}), "seconds": time.time() - t0}


def load_trained(cfg_path: Path, checkpoint: Path):
    """The model of a run yaml with trained weights (for timing and counting)."""
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    from lavis_dlip.models.tokenizer import tokenizer_source

    model_cfg = OmegaConf.load(cfg_path).model
    model_cls = registry.get_model_class(model_cfg.arch)
    model_cfg = OmegaConf.merge(OmegaConf.load(model_cls.default_config_path(model_cfg.model_type)).model,
                                model_cfg, {"init": None, "finetuned": str(checkpoint), "load_finetuned": True})
    with tokenizer_source(model_cfg.get("tokenizer")):
        return model_cls.from_config(model_cfg).eval()


def timings(models: dict[str, Any], repeats: int) -> dict[str, dict]:
    """Parameters and inference latency (image + text encoding + ITM re-ranking),
    interleaved in this process."""
    from lavis_dlip.report import measure_models

    costs = measure_models(models, image_size=None, text_len=20, k=16, batch=64, device="cpu",
                           warmup=1, repeats=repeats)
    return {c.name: {"params": c.params["total"], "latency_ms": sum(c.latency_ms.values()), **c.latency_ms}
            for c in costs}


def run_demo(output_dir: str, options: Sequence[str] = (), repeats: int = 5, data_preset: str = "demo") -> dict:
    """Teacher, distilled and not-distilled students; ``options`` apply to every stage."""
    import torch

    from lavis_dlip.datasets.demo_data import ensure

    start = time.time()
    data = ensure(data_preset)
    if data_preset != "demo":
        options = [f"datasets.dlip_local_retrieval.base_dir={data}", *options]
    out = Path(output_dir).resolve()
    teacher_cfg, distill_cfg, student_cfg = (DEMO_DIR / f"{n}_retrieval.yaml"
                                             for n in ("teacher", "distill", "student"))

    stages = {}
    stages["teacher"] = train_or_reuse_teacher(teacher_cfg, data, out / "teacher", options)
    ckpt = stages["teacher"]["checkpoint"]
    stages["distilled"] = train_student(
        distill_cfg, out / "distilled",
        [f"model.init.teacher={ckpt}", f"distill.teacher.checkpoint={ckpt}", *options])
    stages["not distilled"] = train_student(student_cfg, out / "not_distilled", options)

    torch.manual_seed(0)
    t0 = time.time()
    models = {"teacher": load_trained(teacher_cfg, ckpt),
              "distilled": load_trained(distill_cfg, stages["distilled"]["checkpoint"]),
              "not distilled": load_trained(student_cfg, stages["not distilled"]["checkpoint"])}
    cost = timings(models, repeats)
    timing_s = time.time() - t0
    rows = []
    teacher_mean = _mean_recall(stages["teacher"]["test"])
    for name, stage in stages.items():
        mean = _mean_recall(stage["test"])
        rows.append({
            "model": name, "params": cost[name]["params"],
            "speedup": cost["teacher"]["latency_ms"] / cost[name]["latency_ms"],
            "latency_ms": cost[name]["latency_ms"],
            **{k: stage["test"].get(k) for k in RECALLS},
            "mean_recall": mean, "retained": 100.0 * mean / teacher_mean if teacher_mean else None,
            "seconds": stage["seconds"], "cached": stage.get("cached", False), "trained_s": stage.get("trained_s"),
        })
    return {"rows": rows, "timing_s": timing_s, "total_s": time.time() - start, "data": str(data)}


def _mean_recall(metrics: dict) -> float:
    return sum(float(metrics.get(k, 0.0)) for k in RECALLS) / len(RECALLS)


def print_table(result: dict) -> None:
    print("\n## lavis-dlip demo: DLIP on the embedded demo data (retrieval, test split, 300 images)\n")
    print("| model | params | speed-up | text R@1 / R@5 / R@10 | image R@1 / R@5 / R@10 | mean R "
          "| % of teacher | time |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        time_txt = (f"cached (trained in {r['trained_s'] / 60:.1f} min)" if r["cached"] and r["trained_s"]
                    else f"{r['seconds'] / 60:.1f} min")
        print(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['speedup']:.2f}x "
              f"| {' / '.join(f'{r[k]:.1f}' for k in RECALLS[:3])} | {' / '.join(f'{r[k]:.1f}' for k in RECALLS[3:])} "
              f"| {r['mean_recall']:.1f} | {r['retained']:.1f}% | {time_txt} |")
    print(f"\nSpeed-up: inference latency (image encoding + text encoding + ITM re-ranking of 16, batch 64, "
          f"CPU), measured side by side in {result['timing_s']:.0f} s. "
          f"Total wall time: {result['total_s'] / 60:.1f} min.")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="output/demo")
    parser.add_argument("--options", nargs="+", default=[],
                        help="key=value overrides for every stage (the teacher is cached per options)")
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats (median)")
    parser.add_argument("--json", help="also write the table as JSON to this file")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import lavis_dlip  # noqa: F401

    result = run_demo(args.output_dir, args.options, args.repeats)
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
