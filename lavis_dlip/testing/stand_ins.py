"""Checkpoints with the real key names and shapes and random values, for the
weights that cannot be downloaded here (BLIP, DeiT): offline tests, dry runs and
cost benchmarks go through exactly the loading code that real checkpoints do.

Values are random normal (x 0.02; LayerNorm gains 1 + that; BLIP's temperature
0.07), so every value is distinct and a test can find where an inherited value
came from, while a forward pass stays in a sane range; tied tensors (BLIP
pre-training's decoder) and momentum copies hold the same values, as in a real file.
"""

from __future__ import annotations

from typing import Any

import torch
from lavis_dlip import compat
from lavis_dlip.blip.build import build_model
from lavis_dlip.blip.build import model_config, random_state


def blip_checkpoint(arch: str, model_type: str, path: str, seed: int = 0, **overrides: Any) -> str:
    """A registered model's checkpoint as LAVIS ships it (``{"model": state_dict}``)."""
    cfg = model_config(arch, model_type, overrides)
    torch.save({"model": random_state(build_model(cfg), seed)}, path)
    return path


def timm_vit_checkpoint(path: str, width: int, depth: int, heads: int, image_size: int = 224, patch_size: int = 16,
                        num_classes: int = 1000, seed: int = 0) -> str:
    """A timm/DeiT ViT checkpoint (``{"model": state_dict}`` with a classifier head),
    e.g. DeiT-S: width 384, depth 12, heads 6."""
    from lavis.models.vit import VisionTransformer

    with compat.meta_device():
        vit = VisionTransformer(img_size=image_size, patch_size=patch_size, embed_dim=width, depth=depth,
                                num_heads=heads, num_classes=num_classes)
    torch.save({"model": random_state(vit, seed)}, path)
    return path
