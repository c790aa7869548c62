"""A study's report: ``study.json``, ``study.md`` (tables in the paper's style) and plots.

Per arm: the headline test score's mean and standard deviation over seeds, its 95%
bootstrap interval over test items, the paired difference against ``init_only`` and
``no_teacher`` (same seeds, same items) with its interval, the share of the teacher's
score, and what the student costs: parameters, FLOPs and latency (``lavis_dlip.report``,
side by side with the teacher), training time and step time.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from lavis_dlip.errors import ConfigError
from lavis_dlip.study import stats
from lavis_dlip.blip.build import build_model
from lavis_dlip.config import load_config
from lavis_dlip.blip.teacher import teacher_model_config
from lavis_dlip.report import measure_models
from lavis_dlip.study.records import finished

logger = logging.getLogger(__name__)
HEADLINE = {"r_mean": "mean R@k", "CIDEr": "CIDEr", "agg_metrics": "accuracy"}


def headline(test: dict) -> float:
    """The task's headline in percent: retrieval's mean of six recalls, CIDEr x 100, VQA accuracy."""
    if "r_mean" in test:
        return float(test["r_mean"])
    if "CIDEr" in test:
        return 100.0 * float(test["CIDEr"])
    return float(test["agg_metrics"])


def _metric_name(test: dict) -> str:
    return next(v for k, v in HEADLINE.items() if k in test)


def _items(job: str) -> Optional[stats.ItemScores]:
    path = Path(job) / "result" / "test_items.json"
    return stats.from_file(path) if path.is_file() else None


def _step_s(job: str, batch: int) -> Optional[float]:
    speeds = [float(entry["train_samples_per_s"]) for line in (Path(job) / "log.txt").read_text().splitlines()
              if line.startswith('{"train_') and "train_samples_per_s" in (entry := json.loads(line))]
    return batch / (sum(speeds) / len(speeds)) if speeds else None


def collect(spec, plans) -> tuple[Optional[dict], dict[str, dict]]:
    """The teacher's evaluation and, per arm, its finished runs (records, item scores)."""

    teacher = finished(spec.output_dir / "teacher_eval")
    if teacher is not None:
        teacher["items"] = _items(teacher["job"])
    arms: dict[str, dict] = {}
    for p in plans:
        arm = arms.setdefault(p.arm.name, {"arm": p.arm, "runs": {}, "options": p.options})
        record = finished(p.out)
        if record is not None:
            batch = int(spec.base_raw(p.arm.options).run.batch_size_train)
            record.update(items=_items(record["job"]), step_s=_step_s(record["job"], batch))
            arm["runs"][p.seed] = record
    return teacher, arms


def _check(record: dict) -> None:
    """The per-item scores give the run's own headline: the statistics use what LAVIS scored."""
    items = record.get("items")
    if items is not None and not math.isclose(items.score(), headline(record["test"]), rel_tol=1e-6, abs_tol=1e-6):
        raise RuntimeError(f"{record['job']}: per-item scores give {items.score():.6f}, its metrics "
                           f"{headline(record['test']):.6f}")


def costs(spec, arms: dict[str, dict], repeats: int = 3) -> dict[str, dict]:
    """Parameters, FLOPs and latency of every arm's student (random weights, side by side
    with the teacher; arms of one shape measured once)."""
    import torch
    from omegaconf import OmegaConf

    shapes: dict[str, str] = {}
    cfgs: dict[str, Any] = {}
    for name, arm in arms.items():
        cfg = load_config(str(spec.base), arm["options"]).model_cfg
        key = OmegaConf.to_yaml(OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("init", "finetuned",
                                                                                        "pretrained")]))
        shapes[name] = key
        cfgs.setdefault(key, cfg)
    teacher_cfg = teacher_model_config(spec.base_raw().distill.teacher, str(spec.base.parent))
    torch.manual_seed(0)
    models = {"teacher": build_model(teacher_cfg, meta=False).eval()}
    models.update({f"s{i}": build_model(cfg, meta=False).eval() for i, cfg in enumerate(cfgs.values())})
    text_len = int(spec.base_raw().model.get("max_txt_len", 32))  # as the shape search counts them
    measured = {c.name: c for c in measure_models(models, None, text_len, 16, 8, "cpu", warmup=1, repeats=repeats)}
    index = {key: f"s{i}" for i, key in enumerate(cfgs)}

    def row(cost) -> dict:
        return {"params": cost.params["total"], "flops": cost.flops["total"],
                "latency_ms": sum(cost.latency_ms.values())}

    out = {name: row(measured[index[key]]) for name, key in shapes.items()}
    out["teacher"] = row(measured["teacher"])
    return out


