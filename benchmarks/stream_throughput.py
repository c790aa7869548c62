"""What streaming from webdataset shards costs on this machine: shard writing, the
samples per second one data-loading process (one DataLoader worker) delivers through
``dlip_wds_pairs`` with BLIP's training transform, at the demo's 64 px and at 224 and 384 px, and
how fast a stream resumed mid-epoch replays its position (entries read, not decoded).

The 224 and 384 px cases stream synthetic photograph-like JPEGs (smooth random fields, 480 x 360,
quality 90) written with ``lavis_dlip.shards`` from a generated annotation file; the 64 px
case streams the demo data's retrieval split. One thread, in this process; writes
docs/benchmarks/stream.json (and .md), which docs/scale.md's planning table reads.
Run it alone on the machine.

    python benchmarks/stream_throughput.py [--samples 512]
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "benchmarks" / "stream"


def synthetic_split(root: Path, n: int, size=(480, 360), seed: int = 0) -> Path:
    """``n`` JPEGs with a little structure (upsampled noise) and a run yaml reading them."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    records = []
    for i in range(n):
        small = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize(size, Image.BICUBIC).save(root / "images" / f"{i:06d}.jpg", quality=90)
        records.append({"image": f"{i:06d}.jpg", "caption": f"a synthetic picture number {i}", "image_id": i})
    (root / "train.json").write_text(json.dumps(records))
    cfg = root / "run.yaml"
    cfg.write_text(json.dumps({
        "model": {"arch": "dlip_retrieval", "model_type": "test"},
        "datasets": {"dlip_local_pairs": {
            "vis_processor": {"train": {"name": "blip_image_train", "image_size": 384}},
            "text_processor": {"train": {"name": "blip_caption"}},
            "build_info": {"images": {"storage": str(root / "images")},
                           "annotations": {"train": {"storage": str(root / "train.json")}}}}},
        "run": {"task": "image_text_pretrain", "runner": "runner_dlip", "output_dir": str(root / "out"),
                "lr_sched": "linear_warmup_cosine_lr", "init_lr": 1e-4, "min_lr": 1e-5, "max_epoch": 1,
                "batch_size_train": 32, "batch_size_eval": 32}}))
    return cfg


def stream_rate(shards: Path, image_size: int, samples: int) -> dict:
    from omegaconf import OmegaConf

    from lavis.common.registry import registry

    builder = registry.get_builder_class("dlip_wds_pairs")
    cfg = OmegaConf.merge(OmegaConf.load(builder.default_config_path()).datasets.dlip_wds_pairs, {
        "vis_processor": {"train": {"name": "blip_image_train", "image_size": image_size}},
        "text_processor": {"train": {"name": "blip_caption"}},
        "build_info": {"sources": [{"shards": str(shards)}]}})
    stream = builder(cfg).build_datasets()["train"]
    stream.configure(0, samples, 0, 1)
    start = time.perf_counter()
    n = sum(1 for _ in stream)
    seconds = time.perf_counter() - start
    # resumed after `samples` samples: the time to the next one is the replay of the buffer up to there
    replay = 4 * samples
    stream.configure(0, replay + 1, 0, 1)
    stream.set_epoch(0)
    stream.resume_at({"workers": 1, "batches": 0, "roles": {0: [replay, replay]}})
    start = time.perf_counter()
    next(iter(stream))
    replay_s = time.perf_counter() - start
    manifest = json.loads((shards / "manifest.json").read_text())
    return {"image_size": image_size, "samples": n, "seconds": round(seconds, 2), "shuffle": stream.shuffle,
            "samples_per_s": round(n / seconds, 1), "bytes_per_sample": manifest["bytes"] / manifest["samples"],
            "replayed": replay, "replay_samples_per_s": round(replay / replay_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import lavis_dlip  # noqa: F401
    from lavis_dlip.shards import write_shards

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        synthetic = str(synthetic_split(Path(tmp) / "synthetic", args.samples))
        cases = [("demo retrieval split", str(REPO / "projects" / "dlip" / "demo" / "teacher_retrieval.yaml"), 64),
                 ("synthetic 480x360 JPEG, quality 90", synthetic, 224),  # the paper's pre-training size
                 ("synthetic 480x360 JPEG, quality 90", synthetic, 384)]  # its fine-tuning size
        written: dict[str, tuple[Path, dict]] = {}
        for source, cfg_path, size in cases:
            if cfg_path not in written:
                out = Path(tmp) / f"shards_{len(written)}"
                written[cfg_path] = out, write_shards(cfg_path, str(out), samples_per_shard=256, workers=1)
            out, info = written[cfg_path]
            row = stream_rate(out, size, min(args.samples, info["samples"]))
            row.update({"source": source, "write_samples_per_s": round(info["samples"] / info["seconds"], 1),
                        "write_mib_per_s": round(info["bytes"] / 2**20 / info["seconds"], 1)})
            rows.append(row)
    result = {"date": datetime.date.today().isoformat(), "threads": 1, "rows": rows}
    OUT.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = ["# Streaming from shards on this machine", "",
             "`python benchmarks/stream_throughput.py`; one process, one thread (one DataLoader worker's rate); "
             "BLIP's training transform (`blip_image_train`: random resized crop, flip, RandAugment).", "",
             "| images | shard bytes a sample | written (samples/s, MiB/s) | streamed samples/s, one worker "
             "| resume replay samples/s (read, not decoded) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['source']} at {r['image_size']} px | {r['bytes_per_sample'] / 1024:.1f} KiB | "
                     f"{r['write_samples_per_s']:.0f}, {r['write_mib_per_s']:.1f} | {r['samples_per_s']:.0f} | "
                     f"{r['replay_samples_per_s']:.0f} |")
    lines += ["", f"Streamed through the default shuffle buffer ({rows[0]['shuffle']} samples); the replay: "
              f"a stream resumed {rows[0]['replayed']} samples into its epoch, timed to its next sample."]
    lines += ["", f"Measured {result['date']} (2 CPU cores; the files in the page cache)."]
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
