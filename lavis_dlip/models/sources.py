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
* ``timm:<model name>``: a timm ViT with its pretrained weights through timm's own
  loader (its URL, or the file in the torch hub cache), heads from the model;
* ``hf:<Hub id or directory>``: a transformers ViT or DeiT (vision; its keys renamed to
  timm's, DeiT's distillation token dropped) or BERT (text, decoder);
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
from lavis_dlip.blip.hf_import import HF
from lavis_dlip.blip.layout import is_training_state

TIMM_ONLY = ("head.", "head_dist.", "fc_norm.", "dist_token", "pre_logits.")
TIMM = "timm:"  # a named source: a timm model (HF, "hf:": a Hub id or save_pretrained directory)

# transformers ViT/DeiT -> timm ViT key names (relative to the model; q, k, v are fused after)
HF_VIT_KEYS = (
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.", r"blocks.\1.attn.\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"^layernorm\.", "norm."),
)


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


def _vit(name: str, timm_state: Mapping[str, torch.Tensor], heads: int) -> Source:
    """A ViT in timm's key names: classifier heads dropped, keys under ``visual_encoder.``."""
    state = {f"visual_encoder.{k}": v for k, v in timm_state.items() if not k.startswith(TIMM_ONLY)}
    depth = len({m.group(1) for k in state if (m := re.match(r"visual_encoder\.blocks\.(\d+)\.", k))})
    lay = ModuleLayout("vision", "visual_encoder.", "blocks.{i}.", tuple(range(depth)), "all", "vision",
                       heads=int(heads))
    return Source(name, state, fixed={"vision": lay})


def timm_vit(path: str, heads: Optional[int], where: str) -> Source:
    """A timm/DeiT ViT state dict file (path or URL)."""
    if heads is None:
        raise ConfigError(f"{where}: a timm/DeiT state dict does not record its attention heads; "
                          f"set source_heads (DeiT-Ti 3, DeiT-S 6, DeiT-B 12)")
    return _vit(path, _state(checkpoint.read(path, where)), heads)


def timm_named(name: str, where: str) -> Source:
    """``timm:<name>``: the model's pretrained weights through timm's loader (its URL, or
    the file already in the torch hub cache), its head count from the model."""
    import timm
    import torch.hub

    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as err:  # unknown name, no network and no cached file, a bad file
        raise ConfigError(f"{where}: timm could not load '{name}' with its weights ({type(err).__name__}: "
                          f"{checkpoint.first_line(err)}); offline, put its "
                          f"file in {torch.hub.get_dir()}/checkpoints or give the file as source with "
                          f"source_heads") from None
    blocks = getattr(model, "blocks", None)
    if not blocks or not hasattr(blocks[0], "attn"):
        raise ConfigError(f"{where}: timm's '{name}' is not a ViT (no blocks with attention); name a ViT or DeiT")
    return _vit(f"{TIMM}{name}", model.state_dict(), blocks[0].attn.num_heads)


def hf_vit_state(hf_state: Mapping[str, torch.Tensor], distilled: bool) -> dict[str, torch.Tensor]:
    """A transformers ViT/DeiT state dict in timm's key names: q, k, v fused into ``qkv``,
    DeiT's distillation token and its position dropped (BLIP's ViT has the class token only)."""
    out, qkv = {}, {}
    for key, value in hf_state.items():
        for pattern, repl in HF_VIT_KEYS:
            if re.match(pattern, key):
                new = re.sub(pattern, repl, key)
                m = re.match(r"blocks\.(\d+)\.attn\.(query|key|value)\.(weight|bias)$", new)
                if m:
                    qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
                else:
                    out[new] = value
                break
    for (block, param), parts in qkv.items():
        out[f"blocks.{block}.attn.qkv.{param}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    if distilled:
        out["pos_embed"] = torch.cat([out["pos_embed"][:, :1], out["pos_embed"][:, 2:]], dim=1)
    return out


def hf_named(source: str, module: str, where: str) -> Source:
    """``hf:<Hub id or directory>``: a transformers ViT or DeiT (vision) or BERT (text, decoder)."""
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as err:  # not on the Hub, offline without a cache, not a model directory
        raise ConfigError(f"{where}: transformers could not read a config from '{source}' ({type(err).__name__}); "
                          f"give a Hub id (online, or in the Hugging Face cache) or a save_pretrained directory"
                          ) from None
    if module != "vision":
        return hf_bert(source, module, where)
    if config.model_type not in ("vit", "deit"):
        raise ConfigError(f"{where}: '{source}' is a transformers {config.model_type}; vision takes a ViT or DeiT")
    model = AutoModel.from_pretrained(source, add_pooling_layer=False)
    state = hf_vit_state(model.state_dict(), distilled=config.model_type == "deit")
    return _vit(f"{HF}{source}", state, config.num_attention_heads)


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
    if str(src).startswith(TIMM):
        if module != "vision":
            raise ConfigError(f"{where}.source: {src}: a timm model is a vision source")
        return timm_named(str(src)[len(TIMM):], f"{where}.source")
    if str(src).startswith(HF):
        return hf_named(str(src)[len(HF):], module, f"{where}.source")
    path = resolve_source(str(src))
    if os.path.isdir(path):
        if module == "vision":
            raise ConfigError(f"{where}.source: {src} is a directory; vision takes a timm/DeiT state dict file")
        return hf_bert(path, module, f"{where}.source")
    if module != "vision":
        raise ConfigError(f"{where}.source: {src} must be a Hugging Face BERT directory (config.json + weights)")
    return timm_vit(str(src), spec.get("source_heads"), f"{where}.source")