def summarize(spec, teacher: Optional[dict], arms: dict[str, dict], cost: dict[str, dict]) -> dict:
    refs = {name: arms[name] for name in ("init_only", "no_teacher") if name in arms}
    teacher_score = headline(teacher["test"]) if teacher else None
    rows = []
    for name, arm in arms.items():
        runs = arm["runs"]
        if not runs:
            rows.append({"arm": name, "group": arm["arm"].group, "seeds": 0})
            continue
        for record in runs.values():
            _check(record)
        scores = [headline(r["test"]) for r in runs.values()]
        mean, std = stats.mean_std(scores)
        row: dict[str, Any] = {"arm": name, "group": arm["arm"].group, "axis": arm["arm"].axis,
                               "options": list(arm["arm"].options), "seeds": len(runs), "scores": scores,
                               "mean": mean, "std": std, **cost.get(name, {}),
                               "train_s": sum(r["seconds"] for r in runs.values()) / len(runs),
                               "step_s": _mean([r["step_s"] for r in runs.values()])}
        items = [r["items"] for r in runs.values()]
        if all(i is not None for i in items):
            row["ci"] = list(stats.arm_interval(items)[1:])
            for ref_name, ref in refs.items():
                common = sorted(set(runs) & set(ref["runs"]))
                if ref_name == name or not common:
                    continue
                diff = stats.paired_difference([runs[s]["items"] for s in common],
                                               [ref["runs"][s]["items"] for s in common])
                row[f"vs_{ref_name}"] = {"diff": diff[0], "ci": [diff[1], diff[2]], "seeds": common}
        if teacher_score:
            row["of_teacher"] = 100.0 * mean / teacher_score
        rows.append(row)
    t = None
    if teacher is not None:
        t = {"score": teacher_score, **cost.get("teacher", {})}
        if teacher.get("items") is not None:
            _check(teacher)
            t["ci"] = list(stats.arm_interval([teacher["items"]])[1:])
    first = teacher or next((r for a in arms.values() for r in a["runs"].values()), None)
    if first is None:
        raise ConfigError(f"{spec.path}: no run of this study has finished and its teacher is not evaluated: "
                          f"nothing to report (run the study: python -m lavis_dlip.study --cfg-path {spec.path})")
    metric = _metric_name(first["test"])
    return {"title": spec.title, "study": str(spec.path), "base": str(spec.base), "metric": metric,
            "seeds": spec.seeds, "teacher": t, "rows": rows}


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def pareto(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (lower or equal cost and higher or equal
    score, one of them strictly), by increasing cost."""
    keep = []
    for i, (c, s) in enumerate(points):
        if not any((c2 <= c and s2 >= s) and (c2 < c or s2 > s) for j, (c2, s2) in enumerate(points) if j != i):
            keep.append(i)
    return sorted(keep, key=lambda i: points[i][0])


def _fmt_diff(d: Optional[dict]) -> str:
    if not d:
        return ""
    star = " *" if stats.significant(*d["ci"]) else ""
    return f"{d['diff']:+.1f} [{d['ci'][0]:+.1f}, {d['ci'][1]:+.1f}]{star}"


def markdown(summary: dict, search: Optional[list[dict]] = None, plots: Sequence[str] = ()) -> str:
    metric = summary["metric"]
    t = summary["teacher"]
    lines = [f"# Study: {summary['title']}", "",
             f"`python -m lavis_dlip.study --cfg-path {summary['study']}`; base run `{summary['base']}`; "
             f"seeds {summary['seeds']}. Score: {metric} on the test split, mean ± standard deviation over "
             "seeds; [95% bootstrap interval over test items]; Δ: the paired difference against `init_only` / "
             "`no_teacher` (same seeds, same items), * where its interval excludes 0. Costs: the student at "
             "inference (random weights), side by side with the teacher on this machine.", ""]
    if t:
        ci = f" [{t['ci'][0]:.1f}, {t['ci'][1]:.1f}]" if t.get("ci") else ""
        lines.append(f"Teacher: {metric} {t['score']:.1f}{ci}, {t.get('params', 0) / 1e6:.2f}M parameters, "
                     f"{t.get('flops', 0) / 1e9:.2f} GFLOPs, {t.get('latency_ms', 0):.0f} ms.\n")
    lines += [f"| arm | seeds | {metric} | 95% CI | Δ init_only | Δ no_teacher | % of teacher | params | GFLOPs "
              "| latency | train | step |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        if not r.get("seeds"):
            lines.append(f"| {r['arm']} | 0 | not run yet | | | | | | | | | |")
            continue
        ci = f"[{r['ci'][0]:.1f}, {r['ci'][1]:.1f}]" if r.get("ci") else ""
        of = f"{r['of_teacher']:.1f}%" if r.get("of_teacher") is not None else ""
        step = f"{1000 * r['step_s']:.0f} ms" if r.get("step_s") else ""
        lines.append(f"| {r['arm']} | {r['seeds']} | {r['mean']:.1f} ± {r['std']:.1f} | {ci} "
                     f"| {_fmt_diff(r.get('vs_init_only'))} | {_fmt_diff(r.get('vs_no_teacher'))} | {of} "
                     f"| {r.get('params', 0) / 1e6:.2f}M | {r.get('flops', 0) / 1e9:.2f} "
                     f"| {r.get('latency_ms', 0):.0f} ms | {r['train_s'] / 60:.1f} min | {step} |")
    lines.append("")
    options = [r for r in summary["rows"] if r.get("options")]
    if options:
        lines += ["Arms (options over the base):", ""]
        lines += [f"- `{r['arm']}`: `{' '.join(r['options'])}`" for r in options]
        lines.append("")
    if search:
        lines += ["## Shape search", "", "| shape | params | GFLOPs | latency | arm | dropped because |",
                  "|---|---|---|---|---|---|"]
        for c in search:
            lat = f"{c['latency_ms']:.0f} ms" if c.get("latency_ms") is not None else ""
            lines.append(f"| {', '.join(f'{k}={v}' for k, v in c['shape'].items())} | {c['params'] / 1e6:.2f}M "
                         f"| {c['flops'] / 1e9:.3f} | {lat} | {c['arm']} | {c['dropped']} |")
        lines.append("")
    lines += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def plot(summary: dict, out: Path) -> list[str]:
    """Quality against parameters, FLOPs and latency with the Pareto front; one bar chart
    with intervals per axis group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary["rows"] if r.get("seeds") and r.get("params")]
    paths = []
    if rows:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
        for ax, (key, label, scale) in zip(axes, (("params", "parameters (M)", 1e-6), ("flops", "GFLOPs", 1e-9),
                                                   ("latency_ms", "latency (ms, CPU)", 1.0))):
            xs = [r[key] * scale for r in rows]
            ys = [r["mean"] for r in rows]
            err = [[r["mean"] - r["ci"][0] for r in rows], [r["ci"][1] - r["mean"] for r in rows]] \
                if all(r.get("ci") for r in rows) else None
            ax.errorbar(xs, ys, yerr=err, fmt="o", capsize=3, alpha=0.8)
            for x, y, r in zip(xs, ys, rows):
                ax.annotate(r["arm"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            front = pareto(list(zip(xs, ys)))
            ax.plot([xs[i] for i in front], [ys[i] for i in front], "--", color="gray", label="Pareto front")
            if summary.get("teacher"):
                ax.axhline(summary["teacher"]["score"], color="black", lw=0.8, label="teacher")
            ax.set_xlabel(label)
            ax.set_ylabel(summary["metric"])
            ax.grid(alpha=0.3)
        axes[0].legend(loc="lower right", fontsize=8)
        fig.suptitle(f"{summary['title']}: quality against cost (95% intervals over test items)")
        fig.tight_layout()
        paths.append(str(out / "quality_vs_cost.png"))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    groups: dict[str, list[dict]] = {}
    for r in summary["rows"]:
        if r.get("seeds") and r.get("group") in ("axis", "arm", "reference", "search"):
            groups.setdefault(r["group"], []).append(r)
    for group, members in groups.items():
        fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(members) + 2), 4.2))
        means = [r["mean"] for r in members]
        err = [[r["mean"] - r["ci"][0] for r in members], [r["ci"][1] - r["mean"] for r in members]] \
            if all(r.get("ci") for r in members) else None
        ax.bar(range(len(members)), means, yerr=err, capsize=4, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(members)), [r["arm"] for r in members], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(summary["metric"])
        if summary.get("teacher"):
            ax.axhline(summary["teacher"]["score"], color="black", lw=0.8, label="teacher")
            ax.legend(fontsize=8)
        ax.set_title(f"{summary['title']}: {group} arms (95% intervals)", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        paths.append(str(out / f"arms_{group}.png"))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def write(spec, plans, candidates=(), search_info: Optional[dict] = None) -> dict:
    teacher, arms = collect(spec, plans)
    cost = costs(spec, {n: a for n, a in arms.items() if a["runs"]})
    summary = summarize(spec, teacher, arms, cost)
    search = [{"shape": c.shape, "params": c.params, "flops": c.flops, "latency_ms": c.latency_ms, "arm": c.arm,
               "dropped": c.dropped} for c in candidates]
    if search:
        summary["search"] = {"candidates": search, **(search_info or {})}
        if (spec.output_dir / "winner.yaml").is_file():
            summary["search"]["winner_yaml"] = str(spec.output_dir / "winner.yaml")
    out = spec.output_dir
    out.mkdir(parents=True, exist_ok=True)
    plots = plot(summary, out)
    (out / "study.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "study.md").write_text(markdown(summary, search, plots))
    print((out / "study.md").read_text())
    return summary
