"""Reading a complete cache: entries of memory-mapped chunks, collated per batch (in the
data loader's workers) and handed to the terms in ``BlipOutputs``' names."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from lavis_dlip.distill.cache.config import BUILD_COMMAND, CACHED, CacheError, complete_manifest
from lavis_dlip.distill.cache.fields import STREAM_FIELDS, _fit_last, _pad
from lavis_dlip.distill.cache.keys import compare_keys
from lavis_dlip.distill.cache.store import chunk_name, chunk_problem, load_chunk
from lavis_dlip.distill.outputs import MinedPairs


class CacheReader:
    """Entries of a complete cache, memory-mapped chunk by chunk."""

    def __init__(self, directory: str, expected_key: Mapping[str, Any]):
        manifest = complete_manifest(directory)
        compare_keys(expected_key, manifest["key"], directory)
        self.directory, self.manifest = Path(directory), manifest
        self.fields: list[str] = list(expected_key["fields"]["fields"])  # what this run's terms read
        self.chunk, self.augmentations = manifest.get("chunk"), int(manifest["augmentations"])
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
        """The stored outputs of a batch of samples (``indices``, each at augmentation ``augs``)."""
        return self.collate_entries([self.entry(i, k) for i, k in zip(indices, augs)])

    def collate_entries(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        """A batch's stored entries, each field's rows stacked in the stored dtype; per-token
        fields padded to the batch's longest row, and ``text_len`` (-1: none stored) to check
        them by. Nested dicts of tensors only, which LAVIS moves to the GPU with the batch."""
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
            names = samples["cache_key"] if "cache_key" in samples else samples["cache_index"].tolist()
            for i, was, n in zip(names, stored, now):
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
                module = records.find(parts[0])
                value = _pad(value, parts[1], module.attention_mask.shape[1])
                if parts[1] == "cross":
                    value = _fit_last(value, module.encoder_hidden_states.shape[1])
                fields[field] = value.to(device).float()  # moved in the stored dtype
            else:
                fields[field] = value.to(device).float()
        out = CachedOutputs(fields, self.temp)
        if self.online_fusion:  # the student's own hard negatives: the teacher's text encoder, no ViT
            negatives = teacher.replay(None, records, {"fusion_neg"}, set(), image_embeds=fields["image_embeds"])
            out.negatives = negatives.itm_logits("positives")  # its only fused pass: the negative pairs
        return out


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

    def layer(self, module: str, kind: str, index: int):
        return self._get(f"{module}.{kind}.{index}"), None
