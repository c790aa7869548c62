"""The demo's table: each task's headline score and how its metrics are shown, and the
markdown rows of ``demo.json`` (printed by the demo, rendered into the docs by
benchmarks/doc_tables.py). Plain Python: nothing here imports LAVIS or torch."""

from __future__ import annotations

RECALLS = ["txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10"]
# task: (dataset in its yaml, headline score)
TASKS = {
    "retrieval": ("dlip_local_retrieval", "mean R@k"),
    "caption": ("dlip_local_caption", "CIDEr"),
    "vqa": ("dlip_local_vqa", "VQA accuracy"),
}


def score(task: str, metrics: dict) -> float:
    """The headline number of a task, in percent."""
    if task == "retrieval":
        return sum(float(metrics.get(k, 0.0)) for k in RECALLS) / len(RECALLS)
    if task == "caption":
        return 100.0 * float(metrics.get("CIDEr", 0.0))
    return float(metrics.get("agg_metrics", 0.0))


def shown(task: str, metrics: dict) -> str:
    if task == "retrieval":
        return ("text R@1/5/10 " + " / ".join(f"{metrics[k]:.1f}" for k in RECALLS[:3])
                + ", image R@1/5/10 " + " / ".join(f"{metrics[k]:.1f}" for k in RECALLS[3:]))
    if task == "caption":
        return f"BLEU-4 {100 * metrics['Bleu_4']:.1f}, CIDEr {100 * metrics['CIDEr']:.1f}"
    return f"accuracy {metrics['agg_metrics']:.1f}"


def demo_rows(result: dict) -> list[str]:
    lines = ["| task | model | params | speed-up | test metrics | score | % of teacher | time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        time_txt = (f"cached (trained in {r['trained_s'] / 60:.1f} min)" if r["cached"] and r["trained_s"]
                    else f"{r['seconds'] / 60:.1f} min")
        retained = "n/a (teacher scored 0)" if r["retained"] is None else f"{r['retained']:.1f}%"
        lines.append(f"| {r['task']} | {r['model']} | {r['params'] / 1e6:.2f}M | {r['speedup']:.2f}x "
                     f"| {shown(r['task'], r['test'])} | {TASKS[r['task']][1]} {r['score']:.1f} | {retained} "
                     f"| {time_txt} |")
    return lines


def cache_rows(result: dict) -> list[str]:
    lines = ["| task | entries | size | per sample | build time |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        c = r.get("teacher_cache")
        if c:
            built = f"{c['built_s'] / 60:.1f} min" if c.get("built_s") is not None else "n/a"
            built = f"reused (built in {built})" if c["cached"] else built
            lines.append(f"| {r['task']} | {c['entries']} | {c['bytes'] / 2**20:.1f} MiB "
                         f"| {c['bytes_per_entry'] / 1024:.1f} KiB | {built} |")
    return lines
