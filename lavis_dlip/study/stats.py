"""A run's test score over its items, and the statistics a study reports.

``ItemScores`` holds what ``run.item_scores`` wrote (``tasks/items.py``) as parts over
clusters: score = sum_k w_k * sum(num[:, k]) / sum(den[:, k]), where a cluster is the
unit resampled by the bootstrap (an image with its captions for retrieval, an image for
captioning, a question for VQA). With every cluster it is the task's headline score:
retrieval's mean of the six recalls (``r_mean``), CIDEr x 100, VQA accuracy.

Intervals are 95% percentile bootstraps over test items; the items are resampled once
per replicate for every seed of an arm (and of its reference), so a paired difference
compares two recipes on the same items with the same seeds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

REPLICATES = 2000
LEVEL = 0.95


@dataclass
class ItemScores:
    ids: list
    num: np.ndarray  # [clusters, parts]
    den: np.ndarray  # [clusters, parts]
    weights: np.ndarray  # [parts]

    def score(self, index: Optional[np.ndarray] = None) -> float:
        num, den = (self.num, self.den) if index is None else (self.num[index], self.den[index])
        return float((self.weights * num.sum(0) / den.sum(0)).sum())

    def scores(self, indices: np.ndarray) -> np.ndarray:
        """The score of every resample in ``indices`` [replicates, clusters] at once."""
        num, den = self.num[indices].sum(1), self.den[indices].sum(1)  # [replicates, parts]
        return (self.weights * num / den).sum(-1)


def _recall_points(ranks: np.ndarray) -> np.ndarray:
    """A query's share of R@1, R@5 and R@10, in percent (their mean over queries is the mean recall)."""
    return 100.0 * ((ranks < 1).astype(float) + (ranks < 5) + (ranks < 10)) / 3.0


def from_file(path: Path) -> ItemScores:
    """``<split>_items.json`` of any task as ``ItemScores``."""
    data = json.loads(Path(path).read_text())
    if "img_ranks" in data:  # retrieval: an image and its captions are one cluster
        img = _recall_points(np.asarray(data["img_ranks"]))
        txt = _recall_points(np.asarray(data["txt_ranks"]))
        owner = np.asarray(data["txt2img"])
        n = len(img)
        txt_sum, txt_count = np.bincount(owner, txt, n), np.bincount(owner, minlength=n).astype(float)
        num = np.stack([img, txt_sum], 1)
        den = np.stack([np.ones(n), txt_count], 1)
        return ItemScores(list(range(n)), num, den, np.array([0.5, 0.5]))
    if "CIDEr" in data:
        values = 100.0 * np.asarray(data["CIDEr"], float)
        return ItemScores(list(data["image_ids"]), values[:, None], np.ones((len(values), 1)), np.array([1.0]))
    if "accuracy" in data:
        values = np.asarray(data["accuracy"], float)
        return ItemScores(list(data["question_ids"]), values[:, None], np.ones((len(values), 1)), np.array([1.0]))
    raise ValueError(f"{path}: no per-item scores this version knows (retrieval ranks, CIDEr, VQA accuracy)")


def resamples(n: int, replicates: int = REPLICATES, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(replicates, n))


def _interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _check_items(runs: Sequence[ItemScores]) -> None:
    first = runs[0].ids
    for run in runs[1:]:
        if run.ids != first:
            raise ValueError("runs scored different test items; a study compares runs on one test split")


def arm_interval(runs: Sequence[ItemScores], replicates: int = REPLICATES, seed: int = 0
                 ) -> tuple[float, float, float]:
    """(mean over seeds, low, high): the seeds' mean score, each replicate on the same resampled items."""
    _check_items(runs)
    idx = resamples(len(runs[0].ids), replicates, seed)
    boot = np.mean([r.scores(idx) for r in runs], axis=0)
    return float(np.mean([r.score() for r in runs])), *_interval(boot)


def paired_difference(runs: Sequence[ItemScores], references: Sequence[ItemScores], replicates: int = REPLICATES,
                      seed: int = 0) -> tuple[float, float, float]:
    """(difference, low, high) of the mean over seeds of run minus reference, seed by seed
    (the two lists pair by position: the same seeds) on the same resampled items."""
    if len(runs) != len(references) or not runs:
        raise ValueError(f"paired difference needs the same seeds on both sides ({len(runs)} and {len(references)})")
    _check_items([*runs, *references])
    idx = resamples(len(runs[0].ids), replicates, seed)
    boot = np.mean([a.scores(idx) - b.scores(idx) for a, b in zip(runs, references)], axis=0)
    diff = float(np.mean([a.score() - b.score() for a, b in zip(runs, references)]))
    return diff, *_interval(boot)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def significant(low: float, high: float) -> bool:
    return not (low <= 0.0 <= high) and not math.isnan(low)
