"""Building BLIP models from their configs: a registered ``(arch, model_type)``'s config
with overrides, with random weights (nothing downloaded), on the meta device (the layout
alone), or from a run yaml with trained weights.

Random values are normal (x 0.02; LayerNorm gains 1 + that; BLIP's temperature 0.07), so
that every value is distinct and a test can trace where an inherited value came from,
while a forward pass stays in a sane range; tied tensors (BLIP pre-training's decoder) and
momentum copies hold the same values, as in a real file.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Mapping, Optional

import torch
from lavis.common.registry import registry
from omegaconf import OmegaConf
from torch import nn

from lavis_dlip import checkpoint, compat
from lavis_dlip.blip.layout import momentum_source
from lavis_dlip.blip.tokenizer import tokenizer_source
from lavis_dlip.errors import ConfigError


def model_config(arch: str, model_type: str, overrides: Optional[Mapping[str, Any]] = None, where: str = "model"):
    """A registered model type's config (its preset yaml) with ``overrides`` merged on top."""
    cls = registry.get_model_class(arch) if arch else None
    if cls is None:
        raise ConfigError(f"{where}.arch: '{arch}' is not a registered LAVIS model")
    if model_type not in cls.PRETRAINED_MODEL_CONFIG_DICT:
        raise ConfigError(f"{where}.model_type: '{model_type}' is not a type of '{arch}'; "
                          f"known: {', '.join(cls.PRETRAINED_MODEL_CONFIG_DICT)}")
    preset = OmegaConf.load(cls.default_config_path(model_type)).model
    return OmegaConf.merge(preset, overrides if OmegaConf.is_config(overrides) else dict(overrides or {}))


def run_model_config(model_section: Any, where: str = "model"):
    """A run yaml's model section over its model type's preset, as LAVIS's Config merges them."""
    if model_section is None or "arch" not in model_section:
        raise ConfigError(f"{where}: no arch; give a run yaml with a model section")
    return model_config(model_section.arch, model_section.get("model_type", "base"), model_section, where)


def build_model(model_cfg: Any, meta: bool = True) -> nn.Module:
    """A registered model from its config, random weights, nothing downloaded;
    ``meta``: on the meta device (its layout, no memory)."""
    cfg = OmegaConf.create(OmegaConf.to_container(OmegaConf.create(model_cfg), resolve=True))
    cfg.pop("init", None)
    cfg.load_finetuned, cfg.load_pretrained = False, False
    cls = registry.get_model_class(cfg.get("arch"))
    device = compat.meta_device() if meta else contextlib.nullcontext()
    with compat.random_weights(), tokenizer_source(cfg.get("tokenizer")), device:
        return cls.from_config(cfg)


def trained_model(cfg_path: str, weights: str, options: Any = ()) -> tuple[nn.Module, Any]:
    """The model of a run yaml (its ``model`` section over its ``model_type`` defaults,
    ``options`` applied) with the checkpoint ``weights``, in eval mode; and that config.
    ``model.init`` is skipped: the checkpoint replaces every weight."""
    checkpoint.check_exists(str(weights), "--checkpoint")
    raw = OmegaConf.merge(OmegaConf.load(cfg_path), OmegaConf.from_dotlist(list(options)))
    model_cfg = OmegaConf.merge(run_model_config(raw.get("model"), f"{cfg_path}: model"),
                                {"init": None, "finetuned": str(weights), "load_finetuned": True})
    with tokenizer_source(model_cfg.get("tokenizer")):
        return registry.get_model_class(model_cfg.arch).from_config(model_cfg).eval(), model_cfg


GAIN = re.compile(r"(norm\d?|LayerNorm)\.weight$")


def random_state(model: nn.Module, seed: int = 0, given: Optional[Mapping[str, Any]] = None
                 ) -> dict[str, torch.Tensor]:
    """A state dict for ``model`` (any device, meta too) with random values, except where
    ``given`` (weights about to be loaded) has a tensor of the key's shape: that one is
    taken, nothing drawn. Momentum copies take their base's values, never drawn themselves
    (half of BLIP's pre-training weights)."""
    gen = torch.Generator().manual_seed(seed)
    made: dict[int, torch.Tensor] = {}
    out = {}
    state = model.state_dict(keep_vars=True)
    given = {k: t for k, t in (given or {}).items()
             if k in state and isinstance(t, torch.Tensor) and t.shape == state[k].shape}
    for key, v in state.items():
        base = momentum_source(key)
        if key in given or (base in state and state[base].shape == v.shape):
            continue  # filled below
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
    for key in state:
        if key in given:
            out[key] = given[key]
        elif key not in out:  # momentum encoders start as copies (BLIP's copy_params)
            out[key] = out.get(momentum_source(key), given.get(momentum_source(key)))
    return {key: out[key] for key in state}


def random_model(model_cfg: Any, seed: int = 0, given: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """A registered model with random stand-in weights, built without LAVIS's weight
    init (seconds instead of a minute for BLIP-base): on the meta device, then
    materialised and filled (``given``: the keys a checkpoint will load are not drawn).
    Its modules keep every value in their state dict (no non-persistent buffers), so
    nothing is left uninitialised."""
    model = build_model(model_cfg).to_empty(device="cpu")
    model.load_state_dict(random_state(model, seed, given))
    return model
