"""Image-text pairs streamed from webdataset shards, for ``runner_dlip``.

An epoch is ``run.train_num_samples`` samples (split evenly over the processes), not a
pass over the shards. Each epoch the shards of every source are dealt to the processes
by a permutation seeded from ``(run.seed, epoch)``, so processes read disjoint shards;
each process cycles through its own shards, in an order seeded from ``(run.seed, epoch,
rank)``, until it has its share, so no process waits on another however uneven the
shards are, and a run is reproducible. With several sources, each sample's source is
drawn by the sources' weights, and within a source samples pass through a shuffle buffer
(``build_info.shuffle`` samples, as webdataset's ``shuffle``; seeded like the rest), so a
batch mixes shards. A sample that does not decode, or a shard that does not read, is
skipped with a warning naming it; every sample carries how many were skipped before it
(``n_skipped``), which the training loop sums per epoch. LAVIS's LAION builders' pipelines
are read the same way (``lavis_laion_stream``).

A sample's augmentation is seeded from its name (source, shard, key), the epoch and how
many times its process has cycled through its shards (``lavis_dlip.seeds``), not from
what the process or DataLoader worker drew before it. So a stream can resume mid-epoch
(``resume_at``): every sample carries its stream's position (``stream_pos``: the worker's
role, samples it yielded, samples taken from each source's buffer), the checkpoint keeps
the last one per role, and a resumed worker replays its buffers up to there, reading the
entries without decoding them. With teacher
outputs stored as shards beside the data (``distill/cache/shards.py``), a sample shows
stored augmentation ``(h(name) + epoch + cycle) mod K``, and carries the teacher's outputs
for it.

Shards hold one sample per key: an image member (``jpg``, ``jpeg``, ``png``, ``webp``)
and a ``json`` record (its ``caption``, and ``image_id`` where retrieval needs one) or a
``txt`` caption, as ``python -m lavis_dlip.shards`` writes them.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import webdataset as wds
from lavis.datasets.datasets.laion_dataset import LaionDataset
from PIL import Image
from torch.utils.data import default_collate, get_worker_info

from lavis_dlip.errors import ConfigError
from lavis_dlip.seeds import seed_of, seeded

logger = logging.getLogger(__name__)

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
SHUFFLE = 1000  # samples in a source's shuffle buffer by default (LAVIS's LAION pipeline: 1000)
UNDECODABLE_IN_A_ROW = 1000  # then the data is broken, not a sample
OUTPUTS = "teacher_outputs"  # an item's stored teacher outputs, collated by their reader


@dataclass
class Source:
    shards: list[str]
    weight: float = 1.0
    samples: Optional[dict[str, int]] = None  # per shard, where a manifest says


def read_source(spec: Any, weight: float, where: str) -> Source:
    """A source's shards: a directory with ``manifest.json`` (``lavis_dlip.shards``: its
    samples per shard known too), a brace pattern (``dir/train-{000000..000009}.tar``) or
    a list of files."""
    if isinstance(spec, str) and os.path.isdir(spec):
        manifest = Path(spec) / "manifest.json"
        if not manifest.is_file():
            raise ConfigError(f"{where}: {spec} has no manifest.json (write shards with python -m lavis_dlip.shards)")
        shards = json.loads(manifest.read_text())["shards"]
        files = [str(Path(spec) / s["name"]) for s in shards]
        return Source(files, weight, {f: int(s["samples"]) for f, s in zip(files, shards)})
    files = list(wds.shardlists.expand_urls(spec)) if isinstance(spec, str) else [str(s) for s in spec]
    missing = [f for f in files if not os.path.isfile(f)]
    if not files or missing:
        raise ConfigError(f"{where}: {len(missing)} of {len(files)} shards not found"
                          f"{f', e.g. {missing[0]}' if missing else ''}")
    return Source(files, weight)


@dataclass(frozen=True)
class StoredAugmentations:
    """The augmentations teacher-output shards hold: ``k`` per sample, seeded from ``seed``
    (``distill.cache.augmentations`` and ``seed``)."""

    k: int
    seed: int

    def index(self, name: tuple, epoch: int, cycle: int) -> int:
        return (seed_of(self.seed, *name) + epoch + cycle) % self.k

    def seed_for(self, name: tuple, aug: int) -> int:
        return seed_of(self.seed, *name, aug)


class ShardStream(wds.DataPipeline):
    """The training split of ``dlip_wds_pairs``: a webdataset pipeline to LAVIS (which
    chains those and refuses other iterable datasets), ``__iter__`` its own."""

    def __init__(self, sources: Sequence[Source], vis_processor, text_processor):
        super().__init__()
        self.sources, self.vis_processor, self.text_processor = list(sources), vis_processor, text_processor
        self.seed, self.samples, self.rank, self.world, self.epoch = 0, 0, 0, 1, 0
        self.stored: Optional[StoredAugmentations] = None  # teacher-output shards' augmentations
        self.reader: Optional[Any] = None  # their reader (distill/cache/shards.py): set by the distillation task
        self.shuffle = 1  # samples in the shuffle buffer (build_info.shuffle; 1: shard order)
        self._resume: Optional[dict[str, Any]] = None

    def configure(self, seed: int, samples: int, rank: int, world: int) -> None:
        """``samples``: this process's share of an epoch (``runner_dlip`` sets it)."""
        for n, source in enumerate(self.sources):
            if len(source.shards) < world:
                raise ConfigError(f"datasets.dlip_wds_pairs.build_info.sources[{n}]: {len(source.shards)} shards "
                                  f"for {world} processes; each process reads shards of its own: write more shards")
        self.seed, self.samples, self.rank, self.world = int(seed), int(samples), int(rank), int(world)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._resume = int(epoch), None

    def resume_at(self, position: dict[str, Any]) -> None:
        """Continue this epoch after ``position`` (``{"workers", "batches", "roles": {role:
        [yielded, taken per source...]}}``, what the training loop recorded from ``stream_pos``)."""
        self._resume = position

    def __len__(self) -> int:
        return self.samples

    def process_shards(self, source: Source, role: int, workers: int) -> tuple[list[str], bool]:
        """This process's (and DataLoader worker role's) shards of ``source`` this epoch, in its
        order; and whether the workers share them (fewer shards than workers: split by sample)."""
        dealt = np.random.default_rng([self.seed, self.epoch]).permutation(len(source.shards))
        mine = [source.shards[i] for i in dealt[self.rank::self.world]]
        order = np.random.default_rng([self.seed, self.epoch, self.rank]).permutation(len(mine))
        mine = [mine[i] for i in order]
        return (mine, True) if len(mine) < workers else (mine[role::workers], False)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        resume = self._resume or {"workers": workers, "batches": 0, "roles": {}}
        if int(resume["workers"]) != workers:
            raise ConfigError(f"run.num_workers: the checkpoint stopped this epoch with {resume['workers']} data "
                              f"loader workers, this run has {workers}; resume with the same run.num_workers")
        # The loader takes batches from its workers in turn, so batch b came from role b mod W:
        # resumed after `batches`, worker 0 plays the role whose batch is next.
        role = (worker + int(resume["batches"])) % workers
        start = [int(v) for v in resume["roles"].get(role, [])]
        yielded, taken = (start[0], start[1:]) if start else (0, [0] * len(self.sources))
        quota = self.samples // workers + int(role < self.samples % workers)
        streams = [self._samples(n, role, workers, taken[n]) for n in range(len(self.sources))]
        weights = np.array([s.weight for s in self.sources], dtype=np.float64)
        weights /= weights.sum()
        pick = np.random.default_rng([self.seed, self.epoch, self.rank, role, 1])
        for _ in range(yielded):  # the draws of the samples before the resume point
            pick.choice(len(streams), p=weights)
        skipped = 0
        for q in range(yielded, quota):
            n, in_a_row = int(pick.choice(len(streams), p=weights)), 0
            while (item := next(streams[n])) is None:
                skipped, in_a_row, taken[n] = skipped + 1, in_a_row + 1, taken[n] + 1
                if in_a_row >= UNDECODABLE_IN_A_ROW:
                    raise ConfigError(f"{in_a_row} samples in a row of datasets.dlip_wds_pairs source {n} do not "
                                      f"decode (e.g. in {self.sources[n].shards[0]}): nothing to train on")
            taken[n] += 1
            item["n_skipped"], skipped = skipped, 0
            item["stream_pos"] = torch.tensor([role, q + 1, *taken])
            yield item

    def _entries(self, n: int, role: int, workers: int) -> Iterator[tuple[str, str, Optional[dict], int]]:
        """``(shard, key, members, cycle)`` of this process's shards of source ``n``, cycling;
        ``members`` None where a shard broke off (the rest of it is skipped)."""
        shards, shared = self.process_shards(self.sources[n], role, workers)
        read, cycle = 0, 0
        while True:
            readable = 0
            for shard in shards:
                for key, members in _read(shard):
                    read += 1
                    if shared and read % workers != role:
                        continue
                    readable += members is not None
                    yield shard, key, members, cycle
                    if members is None:
                        break
            if not readable:
                raise ConfigError(f"no shard of {len(shards)} reads (e.g. {shards[0]}): nothing to train on")
            cycle += 1

    def _samples(self, n: int, role: int, workers: int, skip: int) -> Iterator[Optional[dict]]:
        """Source ``n``'s samples, shuffled through a buffer of ``shuffle`` entries (webdataset's
        ``shuffle``, seeded like the rest), decoded; None for each one skipped. The first ``skip``
        are taken from the buffer as before, not decoded: the resume point."""
        entries = self._entries(n, role, workers)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, role, 2, n])
        buffer: list[tuple[str, str, Optional[dict], int]] = []
        pending: Counter = Counter()  # a shard's entries in the buffer: its teacher outputs stay open while any
        opened: dict[str, Any] = {}
        for taken in itertools.count(1):
            while len(buffer) < max(self.shuffle, 1):
                buffer.append(next(entries))
                pending[buffer[-1][0]] += 1
            j = int(rng.integers(len(buffer)))
            (shard, key, members, cycle), buffer[j] = buffer[j], buffer[-1]
            buffer.pop()
            pending[shard] -= 1
            if taken > skip:
                if members is None:
                    yield None
                else:
                    if self.reader is not None and shard not in opened:
                        opened[shard] = self.reader.open(n, shard)
                    yield self._decode((n, os.path.basename(shard), key), shard, members, cycle, opened.get(shard))
            if not pending[shard]:
                opened.pop(shard, None)

    def stored_items(self, n: int, shard: str) -> Iterator[dict[str, Any]]:
        """Every decodable sample of source ``n``'s ``shard`` at each stored augmentation, in
        order, with ``cache_key`` and ``cache_aug``: what the teacher-output shard is built from."""
        for key, members in _read(shard):
            if members is None:
                return
            name = (n, os.path.basename(shard), key)
            for aug in range(self.stored.k):
                item = self._decode(name, shard, members, aug=aug)
                if item is None:
                    break
                yield item

    def _decode(self, name: tuple, shard: str, members: dict[str, bytes], cycle: int = 0, outputs=None,
                aug: Optional[int] = None) -> Optional[dict]:
        """The sample ``name`` (source, shard, key): its image augmented under its own seed; with
        stored augmentations, the one this epoch shows (or ``aug``) and, with ``outputs``, the
        teacher's outputs for it."""
        try:
            image_bytes = next(members[m] for m in IMAGE_MEMBERS if m in members)
            record = json.loads(members["json"]) if "json" in members else {"caption": members["txt"].decode()}
            caption = record["caption"]
            image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
        except Exception as err:  # noqa: BLE001 (no image, no caption, an image that does not decode)
            logger.warning("%s: sample %s skipped (%s: %s)", shard, name[2], type(err).__name__, err)
            return None
        out: dict[str, Any] = {}
        if self.stored is None:
            seed = seed_of(self.seed, self.epoch, cycle, *name)
        else:
            aug = self.stored.index(name, self.epoch, cycle) if aug is None else aug
            seed = self.stored.seed_for(name, aug)
            out.update(cache_key=f"{name[1]}/{name[2]}", cache_aug=aug)
            if outputs is not None:
                out[OUTPUTS] = outputs(name[2], aug)
        with seeded(seed):
            out.update(image=self.vis_processor(image), text_input=self.text_processor(caption))
        if "image_id" in record:
            out["image_id"] = int(record["image_id"])
        return out

    def collater(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """The default collation, with the teacher's outputs (if any) collated by their reader."""
        entries = [item.pop(OUTPUTS) for item in items if OUTPUTS in item]
        batch = default_collate(items)
        if entries:
            batch[self.reader.batch_key] = self.reader.collate_entries(entries)
        return batch


def lavis_laion_stream(pipeline: Any) -> Optional[ShardStream]:
    """LAVIS's LAION builders' train split (``laion_dataset.py``: a ``wds.DataPipeline`` from
    ``ResampledShards(build_info.storage)`` to ``LaionDataset.to_dict``) as a ``ShardStream``
    over the same shards, with the same processors and members (``jpg``, ``json`` caption);
    None for any other pipeline."""
    stages = getattr(pipeline, "pipeline", None) or [None]
    to_dict = (getattr(stages[-1], "args", None) or [None])[0]
    if not isinstance(stages[0], wds.ResampledShards) or not isinstance(getattr(to_dict, "__self__", None),
                                                                         LaionDataset):
        return None
    laion = to_dict.__self__
    source = read_source(list(stages[0].urls), 1.0, "LAVIS's LAION builder: build_info.storage")
    stream = ShardStream([source], laion.vis_processor, laion.text_processor)
    stream.shuffle = SHUFFLE
    return stream


def stream_lavis_laion(datasets: dict[str, dict[str, Any]]) -> None:
    """Replace, in a built ``{dataset: {split: ...}}``, every LAVIS LAION pipeline by its stream."""
    for splits in datasets.values():
        for split, dataset in splits.items():
            laion = lavis_laion_stream(dataset)
            splits[split] = dataset if laion is None else laion


def _read(shard: str) -> Iterator[tuple[str, Optional[dict[str, bytes]]]]:
    """``(key, {member: bytes})`` of a tar shard in order; ``(shard, None)`` where it stops reading."""
    key, members = None, {}
    try:
        with tarfile.open(shard, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                stem, _, ext = os.path.basename(info.name).partition(".")
                if stem != key and key is not None:
                    yield key, members
                    members = {}
                key = stem
                members[ext.lower()] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        logger.warning("%s: unreadable after sample %s (%s: %s); the rest of the shard is skipped",
                       shard, key, type(err).__name__, err)
        yield shard, None
        return
    if key is not None:
        yield key, members
