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

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F

from lavis_dlip.distill.outputs import MinedPairs, positive_pairs, scored_positions
from lavis_dlip.errors import ConfigError, check_keys
from lavis_dlip import checkpoint
from lavis_dlip.distill.capture import Capture
from lavis_dlip.blip.teacher import teacher_model_config, weights_identity
from lavis_dlip.process import barrier

VERSION = 2  # 2: chunks packed into one buffer per dtype (save_chunk)
CACHE_KEYS = ("dir", "augmentations", "topk", "dtype", "chunk", "seed")
DEFAULTS = {"augmentations": 1, "topk": 32, "dtype": "float16", "chunk": 256, "seed": 0}
DTYPES = {"float16": torch.float16, "float32": torch.float32}
MANIFEST = "manifest.json"
CACHED = "teacher_cache"  # the batch key of the teacher's outputs, as ReplayDataset collates them
BUILD_COMMAND = "python -m lavis_dlip.cache_teacher --cfg-path <the same yaml>"

# Set while the cache is being built: the directory need not hold a cache yet.
BUILDING: contextvars.ContextVar[bool] = contextvars.ContextVar("lavis_dlip_cache_building", default=False)


class CacheError(ConfigError):
    """The teacher-output cache is missing, incomplete or built for something else."""


# ----------------------------------------------------------------------------- configuration
def cache_config(raw: Any, base_dir: str = ".") -> Optional[dict[str, Any]]:
    """``distill.cache`` (a directory, or a mapping) with defaults; None when unset."""
    if raw is None:
        return None
    cfg = {"dir": raw} if isinstance(raw, str) else dict(raw)
    check_keys(cfg, CACHE_KEYS, "distill.cache")
    if not cfg.get("dir"):
        raise ConfigError("distill.cache.dir: give the cache directory (python -m lavis_dlip.cache_teacher builds it)")
    cfg = {**DEFAULTS, **cfg}
    for key in ("augmentations", "topk", "chunk"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise ConfigError(f"distill.cache.{key} must be an integer >= 1, got {cfg[key]!r}")
    if not isinstance(cfg["seed"], int) or cfg["seed"] < 0:
        raise ConfigError(f"distill.cache.seed must be an integer >= 0, got {cfg['seed']!r}")
    if cfg["dtype"] not in DTYPES:
        raise ConfigError(f"distill.cache.dtype must be one of {', '.join(DTYPES)}, got {cfg['dtype']!r}")
    cfg["dir"] = os.path.join(base_dir, os.path.expanduser(str(cfg["dir"])))
    if not BUILDING.get():
        complete_manifest(cfg["dir"])
    return cfg


def read_manifest(directory: str) -> Optional[dict[str, Any]]:
    path = Path(directory) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def complete_manifest(directory: str) -> dict[str, Any]:
    """The manifest of a finished cache, or a ``CacheError`` that says how to build it."""
    manifest = read_manifest(directory)
    if manifest is None or not manifest.get("complete"):
        state = "holds no cache" if manifest is None else "holds an unfinished cache (the build was stopped)"
        raise CacheError(f"distill.cache: {directory} {state}; build it with {BUILD_COMMAND}")
    return manifest


# ----------------------------------------------------------------------------- augmentation replay
def _seed(*parts: Any) -> int:
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:8], 16)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Every RNG a LAVIS processor draws from (torchvision: torch's CPU generator;
    RandAugment: numpy; python's random) seeded for the block, and restored after it.
    Only the CPU generator: ``torch.manual_seed`` also queues the CUDA generators'
    seeding with a stack trace, a cost on every sample."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


class ReplayDataset(torch.utils.data.Dataset):
    """A LAVIS train dataset whose item ``i`` in epoch ``e`` is augmentation
    ``(h(i) + e) mod K`` of sample ``i``, with ``cache_index`` and ``cache_aug``;
    with a ``reader`` (training), each batch also holds the teacher's outputs."""

    def __init__(self, base: torch.utils.data.Dataset, augmentations: int, seed: int):
        self.base, self.augmentations, self.seed, self.epoch = base, augmentations, seed, 0
        self.reader: Optional[CacheReader] = None

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def item(self, index: int, aug: int) -> dict:
        with seeded(_seed(self.seed, index, aug)):
            out = dict(self.base[index])
        out.update(cache_index=index, cache_aug=aug)
        return out

    def __getitem__(self, index: int) -> dict:
        return self.item(index, (_seed(self.seed, index) + self.epoch) % self.augmentations)

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

# ----------------------------------------------------------------------------- what is stored
STREAM_FIELDS = {"text", "fusion", "decoder"}  # per-token fields trimmed to the sample's tokens


@dataclass
class Spec:
    """The fields the terms read, and the teacher passes that make them."""

    fields: list[str]
    online_fusion: bool  # itm_kd on the student's hard negatives: they are scored online
    topk: int

    @classmethod
    def from_terms(cls, terms: list, topk: int) -> Spec:
        fields: set[str] = set()
        for term in terms:
            fields |= term.cache_fields()
        online = "online_fusion" in fields
        fields.discard("online_fusion")
        if online:  # positives from the cache; negatives scored online from the cached image embeddings
            fields |= {"itm_pos", "image_embeds"}
        return cls(sorted(fields), online, topk)

    @property
    def needs(self) -> set[str]:
        needs = set()
        for field in self.fields:
            stream = field.split(".")[0]
            if field in ("image_feat", "text_feat") or stream == "text":
                needs.add("text")
            if field in ("itm_pos", "fusion_cls") or stream == "fusion":
                needs.add("fusion")
            if field == "itm_mined":
                needs |= {"text", "fusion", "fusion_mined"}
            if field == "decoder_cls" or stream == "decoder" or field.startswith("lm_t"):
                needs.add("decoder")
        return needs

    @property
    def points(self) -> set[tuple[str, str, int]]:
        return {(s, k, int(j)) for f in self.fields if f.count(".") == 2 for s, k, j in [f.split(".")]}


def _rows_per_sample(samples: Mapping, batch: int, stream: str) -> list[int]:
    """Decoder rows per sample: BLIP VQA decodes every answer of a question."""
    if stream == "decoder" and "n_answers" in samples:
        return [int(n) for n in samples["n_answers"]]
    return [1] * batch


def _trim(x: torch.Tensor, kind: str, length: int) -> torch.Tensor:
    """One row's tensor cut to its ``length`` tokens (right padding): the token dim is
    the second to last (hidden ``[L, W]``, cross ``[H, L, keys]``); self-attention
    ``[H, L, L]`` has tokens as keys too."""
    return x[..., :length, :length] if kind == "attn" else x[..., :length, :]


def _pad(x: torch.Tensor, kind: str, length: int) -> torch.Tensor:
    """``_trim``'s inverse: zeros up to the batch's ``length`` tokens."""
    missing = length - x.shape[-2]
    if missing <= 0:
        return x
    return F.pad(x, (0, missing if kind == "attn" else 0, 0, missing))


def _fit_last(x: torch.Tensor, length: int) -> torch.Tensor:
    """Attention keys cut or zero-padded to ``length``: beyond a row's own memory
    tokens they are padding, which attention gives no weight."""
    return x[..., :length] if x.shape[-1] >= length else F.pad(x, (0, length - x.shape[-1]))


def extract(spec: Spec, t, student_records, samples: Mapping, temperatures: dict[str, float],
            dtype: torch.dtype) -> list[dict[str, Any]]:
    """Per-sample entries (field -> list of rows, on the CPU) of one build batch:
    ``t`` the teacher's outputs, ``student_records`` what the student's forward fed it."""
    batch = samples["image"].shape[0]
    entries: list[dict[str, Any]] = [{} for _ in range(batch)]

    def put(field: str, rows: torch.Tensor, stream: str, per_row=lambda r, x: x) -> None:
        counts = _rows_per_sample(samples, batch, stream)
        r = 0
        for i, n in enumerate(counts):
            entries[i][field] = [per_row(r + j, rows[r + j]) for j in range(n)]
            r += n

    def lengths(stream: str) -> torch.Tensor:
        return student_records.find(stream).attention_mask.sum(1)

    text_call = student_records.find("text") or student_records.find("fusion")
    if text_call is not None:
        for i, n in enumerate(text_call.attention_mask.sum(1).tolist()):
            entries[i]["text_len"] = int(n)
    for field in spec.fields:
        parts = field.split(".")
        if len(parts) == 3:
            stream, kind, j = parts[0], parts[1], int(parts[2])
            x = t.layer(stream, kind, j)[0]
            if stream == "vision":
                put(field, x, stream)
            else:
                lens = lengths(stream)
                put(field, x, stream, lambda r, row, lens=lens, kind=kind: _trim(row, kind, int(lens[r])))
        elif field.startswith("lm_t"):  # only at scored positions, as lm_kd reads them
            keep = scored_positions(student_records.find("decoder"))
            logits = t.lm_rows(keep)[0].float()
            top = logits.topk(spec.topk, dim=-1)
            lse = torch.logsumexp(logits / temperatures[field], dim=-1)
            ends = keep.sum(1).cumsum(0).tolist()

            def lm_row(r, _row, top=top, lse=lse, ends=ends):
                a, b = (ends[r - 1] if r else 0), ends[r]
                return {"values": top.values[a:b], "indices": top.indices[a:b].int(), "lse": lse[a:b]}

            put(field, keep, "decoder", lm_row)
        elif field == "itm_mined":  # the mined caption's token ids (int32, its own length) and the logits
            mined = t.mined
            put(field, mined.logits, "vision",
                lambda r, row, m=mined: {"logits": row, "ids": m.input_ids[r][m.attention_mask[r].bool()].int()})
        else:
            stream = "decoder" if field == "decoder_cls" else "vision"
            value = {"image_feat": lambda: t.image_feat, "text_feat": lambda: t.text_feat,
                     "fusion_cls": lambda: t.fusion_cls, "itm_pos": lambda: t.itm_logits("positives"),
                     "decoder_cls": lambda: t.decoder_cls, "image_embeds": lambda: t.image_embeds}[field]()
            put(field, value, stream)
    return [_to_cpu(e, dtype) for e in entries]


def _to_cpu(value: Any, dtype: torch.dtype) -> Any:
    """Compact CPU copies (a saved view would drag its whole batch tensor along)."""
    if isinstance(value, dict) and "indices" in value:  # an lm row: logits in dtype, ids int32, lse float32
        return {"values": value["values"].detach().cpu().to(dtype).clone(),
                "indices": value["indices"].cpu().clone(), "lse": value["lse"].detach().cpu().float().clone()}
    if isinstance(value, dict):
        return {k: _to_cpu(v, dtype) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v, dtype) for v in value]
    if torch.is_tensor(value):  # token ids stay integers
        return value.detach().cpu().to(dtype if value.is_floating_point() else value.dtype).clone()
    return value


