"""Build a distillation run's teacher-output cache (``distill.cache``):
    python -m lavis_dlip.cache_teacher --cfg-path DISTILL_YAML [--options k=v ...]
    torchrun --nproc_per_node=N -m lavis_dlip.cache_teacher --cfg-path DISTILL_YAML

The same yaml then trains from the cache (``python -m lavis_dlip.train``). Killed,
the command picks up at the chunks it had not written; run on a finished cache it
only reports it. What is stored and what is exact: ``lavis_dlip/distill/cache/`` and docs/distillation.md.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Optional, Sequence

from lavis_dlip.cli import main_guard, parse_args, setup_seeds
from lavis_dlip import compat
from lavis_dlip.blip.tokenizer import tokenizer_source
from lavis_dlip.config import load_config
from lavis_dlip.distill.cache import BUILDING, Spec, build
from lavis_dlip.errors import ConfigError
from lavis_dlip.process import keep_freed_memory, resolve_device


def build_cache(cfg_path: str, options: Optional[Sequence[str]] = None,
                fields: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Build (or finish) the cache ``cfg_path``'s ``distill.cache`` names; its statistics.
    ``fields``: store these instead of what this run's terms read (a superset: a study's
    cache serves every arm, each reading its own subset)."""
    import lavis.tasks as tasks
    from lavis.common.logger import setup_logger

    token = BUILDING.set(True)
    try:
        cfg = load_config(cfg_path, options)
        distill = cfg.config.get("distill")
        if distill is None or distill.get("cache") is None:
            raise ConfigError(f"{cfg_path}: distill.cache is not set; give the directory to build, "
                              "e.g. --options distill.cache=cache/teacher")
        compat.init_distributed_mode(cfg.run_cfg)
        setup_seeds(cfg.run_cfg)
        setup_logger()
        task = tasks.setup_task(cfg)
        task.build_datasets(cfg)
        with tokenizer_source(cfg.model_cfg.get("tokenizer")):
            student = task.build_model(cfg)
        device = resolve_device(cfg.run_cfg)
        keep_freed_memory(cfg.run_cfg, device)
        key, spec = task.cache_key(cfg, student), None
        if fields is not None:
            spec = Spec(sorted(fields), "image_embeds" in fields, int(task.cache_cfg["topk"]))
            key["fields"]["fields"] = spec.fields
        stats = build(student.to(device), task.teacher.to(device), task.cache_dataset, task.cache_cfg, key,
                      int(cfg.run_cfg.batch_size_train), device, progress=bool(cfg.run_cfg.get("progress", True)),
                      spec=spec)
    finally:
        BUILDING.reset(token)
    logging.info("teacher cache %s: %s", task.cache_cfg["dir"], json.dumps(stats))
    print(f"teacher cache {task.cache_cfg['dir']}: {stats['entries']} entries, "
          f"{stats['bytes'] / 2**20:.1f} MiB ({stats['bytes_per_entry'] / 1024:.1f} KiB per sample and augmentation)")
    return stats


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args("Build the teacher-output cache of a distillation yaml (distill.cache).", argv)
    return main_guard(lambda: build_cache(args.cfg_path, args.options))

if __name__ == "__main__":
    sys.exit(main())
