"""What a cache was built from: the teacher (config and weights' sha256), the data, the
student's text handling, the augmentations and the fields; a cache built for anything else
is refused with the difference named."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping

from omegaconf import OmegaConf

from lavis_dlip.blip.teacher import teacher_model_config, weights_identity
from lavis_dlip.distill.cache.config import BUILD_COMMAND, CacheError


def teacher_key(teacher_cfg: Mapping[str, Any], base_dir: str) -> dict[str, Any]:
    """The teacher's identity without loading it: its model config and its weights' file."""
    model_cfg = OmegaConf.to_container(teacher_model_config(teacher_cfg, base_dir), resolve=True)
    weights = teacher_cfg.get("checkpoint")
    if not teacher_cfg.get("load_weights", True):
        identity = "random"
    elif weights:
        identity = weights_identity(str(weights))
    else:
        identity = str(weights or model_cfg.get("finetuned") or model_cfg.get("pretrained"))
    return {"model": digest(model_cfg), "weights": identity}


def data_key(dataset, name: str, ds_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A map-style train split: its annotations, image folder and processors."""
    return {"dataset": name, "samples": len(dataset),
            "annotations": digest(getattr(dataset, "annotation", None)),
            "images": str(getattr(dataset, "vis_root", "")), "processors": _processors(ds_cfg)}


def stream_data_key(stream, name: str, ds_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A streamed train split: every source's shards (names and sizes, not where they lie) and the processors."""
    shards = [[[os.path.basename(s), os.path.getsize(s)] for s in source.shards] for source in stream.sources]
    return {"dataset": name, "shards": digest(shards), "processors": _processors(ds_cfg)}


def _processors(ds_cfg: Mapping[str, Any]) -> str:
    return digest({k: OmegaConf.to_container(ds_cfg.get(k), resolve=True) if ds_cfg.get(k) is not None else None
                   for k in ("vis_processor", "text_processor")})


def digest(value: Any) -> str:
    """A short, stable hash of a JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def compare_keys(expected: Mapping[str, Any], found: Mapping[str, Any], directory: str) -> None:
    """A cache serves a run built from the same teacher, data, student text handling and
    augmentations whose terms read fields it holds (it may hold more: a study's shared cache
    holds what all of its arms read), at the same top-k and dtype."""
    for part in ("version", "teacher", "data", "student_text", "augmentations", "fields"):
        want, have = expected.get(part), found.get(part)
        if part == "fields" and isinstance(want, Mapping) and isinstance(have, Mapping):
            same = set(want["fields"]) <= set(have["fields"]) and all(want[k] == have.get(k) for k in want
                                                                       if k != "fields")
        else:
            same = want == have
        if not same:
            what = {"version": "another cache format", "teacher": "another teacher (config or weights)",
                    "data": "other data (annotations, images or processors)",
                    "student_text": "another student tokenizer or text length",
                    "augmentations": "other augmentations (distill.cache augmentations or seed)",
                    "fields": "other loss terms (their stored outputs, topk, dtype or temperature)"}[part]
            raise CacheError(f"distill.cache: {directory} was built for {what}: {part} {have} != {want} now; "
                             f"rebuild it ({BUILD_COMMAND}) or point distill.cache elsewhere")
