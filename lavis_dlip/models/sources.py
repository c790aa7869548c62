"""Where inherited weights come from, adapted to BLIP's key names: one filter per
source (as timm adapts foreign checkpoints), and the source's layout read from
its config, never guessed from tensor shapes.

* a LAVIS BLIP model: ``model.init.teacher``, either a checkpoint saved by this
  project (it records its model config) or ``{arch, model_type, checkpoint,
  overrides}`` as in ``distill.teacher``; its layout is that model, built on the
  meta device (no memory, no download);
* a timm/DeiT ViT state dict (``pretrained`` vision): ``blocks.*`` ->
  ``visual_encoder.blocks.*``; its head count is ``source_heads`` (a state dict
  does not record it);
* a Hugging Face BERT directory (``pretrained`` text or decoder): ``encoder.*`` ->
  ``text_encoder.encoder.*`` (or ``text_decoder.bert.*``); layout from its
  ``config.json``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
from torch import nn

from lavis_dlip import checkpoint
from lavis_dlip.errors import ConfigError
from lavis_dlip.blip.layout import ModuleLayout, module_layout
from lavis_dlip.blip.build import random_state
from lavis_dlip.blip.tokenizer import resolve_source
from lavis_dlip.blip.teacher import TEACHER_KEYS, read_weights, teacher_model_config
from lavis_dlip.blip.build import build_model
from lavis_dlip.blip.layout import is_training_state

TIMM_ONLY = ("head.", "head_dist.", "fc_norm.", "dist_token", "pre_logits.")


@dataclass
class Source:
    """Weights in BLIP's key names and where each module's layers are in them."""

    name: str
    state: dict[str, torch.Tensor]
    model: Optional[nn.Module] = None  # the source model (meta device) when it is a BLIP model
    model_cfg: Any = None  # its model config, to build it for real (data-driven importance)
    fixed: dict[str, ModuleLayout] = field(default_factory=dict)  # layouts of non-BLIP sources

    def layout(self, module: str, where: str) -> ModuleLayout:
        lay = self.fixed.get(module) if self.model is None else module_layout(self.model, module)
        if lay is None:
            raise ConfigError(f"{where}: the source {self.name} has no {module} module")
        return lay

    def build(self) -> nn.Module:
        """The source model with its weights, for measuring activations."""
        if self.model_cfg is None:
            raise ConfigError(f"{self.name} is not a BLIP model; data-driven importance needs the teacher")
        model = build_model(self.model_cfg, meta=False)
        missing, _ = model.load_state_dict(self.state, strict=False)
        needed = [k for k in missing if not is_training_state(k)]
        if needed:
            raise ConfigError(f"{self.name} lacks {len(needed)} weights of its model, e.g. '{needed[0]}'")
        return model.eval()


# ----------------------------------------------------------------------------- reading files
def _state(obj: Any) -> dict[str, torch.Tensor]:
    state = obj.get("model", obj) if isinstance(obj, dict) else obj
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


# ----------------------------------------------------------------------------- one filter per source
def lavis_teacher(spec: Any, where: str) -> Source:
    """A LAVIS BLIP checkpoint and the model config it was saved from."""

    if isinstance(spec, Mapping):
        model_cfg = teacher_model_config(spec, os.getcwd(), where=where)
        if not spec.get("load_weights", True):  # dry runs: the teacher's shape with random weights

            model = build_model(model_cfg)
            return Source(f"random {model_cfg.arch}/{model_cfg.model_type}", random_state(model), model, model_cfg)
        weights = spec.get("checkpoint") or _preset_weights(model_cfg)
        if not weights:
            raise ConfigError(f"{where}.checkpoint: give the weights to inherit (path or URL); "
                              f"{model_cfg.arch}/{model_cfg.model_type} names none of its own")
        key = f"{where}.checkpoint" if spec.get("checkpoint") else f"{where} ({model_cfg.arch}'s own weights)"
        return Source(str(weights), _state(read_weights(weights, key)), build_model(model_cfg), model_cfg)
    obj = read_weights(spec, where)
    config = obj.get("config") if isinstance(obj, dict) else None
    saved = config.get("model") if isinstance(config, dict) else None
    if not saved or "arch" not in saved:
        raise ConfigError(
            f"{where}: {spec} does not record the model it was saved from (LAVIS's own checkpoints do not); "
            f"write {where} as a mapping {{arch, model_type, checkpoint}} with the keys of distill.teacher "
            f"({', '.join(TEACHER_KEYS)}), e.g. {{arch: blip_pretrain, model_type: base, checkpoint: {spec}}}")
    return Source(str(spec), _state(obj), build_model(saved), saved)


def _preset_weights(model_cfg: Any) -> Optional[str]:
    """The weights a LAVIS model type loads by itself (its yaml's finetuned/pretrained URL)."""
    if model_cfg.get("load_finetuned", True) and model_cfg.get("finetuned"):
        return model_cfg.finetuned
    return model_cfg.get("pretrained") if model_cfg.get("load_pretrained", True) else None


def timm_vit(path: str, heads: Optional[int], where: str) -> Source:
    """A timm/DeiT ViT state dict: classifier heads dropped, keys under ``visual_encoder.``."""
    state = {f"visual_encoder.{k}": v for k, v in _state(checkpoint.read(path, where)).items()
             if not k.startswith(TIMM_ONLY)}
    if heads is None:
        raise ConfigError(f"{where}: a timm/DeiT state dict does not record its attention heads; "
                          f"set source_heads (DeiT-Ti 3, DeiT-S 6, DeiT-B 12)")
    depth = len({m.group(1) for k in state if (m := re.match(r"visual_encoder\.blocks\.(\d+)\.", k))})
    lay = ModuleLayout("vision", "visual_encoder.", "blocks.{i}.", tuple(range(depth)), "all", "vision",
                       heads=int(heads))
    return Source(path, state, fixed={"vision": lay})


def hf_bert(path: str, module: str, where: str) -> Source:
    """A Hugging Face BERT directory, as BLIP's text encoder or decoder body."""
    from transformers import BertModel

    bert = BertModel.from_pretrained(path, add_pooling_layer=False)
    prefix = "text_decoder.bert." if module == "decoder" else "text_encoder."
    cfg = bert.config
    lay = ModuleLayout(module, prefix.replace("bert.", "") if module == "decoder" else prefix,
                       "bert.encoder.layer.{i}." if module == "decoder" else "encoder.layer.{i}.",
                       tuple(range(cfg.num_hidden_layers)), "all", module, cfg.hidden_size,
                       cfg.num_attention_heads, cfg.intermediate_size)
    return Source(path, {prefix + k: v for k, v in bert.state_dict().items()}, fixed={module: lay})


def pretrained(module: str, spec: Mapping[str, Any], where: str) -> Source:
    if module not in ("vision", "text", "decoder"):
        raise ConfigError(f"{where}: strategy 'pretrained' is for vision, text and decoder "
                          "(a BERT has no cross-attention or BLIP heads); use teacher or random")
    src = spec.get("source")
    if not src:
        raise ConfigError(f"{where}: strategy 'pretrained' needs {where}.source")
    path = resolve_source(str(src))
    if os.path.isdir(path):
        if module == "vision":
            raise ConfigError(f"{where}.source: {src} is a directory; vision takes a timm/DeiT state dict file")
        return hf_bert(path, module, f"{where}.source")
    if module != "vision":
        raise ConfigError(f"{where}.source: {src} must be a Hugging Face BERT directory (config.json + weights)")
    return timm_vit(str(src), spec.get("source_heads"), f"{where}.source")
