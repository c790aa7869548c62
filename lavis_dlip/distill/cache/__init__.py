"""Teacher-output cache: the frozen teacher runs once per training sample and per
stored augmentation, and distillation reads its outputs back instead of
replaying it every step ("dataset reinforcement", as MobileCLIP does at scale).

    python -m lavis_dlip.cache_teacher --cfg-path DISTILL_YAML     # build (resumable; torchrun: sharded)
    distill: {cache: DIR}      # or {dir: DIR, augmentations: 4, topk: 32, dtype: float16, chunk: 256, seed: 0}

* **Augmentations are replayed, not re-drawn.** Sample ``i``'s augmentation ``k``
  is what LAVIS's own train processor makes with every RNG seeded from
  ``(seed, i, k)``; the seed is the recorded parameter. Training epoch ``e``
  shows sample ``i`` augmentation ``(h(i) + e) mod K``, exactly as the teacher saw
  it, so no target goes stale under random augmentation.
* **What is stored** is what the configured terms read (each term's
  ``cache_fields``), per sample and in the teacher's own names: ITC features,
  ITM logits and [CLS] of the positive pairs, the layers' hidden states and
  attention maps (trimmed to the sample's tokens), and decoder logits as the
  top-k per scored position plus the log-partition.
* **Exact** (up to ``dtype``; float32 equals online replay to rounding): every
  term but ``lm_kd``, whose teacher distribution is kept as its top-k tokens
  plus one bucket for the rest (the KL of that coarsening; it is a lower bound
  of the full KL). ``itm_kd`` with ``pairs: all`` scores the student's own hard
  negatives, unknown in advance: the cache then also stores the teacher's image
  embeddings, and its text encoder runs online on the negative pairs only (no ViT).
  With ``pairs: mined`` the teacher mines them in the build batch: the cache
  stores each image's mined caption (token ids) and the pair's ITM logits.
* **Keyed** by the teacher (config and weights' sha256), the data (annotations,
  processors), the student's text handling, the augmentations and the stored
  fields: a cache built for anything else is refused with the difference named.
* **Files**: ``manifest.json`` and one ``chunk-NNNNNN.pt`` per ``chunk``
  samples (all their augmentations), written atomically, each packed into one
  buffer per dtype plus a JSON index (``save_chunk``): tens of thousands of small
  tensors would take seconds to unpickle; rank ``r`` of ``N``
  builds chunks ``c % N == r``, and a killed build resumes at the missing chunks.
"""

from lavis_dlip.distill.cache.build import build
from lavis_dlip.distill.cache.config import (
    BUILD_COMMAND, BUILDING, CACHED, DTYPES, VERSION, CacheError, cache_config, complete_manifest, read_manifest,
)
from lavis_dlip.distill.cache.fields import Spec, extract
from lavis_dlip.distill.cache.keys import compare_keys, data_key, teacher_key
from lavis_dlip.distill.cache.reader import CachedOutputs, CacheReader
from lavis_dlip.distill.cache.replay import ReplayDataset
from lavis_dlip.distill.cache.store import chunk_name, chunk_problem, load_chunk, save_chunk

__all__ = ["BUILDING", "BUILD_COMMAND", "CACHED", "DTYPES", "VERSION", "CacheError", "CacheReader", "CachedOutputs",
           "ReplayDataset", "Spec", "build", "cache_config", "chunk_name", "chunk_problem", "compare_keys",
           "complete_manifest", "data_key", "extract", "load_chunk", "read_manifest", "save_chunk", "teacher_key"]
