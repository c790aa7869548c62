"""Building: the teacher runs once per sample and stored augmentation; rank ``r`` of ``N``
builds chunks ``c % N == r``, and a killed build resumes at the chunks it had not written."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from lavis.common.dist_utils import get_rank, get_world_size, is_main_process
from tqdm.auto import tqdm

from lavis_dlip.distill.cache.config import DTYPES, MANIFEST, VERSION, CacheError, read_manifest, write_json
from lavis_dlip.distill.cache.fields import Spec, entry_bytes, extract
from lavis_dlip.distill.cache.keys import compare_keys
from lavis_dlip.distill.cache.replay import ReplayDataset
from lavis_dlip.distill.cache.store import chunk_name, chunk_record, drop_broken_chunks, save_chunk
from lavis_dlip.distill.capture import Capture
from lavis_dlip.distill.outputs import positive_pairs
from lavis_dlip.process import barrier


def build(student, teacher, dataset: ReplayDataset, cache_cfg: Mapping[str, Any], key: Mapping[str, Any],
          batch_size: int, device: torch.device, progress: bool = True, spec: Optional[Spec] = None
          ) -> dict[str, Any]:
    """Write the cache (this process's chunks; all ranks together build all of it).
    Returns the manifest's statistics once the cache is complete. ``spec``: the fields to
    store, when not those of ``student``'s own terms (a study's union over its arms)."""
    directory = Path(cache_cfg["dir"])
    if spec is None:
        spec = Spec.from_terms(list(student.dlip_distill.terms), int(cache_cfg["topk"]))
    temperatures = {f: float(f[len("lm_t"):]) for f in spec.fields if f.startswith("lm_t")}
    dtype = DTYPES[cache_cfg["dtype"]]
    n, chunk, k_aug = len(dataset), int(cache_cfg["chunk"]), int(cache_cfg["augmentations"])
    temp = getattr(teacher.model, "temp", None)
    manifest = {"version": VERSION, "key": dict(key), "fields": spec.fields, "chunk": chunk, "samples": n,
                "augmentations": k_aug,
                "temp": None if temp is None else float(temp.clamp(0.001, 0.5)), "complete": False}
    chunks = range(math.ceil(n / chunk))
    if is_main_process():
        directory.mkdir(parents=True, exist_ok=True)
        existing = read_manifest(str(directory))
        if existing is not None:
            compare_keys(key, existing["key"], str(directory))
            drop_broken_chunks(directory, existing, chunks)
        else:
            write_json(directory / MANIFEST, manifest)
    barrier()
    existing = read_manifest(str(directory))
    if existing.get("complete"):
        return existing["stats"]
    todo = [c for c in chunks if c % get_world_size() == get_rank() and not (directory / chunk_name(c)).is_file()]
    student.eval()
    # The student's pass only shows which token ids the teacher reads. Its queue update
    # asserts that the queue is a multiple of the batch (LAVIS base_model.py:147), which a
    # chunk's last batch need not be; this throwaway copy of the student keeps no queue.
    if hasattr(student, "_dequeue_and_enqueue"):
        student._dequeue_and_enqueue = lambda *args, **kwargs: None
    start, reported = time.time(), False
    to_write = sum(min(n, (c + 1) * chunk) - c * chunk for c in todo) * k_aug
    bar = tqdm(total=to_write, desc="teacher cache", disable=not (progress and is_main_process()),
               dynamic_ncols=True, mininterval=1.0)
    for c in todo:
        pairs = [(i, a) for i in range(c * chunk, min(n, (c + 1) * chunk)) for a in range(k_aug)]
        entries: list[dict[str, Any]] = []
        for b in range(0, len(pairs), batch_size):
            items = [dataset.item(i, a) for i, a in pairs[b:b + batch_size]]
            samples = dataset.collater(items)
            samples = {k: v.to(device) if torch.is_tensor(v) else v for k, v in samples.items()}
            samples.update(epoch=0, iters=0, num_iters_per_epoch=1)
            with torch.no_grad(), Capture(student, set()) as records:
                student(samples)
            t = teacher.replay(samples["image"], records, spec.needs, spec.points, positives=positive_pairs(samples))
            entries += extract(spec, t, records, samples, temperatures, dtype)
            bar.update(len(items))
            if not reported:
                reported = True
                bar.write(f"teacher cache: {entry_bytes(entries[0]) / 1024:.1f} KiB per sample and augmentation "
                          f"(estimate), {n * k_aug} entries, {len(todo)} chunks to write in this process")
        save_chunk(entries, str(directory / chunk_name(c)))
    bar.close()
    barrier()
    if is_main_process():
        missing = [c for c in chunks if not (directory / chunk_name(c)).is_file()]
        if missing:
            raise CacheError(f"distill.cache: {len(missing)} chunks of {directory} are missing after the build")
        manifest["chunks"] = {chunk_name(c): chunk_record(directory / chunk_name(c)) for c in chunks}
        size = sum(r["bytes"] for r in manifest["chunks"].values())
        manifest["stats"] = {"bytes": size, "bytes_per_entry": size / max(n * k_aug, 1), "entries": n * k_aug,
                             "build_s_this_run": round(time.time() - start, 1)}
        manifest["complete"] = True
        write_json(directory / MANIFEST, manifest)
    barrier()
    return read_manifest(str(directory))["stats"]
