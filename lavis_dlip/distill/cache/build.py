"""Building: the teacher runs once per sample and stored augmentation, one file at a time
(a map-style train split: ``chunk`` samples a file; a stream: one file per data shard,
``distill/cache/shards.py``); rank ``r`` of ``N`` builds files ``f % N == r``, and a
killed build resumes at the files it had not written."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from lavis.common.dist_utils import get_rank, get_world_size, is_main_process
from tqdm.auto import tqdm

from lavis_dlip.datasets.stream import ShardStream
from lavis_dlip.distill.cache.config import DTYPES, MANIFEST, VERSION, CacheError, read_manifest, write_json
from lavis_dlip.distill.cache.fields import Spec, entry_bytes, extract
from lavis_dlip.distill.cache.keys import compare_keys
from lavis_dlip.distill.cache.replay import ReplayDataset
from lavis_dlip.distill.cache.shards import output_name
from lavis_dlip.distill.cache.store import chunk_name, chunk_record, drop_broken_chunks, save_chunk
from lavis_dlip.distill.capture import Capture
from lavis_dlip.distill.outputs import positive_pairs
from lavis_dlip.process import barrier


@dataclass
class Part:
    """One file of the cache: its name, the items (every stored augmentation of its samples)
    the teacher sees, and how many there are (None: known once read, a stream's shard)."""

    name: str
    items: Callable[[], Iterable[dict[str, Any]]]
    size: Optional[int]


def build(student, teacher, dataset, cache_cfg: Mapping[str, Any], key: Mapping[str, Any],
          batch_size: int, device: torch.device, progress: bool = True, spec: Optional[Spec] = None
          ) -> dict[str, Any]:
    """Write the cache of ``dataset`` (a ``ReplayDataset`` or a ``ShardStream``): this
    process's files; all ranks together build all of it. Returns the manifest's statistics
    once the cache is complete. ``spec``: the fields to store, when not those of
    ``student``'s own terms (a study's union over its arms)."""
    directory = Path(cache_cfg["dir"])
    if spec is None:
        spec = Spec.from_terms(list(student.dlip_distill.terms), int(cache_cfg["topk"]))
    k_aug = int(cache_cfg["augmentations"])
    temp = getattr(teacher.model, "temp", None)
    manifest = {"version": VERSION, "key": dict(key), "fields": spec.fields, "augmentations": k_aug,
                "temp": None if temp is None else float(temp.clamp(0.001, 0.5)), "complete": False}
    if isinstance(dataset, ShardStream):
        parts = _stream_parts(dataset, k_aug)
        manifest["layout"] = "shards"
    else:
        parts = _chunk_parts(dataset, int(cache_cfg["chunk"]), k_aug)
        manifest.update(chunk=int(cache_cfg["chunk"]), samples=len(dataset))
    names = [p.name for p in parts]
    if is_main_process():
        directory.mkdir(parents=True, exist_ok=True)
        existing = read_manifest(str(directory))
        if existing is not None:
            compare_keys(key, existing["key"], str(directory))
            drop_broken_chunks(directory, existing, names)
        else:
            write_json(directory / MANIFEST, manifest)
    barrier()
    existing = read_manifest(str(directory))
    if existing.get("complete"):
        return existing["stats"]
    todo = [p for f, p in enumerate(parts) if f % get_world_size() == get_rank() and not (directory / p.name).is_file()]
    start = time.time()
    _write(student, teacher, todo, dataset.collater, directory, spec, DTYPES[cache_cfg["dtype"]], batch_size,
           device, progress)
    barrier()
    if is_main_process():
        missing = [name for name in names if not (directory / name).is_file()]
        if missing:
            raise CacheError(f"distill.cache: {len(missing)} files of {directory} are missing after the build "
                             f"(e.g. {missing[0]})")
        manifest["chunks"] = {name: chunk_record(directory / name) for name in names}
        size = sum(r["bytes"] for r in manifest["chunks"].values())
        entries = sum(r["entries"] for r in manifest["chunks"].values())
        manifest["stats"] = {"bytes": size, "bytes_per_entry": size / max(entries, 1), "entries": entries,
                             "build_s_this_run": round(time.time() - start, 1)}
        manifest["complete"] = True
        write_json(directory / MANIFEST, manifest)
    barrier()
    return read_manifest(str(directory))["stats"]


def _chunk_parts(dataset: ReplayDataset, chunk: int, k_aug: int) -> list[Part]:
    n = len(dataset)

    def items(c: int) -> Iterable[dict[str, Any]]:
        return (dataset.item(i, a) for i in range(c * chunk, min(n, (c + 1) * chunk)) for a in range(k_aug))

    return [Part(chunk_name(c), lambda c=c: items(c), (min(n, (c + 1) * chunk) - c * chunk) * k_aug)
            for c in range(-(-n // chunk))]


def _stream_parts(stream: ShardStream, k_aug: int) -> list[Part]:
    """One file per data shard of every source, keyed by the samples' names."""
    return [Part(output_name(n, shard), lambda n=n, shard=shard: stream.stored_items(n, shard),
                 None if source.samples is None else source.samples.get(shard, 0) * k_aug)
            for n, source in enumerate(stream.sources) for shard in source.shards]


def _write(student, teacher, parts: list[Part], collate, directory: Path, spec: Spec, dtype: torch.dtype,
           batch_size: int, device: torch.device, progress: bool) -> None:
    temperatures = {f: float(f[len("lm_t"):]) for f in spec.fields if f.startswith("lm_t")}
    student.eval()
    # The student's pass only shows which token ids the teacher reads. Its queue update
    # asserts that the queue is a multiple of the batch (LAVIS base_model.py:147), which a
    # file's last batch need not be; this throwaway copy of the student keeps no queue.
    if hasattr(student, "_dequeue_and_enqueue"):
        student._dequeue_and_enqueue = lambda *args, **kwargs: None
    known = [p.size for p in parts]
    bar = tqdm(total=None if None in known else sum(known), desc="teacher cache", dynamic_ncols=True,
               disable=not (progress and is_main_process()), mininterval=1.0)
    reported = False
    for part in parts:
        entries: list[dict[str, Any]] = []
        items = iter(part.items())
        while batch := list(itertools.islice(items, batch_size)):
            names = [(item.pop("cache_key", None), item["cache_aug"]) for item in batch]
            samples = collate(batch)
            samples = {k: v.to(device) if torch.is_tensor(v) else v for k, v in samples.items()}
            samples.update(epoch=0, iters=0, num_iters_per_epoch=1)
            with torch.no_grad(), Capture(student, set()) as records:
                student(samples)
            t = teacher.replay(samples["image"], records, spec.needs, spec.points, positives=positive_pairs(samples))
            new = extract(spec, t, records, samples, temperatures, dtype)
            for entry, (name, aug) in zip(new, names):
                if name is not None:  # a stream's sample: found by its name, not its position
                    entry.update(key=name.rsplit("/", 1)[1], aug=int(aug))
            entries += new
            bar.update(len(batch))
            if not reported:
                reported = True
                bar.write(f"teacher cache: {entry_bytes(entries[0]) / 1024:.1f} KiB per sample and augmentation "
                          f"(estimate), {len(parts)} files to write in this process")
        save_chunk(entries, str(directory / part.name))
    bar.close()
