"""What is stored: the fields the terms read (``Spec``), cut from the teacher's outputs per
sample and augmentation (``extract``), trimmed to a sample's tokens and padded back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from lavis_dlip.distill.outputs import scored_positions


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
            module = field.split(".")[0]
            if field in ("image_feat", "text_feat") or module == "text":
                needs.add("text")
            if field in ("itm_pos", "fusion_cls") or module == "fusion":
                needs.add("fusion")
            if field == "itm_mined":
                needs |= {"text", "fusion", "fusion_mined"}
            if field == "decoder_cls" or module == "decoder" or field.startswith("lm_t"):
                needs.add("decoder")
        return needs

    @property
    def points(self) -> set[tuple[str, str, int]]:
        return {(s, k, int(j)) for f in self.fields if f.count(".") == 2 for s, k, j in [f.split(".")]}


def _rows_per_sample(samples: Mapping, batch: int, module: str) -> list[int]:
    """Decoder rows per sample: BLIP VQA decodes every answer of a question."""
    if module == "decoder" and "n_answers" in samples:
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

    def put(field: str, rows: torch.Tensor, module: str, per_row=lambda r, x: x) -> None:
        counts = _rows_per_sample(samples, batch, module)
        r = 0
        for i, n in enumerate(counts):
            entries[i][field] = [per_row(r + j, rows[r + j]) for j in range(n)]
            r += n

    def lengths(module: str) -> torch.Tensor:
        return student_records.find(module).attention_mask.sum(1)

    text_call = student_records.find("text") or student_records.find("fusion")
    if text_call is not None:
        for i, n in enumerate(text_call.attention_mask.sum(1).tolist()):
            entries[i]["text_len"] = int(n)
    for field in spec.fields:
        parts = field.split(".")
        if len(parts) == 3:
            module, kind, j = parts[0], parts[1], int(parts[2])
            x = t.layer(module, kind, j)[0]
            if module == "vision":
                put(field, x, module)
            else:
                lens = lengths(module)
                put(field, x, module, lambda r, row, lens=lens, kind=kind: _trim(row, kind, int(lens[r])))
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
            module = "decoder" if field == "decoder_cls" else "vision"
            value = {"image_feat": lambda: t.image_feat, "text_feat": lambda: t.text_feat,
                     "fusion_cls": lambda: t.fusion_cls, "itm_pos": lambda: t.itm_logits("positives"),
                     "decoder_cls": lambda: t.decoder_cls, "image_embeds": lambda: t.image_embeds}[field]()
            put(field, value, module)
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
