"""Teacher outputs as shards (MobileCLIP's dataset reinforcement, for a streamed train split):
one file per data shard, ``<source>-<shard stem>.pt``, holding the teacher's outputs for each
of the shard's samples at each stored augmentation, found by the sample's key. Training
streams a data shard and opens its outputs file beside it: no global index, no teacher
step. The files are ``save_chunk``'s (one buffer per dtype and a JSON index, memory-mapped);
the manifest, keys and fields are the map-style cache's."""

from __future__ import annotations

import os
from typing import Any, Callable

from lavis_dlip.distill.cache.config import BUILD_COMMAND, CACHED, CacheError
from lavis_dlip.distill.cache.reader import CacheReader
from lavis_dlip.distill.cache.store import load_chunk


def output_name(source: int, shard: str) -> str:
    """The outputs file of source ``source``'s data shard ``shard``."""
    return f"{source}-{os.path.basename(shard).split('.')[0]}.pt"


class ShardOutputs(CacheReader):
    """A complete teacher-output shard set: ``open`` a data shard's file when the stream
    starts reading that shard; its lookup gives a sample's entry at an augmentation."""

    batch_key = CACHED

    def open(self, source: int, shard: str) -> Callable[[str, int], dict[str, Any]]:
        path = self.directory / output_name(source, shard)
        try:
            index = {(e["key"], e["aug"]): e for e in load_chunk(str(path))}
        except Exception as err:
            raise CacheError(f"distill.cache: {path} cannot be read ({type(err).__name__}); run "
                             f"{BUILD_COMMAND} again: it checks every file and rebuilds the broken ones") from None

        def lookup(key: str, aug: int) -> dict[str, Any]:
            entry = index.get((key, aug))
            if entry is None:
                raise CacheError(f"distill.cache: {path} holds no teacher outputs for sample {key} of {shard} "
                                 f"(augmentation {aug}): the shard changed after the cache was built; rebuild "
                                 f"it ({BUILD_COMMAND})")
            return entry

        return lookup
