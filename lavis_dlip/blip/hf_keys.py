"""BLIP's weights in LAVIS's key names and in transformers' BLIP classes: one table, both
directions (``to_hf`` for the exporter, ``from_hf`` for a transformers BLIP read into
LAVIS's layout).

The ViT's keys are renamed (``visual_encoder.*`` <-> ``vision_model.*``, ``VISION_KEYS``);
the BERT bodies and heads keep their names (transformers' BLIP text model was ported from
LAVIS's ``med.py``); momentum copies, ITC queues and the ITC temperature exist in LAVIS only.

transformers 4.26's BlipVisionModel builds every LayerNorm with torch's default eps, whatever
its config says (modeling_blip.py:377-379, 668); BLIP's ViT uses 1e-6. ``to_hf`` keeps the
function exact anyway: the ViT's residual stream is written scaled by c = sqrt(1e-5 / eps)
(embeddings and each block's output projections, ``RESIDUAL_WRITERS``), which
LayerNorm(c x; 1e-5) turns into LayerNorm(x; eps), and records c in the config
(``EXPORT_KEY``); ``from_hf`` divides by it. x * c / c differs from x in the last bit for
about 14% of float32 values, so the exporter also writes those differences (``corrections``,
one int8 a value, in ``EXACT_FILE``), and an import that reads them is bitwise the original.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

import torch

from lavis_dlip.blip.layout import is_training_state

# LAVIS ViT key (under visual_encoder.) <-> transformers BlipVisionModel key (under vision_model.); {i}: a block
VISION_KEYS = (
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.", "embeddings.patch_embedding."),
    ("blocks.{i}.norm1.", "encoder.layers.{i}.layer_norm1."),
    ("blocks.{i}.norm2.", "encoder.layers.{i}.layer_norm2."),
    ("blocks.{i}.attn.qkv.", "encoder.layers.{i}.self_attn.qkv."),
    ("blocks.{i}.attn.proj.", "encoder.layers.{i}.self_attn.projection."),
    ("blocks.{i}.mlp.fc1.", "encoder.layers.{i}.mlp.fc1."),
    ("blocks.{i}.mlp.fc2.", "encoder.layers.{i}.mlp.fc2."),
    ("norm.", "post_layernorm."),
)
LAVIS_VISION, HF_VISION = "visual_encoder.", "vision_model."
HF_VISION_EPS = 1e-5  # what transformers' BlipVisionModel computes with
# the ViT tensors that write its residual stream (LAVIS names, relative to visual_encoder.)
RESIDUAL_WRITERS = re.compile(r"^(cls_token|pos_embed|patch_embed\.proj\.\w+|blocks\.\d+\.(attn\.proj|mlp\.fc2)\.\w+)$")
# modules under the same name in both (BERT bodies and heads)
SAME_NAME = ("text_encoder.", "text_decoder.", "vision_proj.", "text_proj.", "itm_head.")
LAVIS_ONLY = ("temp",)  # the ITC temperature: transformers' retrieval class returns plain cosine similarity
# in the exported config.json: {"vision_scale": c, "vision_layer_norm_eps": BLIP's eps}
EXPORT_KEY = "lavis_dlip"
EXACT_FILE = "lavis_dlip_exact.pt"  # beside the export: corrections() for a bitwise import


def _rename(rel: str, to_hf: bool) -> Optional[str]:
    """A ViT key relative to its module, in the other library's names (None: not in the table)."""
    for lavis, hf in VISION_KEYS:
        src, dst = (lavis, hf) if to_hf else (hf, lavis)
        m = re.match(re.escape(src).replace(re.escape("{i}"), r"(\d+)"), rel)
        if m and (src.endswith(".") or m.end() == len(rel)):
            return dst.replace("{i}", m.group(1) if m.groups() else "") + rel[m.end():]
    return None


def residual_scale(eps: float) -> float:
    """c with LayerNorm(c x; HF_VISION_EPS) == LayerNorm(x; eps)."""
    return (HF_VISION_EPS / eps) ** 0.5


def to_hf(state: Mapping[str, torch.Tensor], eps: float) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """LAVIS keys -> transformers keys: (mapped state, dropped LAVIS-only keys, keys with no place)."""
    scale = residual_scale(eps)
    out, dropped, unknown = {}, [], []
    for key, value in state.items():
        if is_training_state(key) or key in LAVIS_ONLY:  # momentum copies, ITC queues and temperature
            dropped.append(key)
        elif key.startswith(LAVIS_VISION):
            rel = key[len(LAVIS_VISION):]
            new = _rename(rel, to_hf=True)
            if new is None:
                unknown.append(key)
            else:
                out[HF_VISION + new] = value * scale if RESIDUAL_WRITERS.match(rel) else value
        elif key.startswith(SAME_NAME):
            out[key] = value
        else:
            unknown.append(key)
    return out, dropped, unknown


def _unscaled(value: torch.Tensor, scale: float) -> torch.Tensor:
    return value / scale


def corrections(hf: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                eps: float) -> dict[str, torch.Tensor]:
    """What makes ``from_hf`` exact for ``to_hf``'s rescaled tensors: per value, how many
    float32 steps (ulps) the division lands from the original, as int8 (``EXACT_FILE``)."""
    scale, out = residual_scale(eps), {}
    for key, value in state.items():
        rel = key[len(LAVIS_VISION):] if key.startswith(LAVIS_VISION) else None
        if rel is None or not RESIDUAL_WRITERS.match(rel) or value.dtype != torch.float32:
            continue
        hf_key = HF_VISION + _rename(rel, to_hf=True)
        steps = value.view(torch.int32).long() - _unscaled(hf[hf_key], scale).view(torch.int32).long()
        if steps.abs().max() > 127:
            raise ValueError(f"{key}: the rescaling moved a value by {int(steps.abs().max())} float32 steps")
        out[hf_key] = steps.to(torch.int8)
    return out


def from_hf(state: Mapping[str, torch.Tensor], scale: float = 1.0,
            exact: Optional[Mapping[str, torch.Tensor]] = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """transformers keys -> LAVIS keys, the ViT's residual stream divided by ``scale`` (the
    exporter's ``residual_scale``; 1 for a model it did not write) and, with the exporter's
    ``corrections`` (``exact``), moved back onto the original float32 values bit for bit:
    (mapped state, keys with no place in LAVIS's layout)."""
    out, unknown = {}, []
    for key, value in state.items():
        if key.startswith(HF_VISION):
            rel = _rename(key[len(HF_VISION):], to_hf=False)
            if rel is None:
                unknown.append(key)
            elif scale != 1.0 and RESIDUAL_WRITERS.match(rel):
                value = _unscaled(value, scale)
                if exact is not None and key in exact:
                    value = (value.view(torch.int32).long() + exact[key].long()).to(torch.int32).view(torch.float32)
                out[LAVIS_VISION + rel] = value
            else:
                out[LAVIS_VISION + rel] = value
        elif key.startswith(SAME_NAME):
            out[key] = value
        else:
            unknown.append(key)
    return out, unknown
