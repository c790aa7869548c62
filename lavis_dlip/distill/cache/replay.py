"""Augmentation replay: sample ``i``'s augmentation ``k`` is what LAVIS's train processor makes
with every RNG seeded from ``(seed, i, k)``; epoch ``e`` shows augmentation ``(h(i) + e) mod K``."""

from __future__ import annotations

from typing import Any, Optional

import torch

from lavis_dlip.distill.cache.config import CACHED
from lavis_dlip.seeds import seed_of, seeded


class ReplayDataset(torch.utils.data.Dataset):
    """A LAVIS train dataset whose item ``i`` in epoch ``e`` is augmentation
    ``(h(i) + e) mod K`` of sample ``i``, with ``cache_index`` and ``cache_aug``;
    with a ``reader`` (training), each batch also holds the teacher's outputs."""

    def __init__(self, base: torch.utils.data.Dataset, augmentations: int, seed: int):
        self.base, self.augmentations, self.seed, self.epoch = base, augmentations, seed, 0
        self.reader: Optional[Any] = None  # a cache.reader.CacheReader: set by the distillation task

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def item(self, index: int, aug: int) -> dict:
        with seeded(seed_of(self.seed, index, aug)):
            out = dict(self.base[index])
        out.update(cache_index=index, cache_aug=aug)
        return out

    def __getitem__(self, index: int) -> dict:
        return self.item(index, (seed_of(self.seed, index) + self.epoch) % self.augmentations)

    def collater(self, items: list[dict]) -> dict:
        """The LAVIS dataset's own collater (VQA's builds its own keys), plus the cache
        keys and, with a ``reader``, the teacher's outputs (``CACHED``): gathered in the
        data loader's workers, beside the training step instead of inside it."""
        keys = {k: torch.tensor([item.pop(k) for item in items]) for k in ("cache_index", "cache_aug")}
        collate = getattr(self.base, "collater", None) or torch.utils.data.default_collate
        batch = {**collate(items), **keys}
        if self.reader is not None:
            batch[CACHED] = self.reader.collate(keys["cache_index"].tolist(), keys["cache_aug"].tolist())
        return batch

    def __getattr__(self, name: str) -> Any:  # annotation, vis_processor ... of the LAVIS dataset
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)