def entry_bytes(entry: Mapping[str, Any]) -> int:
    def size(v):
        if torch.is_tensor(v):
            return v.numel() * v.element_size()
        if isinstance(v, dict):
            return sum(size(x) for x in v.values())
        if isinstance(v, list):
            return sum(size(x) for x in v)
        return 0
    return size(dict(entry))


# ----------------------------------------------------------------------------- keys
def teacher_key(teacher_cfg: Mapping[str, Any], base_dir: str) -> dict[str, Any]:
    """The teacher's identity without loading it: its model config and its weights' file."""
    from omegaconf import OmegaConf

    model_cfg = OmegaConf.to_container(teacher_model_config(teacher_cfg, base_dir), resolve=True)
    weights = teacher_cfg.get("checkpoint")
    if not teacher_cfg.get("load_weights", True):
        identity = "random"
    elif weights:
        identity = weights_identity(str(weights))
    else:
        identity = str(weights or model_cfg.get("finetuned") or model_cfg.get("pretrained"))
    return {"model": _digest(model_cfg), "weights": identity}


def data_key(dataset, name: str, ds_cfg: Mapping[str, Any]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    procs = {k: OmegaConf.to_container(ds_cfg.get(k), resolve=True) if ds_cfg.get(k) is not None else None
             for k in ("vis_processor", "text_processor")}
    return {"dataset": name, "samples": len(dataset),
            "annotations": _digest(getattr(dataset, "annotation", None)),
            "images": str(getattr(dataset, "vis_root", "")), "processors": _digest(procs)}


def _digest(value: Any) -> str:
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


# ----------------------------------------------------------------------------- reading
class CacheReader:
    """Entries of a complete cache, memory-mapped chunk by chunk."""

    def __init__(self, directory: str, expected_key: Mapping[str, Any]):
        manifest = complete_manifest(directory)
        compare_keys(expected_key, manifest["key"], directory)
        self.directory, self.manifest = Path(directory), manifest
        self.fields: list[str] = list(expected_key["fields"]["fields"])  # what this run's terms read
        self.chunk, self.augmentations = int(manifest["chunk"]), int(manifest["augmentations"])
        self.temp = float(manifest["temp"]) if manifest.get("temp") is not None else None
        self.online_fusion = "image_embeds" in self.fields
        self._open: dict[int, Any] = {}
        for name, record in (manifest.get("chunks") or {}).items():  # sizes only: a stat per chunk
            problem = chunk_problem(self.directory / name, record, full=False)
            if problem:
                raise CacheError(f"distill.cache: {self.directory / name} is damaged ({problem}); run "
                                 f"{BUILD_COMMAND} again: it checks every chunk and rebuilds the broken ones")

    def entry(self, index: int, aug: int) -> dict[str, Any]:
        c = index // self.chunk
        if c not in self._open:
            path = self.directory / chunk_name(c)
            try:
                self._open[c] = load_chunk(str(path))
            except Exception as err:
                raise CacheError(f"distill.cache: {path} cannot be read ({type(err).__name__}); run "
                                 f"{BUILD_COMMAND} again: it checks every chunk and rebuilds the broken ones") from None
        return self._open[c][(index - c * self.chunk) * self.augmentations + aug]

    def collate(self, indices: list[int], augs: list[int]) -> dict[str, Any]:
        """The stored outputs of a batch of samples (``indices``, each at augmentation
        ``augs``), each field's rows stacked in the stored dtype; per-token fields padded
        to the batch's longest row, and ``text_len`` (-1: none stored) to check them by.
        Nested dicts of tensors only, which LAVIS moves to the GPU with the batch."""
        entries = [self.entry(i, k) for i, k in zip(indices, augs)]
        out: dict[str, Any] = {"text_len": torch.tensor([e.get("text_len", -1) for e in entries])}
        for field in self.fields:
            rows = [row for e in entries for row in e[field]]
            parts = field.split(".")
            if field.startswith("lm_t"):
                out[field] = {k: torch.cat([r[k] for r in rows]) for k in ("values", "indices", "lse")}
            elif field == "itm_mined":  # right-padded to the longest mined caption
                out[field] = {
                    "ids": torch.nn.utils.rnn.pad_sequence([r["ids"].long() for r in rows], batch_first=True),
                    "mask": torch.nn.utils.rnn.pad_sequence([torch.ones(len(r["ids"]), dtype=torch.long)
                                                             for r in rows], batch_first=True),
                    "logits": torch.stack([r["logits"] for r in rows])}
            elif len(parts) == 3 and parts[0] in STREAM_FIELDS:
                length = max(r.shape[-2] for r in rows)
                rows = [_pad(r, parts[1], length) for r in rows]
                if parts[1] == "cross":  # keys: the memory, its own length per row when it is text (VQA's question)
                    keys = max(r.shape[-1] for r in rows)
                    rows = [_fit_last(r, keys) for r in rows]
                out[field] = torch.stack(rows)
            else:
                out[field] = torch.stack(rows)
        return out

    def outputs(self, samples: Mapping, records, teacher=None) -> CachedOutputs:
        """The teacher's outputs for this batch (``samples[CACHED]``, else collated here),
        padded to the student's token lengths; ``teacher`` scores the student's hard
        negatives when ``itm_kd`` needs them."""
        device = samples["image"].device
        cached = samples.get(CACHED)
        if cached is None:
            cached = self.collate(samples["cache_index"].tolist(), samples["cache_aug"].tolist())
        call = records.find("text") or records.find("fusion")
        if call is not None:
            stored, now = cached["text_len"].tolist(), call.attention_mask.sum(1).tolist()
            for i, was, n in zip(samples["cache_index"].tolist(), stored, now):
                if was not in (-1, int(n)):
                    raise CacheError(f"distill.cache: sample {i} had {was} text tokens when the cache "
                                     f"was built and has {int(n)} now: the data or tokenizer changed; rebuild it")
        fields: dict[str, Any] = {}
        for field in self.fields:
            value, parts = cached[field], field.split(".")
            if field.startswith("lm_t"):
                fields[field] = tuple(value[k].to(device) for k in ("values", "indices", "lse"))
            elif field == "itm_mined":
                fields[field] = MinedPairs(value["ids"].to(device), value["mask"].to(device),
                                           value["logits"].to(device).float())
            elif len(parts) == 3 and parts[0] in STREAM_FIELDS:
                stream = records.find(parts[0])
                value = _pad(value, parts[1], stream.attention_mask.shape[1])
                if parts[1] == "cross":
                    value = _fit_last(value, stream.encoder_hidden_states.shape[1])
                fields[field] = value.to(device).float()  # moved in the stored dtype
            else:
                fields[field] = value.to(device).float()
        out = CachedOutputs(fields, self.temp)
        if self.online_fusion:  # the student's own hard negatives: the teacher's text encoder, no ViT
            negatives = teacher.replay(None, records, {"fusion_neg"}, set(), image_embeds=fields["image_embeds"])
            out.negatives = negatives.itm_logits("positives")  # its only fused pass: the negative pairs
        return out


def chunk_name(c: int) -> str:
    return f"chunk-{c:06d}.pt"


def save_chunk(entries: list[dict[str, Any]], path: str) -> None:
    """Write one chunk's entries: every tensor becomes a slice of one flat buffer per
    dtype, referenced from a JSON index as ``{"t": [dtype, offset, shape]}``."""

    parts: dict[str, list[torch.Tensor]] = {}
    sizes: dict[str, int] = {}

    def pack(value: Any) -> Any:
        if torch.is_tensor(value):
            dtype = str(value.dtype).removeprefix("torch.")
            offset = sizes.get(dtype, 0)
            parts.setdefault(dtype, []).append(value.detach().reshape(-1).cpu())
            sizes[dtype] = offset + value.numel()
            return {"t": [dtype, offset, list(value.shape)]}
        if isinstance(value, dict):
            return {k: pack(v) for k, v in value.items()}
        if isinstance(value, list):
            return [pack(v) for v in value]
        return value

    index = json.dumps(pack(entries))
    checkpoint.atomic_save({"buffers": {k: torch.cat(v) for k, v in parts.items()}, "index": index}, path)


def load_chunk(path: str) -> list[dict[str, Any]]:
    """``save_chunk``'s entries back, as views of the (memory-mapped) buffers."""
    obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    buffers = obj["buffers"]

    def unpack(value: Any) -> Any:
        if isinstance(value, dict):
            if value.keys() == {"t"}:
                dtype, offset, shape = value["t"]
                return buffers[dtype][offset:offset + math.prod(shape)].view(shape)
            return {k: unpack(v) for k, v in value.items()}
        if isinstance(value, list):
            return [unpack(v) for v in value]
        return value

    return unpack(json.loads(obj["index"]))


class CachedOutputs:
    """The teacher's side of the terms (``BlipOutputs``' names), read from the cache;
    ``negatives``: the teacher's ITM logits of the student's hard negatives, run online."""

    def __init__(self, fields: dict[str, Any], temp: Optional[float]):
        self.fields, self.temp = fields, temp
        self.negatives: Optional[torch.Tensor] = None

    @property
    def mined(self) -> MinedPairs:
        return self._get("itm_mined")

    def _get(self, field: str):
        if field not in self.fields:
            raise CacheError(f"distill.cache holds no '{field}'; rebuild it for these terms ({BUILD_COMMAND})")
        return self.fields[field]

    @property
    def image_feat(self):
        return self._get("image_feat")

    @property
    def text_feat(self):
        return self._get("text_feat")

    @property
    def itc_logits(self):
        return self.image_feat @ self.text_feat.t() / self.temp

    @property
    def fusion_cls(self):
        return self._get("fusion_cls")

    def itm_logits(self, pairs: str = "all"):
        if pairs == "positives":
            return self._get("itm_pos")
        if self.negatives is None:
            raise CacheError("distill.cache: itm_kd with pairs: all needs the teacher's scores of the student's "
                             "negatives, which are computed online; this step computed none")
        return torch.cat([self._get("itm_pos"), self.negatives])

    @property
    def decoder_cls(self):
        return self._get("decoder_cls")

    def lm_topk(self, temperature: float):
        return self._get(f"lm_t{temperature:g}")

    def layer(self, stream: str, kind: str, index: int):
        return self._get(f"{stream}.{kind}.{index}"), None


# ----------------------------------------------------------------------------- building
def build(student, teacher, dataset: ReplayDataset, cache_cfg: Mapping[str, Any], key: Mapping[str, Any],
          batch_size: int, device: torch.device, progress: bool = True, spec: Optional[Spec] = None
          ) -> dict[str, Any]:
    """Write the cache (this process's chunks; all ranks together build all of it).
    Returns the manifest's statistics once the cache is complete. ``spec``: the fields to
    store, when not those of ``student``'s own terms (a study's union over its arms)."""
    import time

    from lavis.common.dist_utils import get_rank, get_world_size, is_main_process
    from tqdm.auto import tqdm

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
            _drop_broken_chunks(directory, existing, chunks)
        else:
            _write_json(directory / MANIFEST, manifest)
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
        _write_json(directory / MANIFEST, manifest)
    barrier()
    return read_manifest(str(directory))["stats"]


def chunk_record(path: Path) -> dict[str, Any]:
    """What the manifest keeps of a written chunk, to find it damaged later."""
    return {"bytes": path.stat().st_size, "sha256": checkpoint.file_sha256(str(path))}


def chunk_problem(path: Path, record: Optional[Mapping[str, Any]], full: bool = True) -> Optional[str]:
    """Why a chunk cannot be used (missing, another size, another checksum, unreadable), or None.
    ``record``: the manifest's (a finished cache); without one the chunk must load.
    ``full``: compare checksums too (reading every byte), not only sizes."""
    if not path.is_file():
        return "missing"
    if record is not None:
        if path.stat().st_size != record["bytes"]:
            return f"{path.stat().st_size} bytes, the manifest says {record['bytes']}"
        if full and checkpoint.file_sha256(str(path)) != record["sha256"]:
            return "its checksum differs from the manifest's"
        return None
    try:
        load_chunk(str(path))
    except Exception as err:
        return f"unreadable ({type(err).__name__})"
    return None


def _drop_broken_chunks(directory: Path, manifest: dict[str, Any], chunks: range) -> None:
    """Before a build over an existing cache: every chunk it holds is checked (against the
    manifest's sizes and checksums when finished, by loading it when not); a broken one is
    deleted, and the cache marked unfinished, so this build writes it again."""
    records = manifest.get("chunks") if manifest.get("complete") else None
    broken = {}
    for c in chunks:
        path = directory / chunk_name(c)
        if records is None and not path.is_file():
            continue  # not built yet
        problem = chunk_problem(path, None if records is None else records.get(path.name))
        if problem:
            broken[path.name] = problem
    if not broken:
        return
    print(f"teacher cache {directory}: rebuilding {len(broken)} broken chunk(s): "
          + "; ".join(f"{k} ({v})" for k, v in sorted(broken.items())[:5]), flush=True)
    for name in broken:
        (directory / name).unlink(missing_ok=True)
    manifest["complete"] = False
    _write_json(directory / MANIFEST, manifest)


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)
