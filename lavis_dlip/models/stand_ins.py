"""Checkpoints with the real key names and shapes and random values, for the
weights that cannot be downloaded here (BLIP, DeiT): offline tests, dry runs and
cost benchmarks go through exactly the loading code that real checkpoints do.

Values are random normal (x 0.02; LayerNorm gains 1 + that; BLIP's temperature
0.07), so every value is distinct and a test can find where an inherited value
came from, while a forward pass stays in a sane range; tied tensors (BLIP
pre-training's decoder) and momentum copies hold the same values, as in a real file.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn


GAIN = re.compile(r"(norm\d?|LayerNorm)\.weight$")


def random_state(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict for ``model`` (any device, meta too) with random values."""
    gen = torch.Generator().manual_seed(seed)
    made: dict[int, torch.Tensor] = {}
    out = {}
    for key, v in model.state_dict(keep_vars=True).items():
        if id(v) not in made:
            if key.endswith("position_ids"):
                made[id(v)] = torch.arange(v.shape[-1]).expand(v.shape).clone()
            elif key.split(".")[-1] == "temp":
                made[id(v)] = torch.full(v.shape, 0.07)
            elif v.is_floating_point():
                made[id(v)] = torch.empty(v.shape).normal_(1.0 if GAIN.search(key) else 0.0, 0.02, generator=gen)
            else:
                made[id(v)] = torch.zeros(v.shape, dtype=v.dtype)
        out[key] = made[id(v)]
    for key in out:  # momentum encoders start as copies (BLIP's copy_params)
        top, _, rest = key.partition(".")
        base = f"{top[:-2]}.{rest}"
        if top.endswith("_m") and base in out and out[base].shape == out[key].shape:
            out[key] = out[base]
    return out


def random_model(model_cfg: Any, seed: int = 0) -> nn.Module:
    """A registered model with random stand-in weights, built without LAVIS's weight
    init (seconds instead of a minute for BLIP-base): on the meta device, then
    materialised and filled. Its modules keep every value in their state dict (no
    non-persistent buffers), so nothing is left uninitialised."""
    from lavis_dlip.models.sources import build_model

    model = build_model(model_cfg).to_empty(device="cpu")
    model.load_state_dict(random_state(model, seed))
    return model


def blip_checkpoint(arch: str, model_type: str, path: str, seed: int = 0, **overrides: Any) -> str:
    """A registered model's checkpoint as LAVIS ships it (``{"model": state_dict}``)."""
    from lavis.common.registry import registry

    from lavis_dlip.models.sources import build_model

    cls = registry.get_model_class(arch)
    cfg = OmegaConf.merge(OmegaConf.load(cls.default_config_path(model_type)).model, overrides)
    torch.save({"model": random_state(build_model(cfg), seed)}, path)
    return path


def timm_vit_checkpoint(path: str, width: int, depth: int, heads: int, image_size: int = 224, patch_size: int = 16,
                        num_classes: int = 1000, seed: int = 0) -> str:
    """A timm/DeiT ViT checkpoint (``{"model": state_dict}`` with a classifier head),
    e.g. DeiT-S: width 384, depth 12, heads 6."""
    from lavis.models.vit import VisionTransformer

    from lavis_dlip import compat

    with compat.meta_device():
        vit = VisionTransformer(img_size=image_size, patch_size=patch_size, embed_dim=width, depth=depth,
                                num_heads=heads, num_classes=num_classes)
    torch.save({"model": random_state(vit, seed)}, path)
    return path
