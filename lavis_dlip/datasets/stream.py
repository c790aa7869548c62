"""Image-text pairs streamed from webdataset shards, for ``runner_dlip``.

An epoch is ``run.train_num_samples`` samples (split evenly over the processes), not a
pass over the shards. Each epoch the shards of every source are dealt to the processes
by a permutation seeded from ``(run.seed, epoch)``, so processes read disjoint shards;
each process cycles through its own shards, in an order seeded from ``(run.seed, epoch,
rank)``, until it has its share, so no process waits on another however uneven the
shards are, and a run is reproducible. With several sources, each sample's source is
drawn by the sources' weights. A sample that does not decode, or a shard that does not
read, is skipped with a warning naming it; every sample carries how many were skipped
before it (``n_skipped``), which the training loop sums per epoch.

Shards hold one sample per key: an image member (``jpg``, ``jpeg``, ``png``, ``webp``)
and a ``json`` record (its ``caption``, and ``image_id`` where retrieval needs one) or a
``txt`` caption, as ``python -m lavis_dlip.shards`` writes them.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import webdataset as wds
from PIL import Image
from torch.utils.data import get_worker_info

from lavis_dlip.errors import ConfigError

logger = logging.getLogger(__name__)

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")


@dataclass
class Source:
    shards: list[str]
    weight: float = 1.0


def shard_list(spec: Any, where: str) -> list[str]:
    """A source's shards: a directory with ``manifest.json`` (``lavis_dlip.shards``), a brace
    pattern (``dir/train-{000000..000009}.tar``) or a list of files."""
    if isinstance(spec, str) and os.path.isdir(spec):
        manifest = Path(spec) / "manifest.json"
        if not manifest.is_file():
            raise ConfigError(f"{where}: {spec} has no manifest.json (write shards with python -m lavis_dlip.shards)")
        return [str(Path(spec) / s["name"]) for s in json.loads(manifest.read_text())["shards"]]
    files = list(wds.shardlists.expand_urls(spec)) if isinstance(spec, str) else [str(s) for s in spec]
    missing = [f for f in files if not os.path.isfile(f)]
    if not files or missing:
        raise ConfigError(f"{where}: {len(missing)} of {len(files)} shards not found"
                          f"{f', e.g. {missing[0]}' if missing else ''}")
    return files


class ShardStream(wds.DataPipeline):
    """The training split of ``dlip_wds_pairs``: a webdataset pipeline to LAVIS (which
    chains those and refuses other iterable datasets), ``__iter__`` its own."""

    def __init__(self, sources: Sequence[Source], vis_processor, text_processor):
        super().__init__()
        self.sources, self.vis_processor, self.text_processor = list(sources), vis_processor, text_processor
        self.seed, self.samples, self.rank, self.world, self.epoch = 0, 0, 0, 1, 0

    def configure(self, seed: int, samples: int, rank: int, world: int) -> None:
        """``samples``: this process's share of an epoch (``runner_dlip`` sets it)."""
        for n, source in enumerate(self.sources):
            if len(source.shards) < world:
                raise ConfigError(f"datasets.dlip_wds_pairs.build_info.sources[{n}]: {len(source.shards)} shards "
                                  f"for {world} processes; each process reads shards of its own: write more shards")
        self.seed, self.samples, self.rank, self.world = int(seed), int(samples), int(rank), int(world)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.samples

    def process_shards(self, source: Source, worker: int, workers: int) -> tuple[list[str], bool]:
        """This process's (and DataLoader worker's) shards of ``source`` this epoch, in its order;
        and whether the workers share them (fewer shards than workers: split by sample)."""
        dealt = np.random.default_rng([self.seed, self.epoch]).permutation(len(source.shards))
        mine = [source.shards[i] for i in dealt[self.rank::self.world]]
        order = np.random.default_rng([self.seed, self.epoch, self.rank]).permutation(len(mine))
        mine = [mine[i] for i in order]
        return (mine, True) if len(mine) < workers else (mine[worker::workers], False)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        quota = self.samples // workers + int(worker < self.samples % workers)
        streams = [self._samples(s, worker, workers) for s in self.sources]
        weights = np.array([s.weight for s in self.sources], dtype=np.float64)
        pick = np.random.default_rng([self.seed, self.epoch, self.rank, worker, 1])
        skipped = 0
        for _ in range(quota):
            stream = streams[int(pick.choice(len(streams), p=weights / weights.sum()))]
            while True:
                item = next(stream)
                if item is not None:
                    break
                skipped += 1
            item["n_skipped"], skipped = skipped, 0
            yield item

    def _samples(self, source: Source, worker: int, workers: int) -> Iterator[Optional[dict]]:
        """Samples of this process's shards, cycling; None for each one skipped."""
        shards, shared = self.process_shards(source, worker, workers)
        n = 0
        while True:
            good = 0
            for shard in shards:
                for key, members in _read(shard):
                    n += 1
                    if shared and n % workers != worker:
                        continue
                    if members is None:  # the shard broke off here
                        yield None
                        break
                    item = self._decode(shard, key, members)
                    good += item is not None
                    yield item
            if not good:
                raise ConfigError(f"no sample of {len(shards)} shards decodes (e.g. {shards[0]}): nothing to train on")

    def _decode(self, shard: str, key: str, members: dict[str, bytes]) -> Optional[dict]:
        try:
            image_bytes = next(members[m] for m in IMAGE_MEMBERS if m in members)
            record = json.loads(members["json"]) if "json" in members else {"caption": members["txt"].decode()}
            caption = record["caption"]
            image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
        except Exception as err:  # noqa: BLE001 (no image, no caption, an image that does not decode)
            logger.warning("%s: sample %s skipped (%s: %s)", shard, key, type(err).__name__, err)
            return None
        out = {"image": self.vis_processor(image), "text_input": self.text_processor(caption)}
        if "image_id" in record:
            out["image_id"] = int(record["image_id"])
        return out


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
