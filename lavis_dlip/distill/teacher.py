"""The frozen teacher: any LAVIS BLIP model, loaded from its registry name and
model type (weights from LAVIS's yaml URLs, a checkpoint path or URL, or random),
queried module by module so that it never updates its momentum encoders or queues.

``distill.teacher`` keys:

* ``arch``, ``model_type``: a registered model (``blip_retrieval``/``coco``,
  ``blip_pretrain``/``base``, ``dlip_retrieval``/``base``, ...);
* ``cfg_path``: instead, take the ``model`` section of a run yaml (a teacher
  trained with this project), relative to the distillation yaml;
* ``overrides``: model-config keys merged on top (e.g. ``{image_size: 224}``);
* ``checkpoint``: weights to load (path or URL); replaces the model type's own;
* ``load_weights``: ``False`` builds the teacher with random weights (dry runs, tests).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional

import torch
from omegaconf import OmegaConf
from torch import nn

from lavis_dlip.errors import CheckpointError, ConfigError, check_keys
from lavis_dlip.distill.capture import Capture, Point, Records
from lavis_dlip.distill.outputs import BlipOutputs, fused_pass, match_rows
from lavis_dlip.models.components import ScoredLMHeadDecoder

TEACHER_KEYS = ("arch", "model_type", "cfg_path", "overrides", "checkpoint", "load_weights")

logger = logging.getLogger(__name__)


def teacher_model_config(cfg: Mapping[str, Any], base_dir: str = ".", where: str = "distill.teacher") -> Any:
    """The teacher's model config (validated, nothing built); ``where`` names the
    yaml section in errors (``distill.teacher`` or ``model.init.teacher``)."""
    from lavis.common.registry import registry

    check_keys(cfg, TEACHER_KEYS, where)
    if cfg.get("cfg_path"):
        path = cfg["cfg_path"] if os.path.isabs(cfg["cfg_path"]) else os.path.join(base_dir, cfg["cfg_path"])
        if not os.path.isfile(path):
            raise ConfigError(f"{where}.cfg_path: file not found: {path}")
        model_cfg = OmegaConf.load(path).get("model")
        if model_cfg is None:
            raise ConfigError(f"{where}.cfg_path: {path} has no 'model' section")
    else:
        model_cfg = OmegaConf.create({k: cfg.get(k) for k in ("arch", "model_type")})
    arch, model_type = model_cfg.get("arch"), model_cfg.get("model_type")
    model_cls = registry.get_model_class(arch) if arch else None
    if model_cls is None:
        raise ConfigError(f"{where}.arch: '{arch}' is not a registered LAVIS model")
    if model_type not in model_cls.PRETRAINED_MODEL_CONFIG_DICT:
        raise ConfigError(f"{where}.model_type: '{model_type}' is not a type of '{arch}'; "
                          f"known: {', '.join(model_cls.PRETRAINED_MODEL_CONFIG_DICT)}")
    preset = OmegaConf.load(model_cls.default_config_path(model_type)).model
    merged = OmegaConf.merge(preset, model_cfg, OmegaConf.create(dict(cfg.get("overrides") or {})))
    if cfg.get("checkpoint") or not cfg.get("load_weights", True):
        merged.load_finetuned = False
        merged.load_pretrained = False
    return merged


def load_teacher(cfg: Mapping[str, Any], base_dir: str = ".", shape_only: bool = False) -> FrozenTeacher:
    """The frozen teacher; ``shape_only``: built on the meta device, no weights read
    (its outputs come from a cache; terms need only its layout and widths)."""
    from lavis.common.registry import registry

    from lavis_dlip.models.tokenizer import tokenizer_source

    model_cfg = teacher_model_config(cfg, base_dir)
    if shape_only:
        from lavis_dlip.models.sources import build_model

        return FrozenTeacher(build_model(model_cfg, meta=True))
    with tokenizer_source(model_cfg.get("tokenizer")):
        if cfg.get("load_weights", True):
            model = registry.get_model_class(model_cfg.arch).from_config(model_cfg)
        else:  # dry runs and tests: the teacher's shape with random stand-in weights
            from lavis_dlip.models.stand_ins import random_model

            model = random_model(model_cfg)
    checkpoint = cfg.get("checkpoint")
    if checkpoint:
        _load_weights(model, checkpoint, "distill.teacher.checkpoint")
    logger.info("teacher %s/%s (%s)", model_cfg.arch, model_cfg.model_type,
                checkpoint or ("LAVIS weights" if cfg.get("load_weights", True) else "random weights"))
    return FrozenTeacher(model)


def _load_weights(model: nn.Module, checkpoint: str, key: str) -> None:
    """Our models load strictly with one-line errors; LAVIS's own loader (it also
    resizes position embeddings) raises bare pickle or shape errors, named here."""
    from lavis_dlip import checkpoint as ckpt
    from lavis_dlip.models.base import DlipModelMixin

    if isinstance(model, DlipModelMixin):
        model.load_checkpoint(checkpoint, key=key)
        return
    ckpt.check_exists(checkpoint, key)
    try:
        model.load_checkpoint(checkpoint)
    except Exception as err:
        raise CheckpointError(f"{key}: {checkpoint} cannot be loaded into {type(model).__name__} "
                              f"({type(err).__name__}: {ckpt.first_line(err)})") from None


class FrozenTeacher:
    """Holds the teacher outside the student: not an ``nn.Module`` attribute of it,
    so it stays out of the optimizer, DDP and checkpoints."""

    def __init__(self, model: nn.Module):
        self.model = model.eval().requires_grad_(False)

    def to(self, device: torch.device) -> FrozenTeacher:
        if not self.is_meta:
            self.model.to(device)
        return self

    @property
    def is_meta(self) -> bool:
        """Only the teacher's shape (terms and projections), its outputs read from a cache."""
        return next(self.model.parameters()).is_meta

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def replay(self, image: Optional[torch.Tensor], student: Records, needs: set[str],
               points: set[Point], image_embeds: Optional[torch.Tensor] = None,
               positives: Optional[torch.Tensor] = None) -> BlipOutputs:
        """Run the teacher's modules on what the student saw this step.

        ``needs`` picks the passes: ``image``, ``text``, ``fusion`` (positive pairs),
        ``fusion_neg`` (the student's hard negatives, same pairs), ``fusion_mined``
        (per image, the teacher's own hardest negative caption: ``outputs.mined``;
        ``positives`` says which captions are each image's, ``positive_pairs``), ``decoder``.
        ``image_embeds``: the teacher's image embeddings, read from the cache (no ViT).
        """
        model = self.model
        model.eval()
        with Capture(model, points) as records:
            if image_embeds is None:
                image_embeds = model.visual_encoder.forward_features(image)
            atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)

            fused = {}

            def fuse(nth):
                call = _need(student.find("fusion", nth), "fused (ITM / question)")
                idx = match_rows(call.encoder_hidden_states, student.image, f"student fused pass {nth}")
                fused[nth] = fused_pass(model, call.input_ids, call.attention_mask, image_embeds[idx])

            if "text" in needs:
                call = _need(student.find("text"), "text")
                model.text_encoder(call.input_ids, attention_mask=call.attention_mask, return_dict=True, mode="text")
            if "fusion" in needs:
                fuse(0)
            if "fusion_neg" in needs:
                fuse(1)
            if "decoder" in needs:
                call = _need(student.find("decoder"), "decoder")
                if getattr(model, "text_decoder", None) is None:
                    raise ConfigError(f"distill: the teacher ({type(model).__name__}) has no text decoder "
                                      f"for the decoder terms; use a teacher with one (blip_pretrain, blip_caption)")
                states, mask = self._decoder_memory(call, student, image_embeds, atts, fused, fuse)
                # a DLIP decoder given the student's labels computes logits only where they score
                scored = call.labels is not None and isinstance(model.text_decoder, ScoredLMHeadDecoder)
                model.text_decoder(call.input_ids, attention_mask=call.attention_mask, encoder_hidden_states=states,
                                   encoder_attention_mask=mask, return_dict=True,
                                   **({"labels": call.labels} if scored else {}))
        out = BlipOutputs(model, records)
        if "fusion_mined" in needs:  # after the capture: its fused pass is no call of the student's
            if positives is None:
                raise ValueError("replay: fusion_mined needs the batch's positive pairs (outputs.positive_pairs)")
            out.mined = out.mine_negatives(positives)
        return out


    def _decoder_memory(self, call, student: Records, image_embeds, atts, fused: dict, fuse):
        """What the teacher's decoder attends to, as ``models/layout.py`` says: the
        teacher's image embeddings (captioning, pre-training) or its fused question
        states (BLIP's VQA answer decoder), row for row as the student's decoder saw them."""
        from lavis_dlip.models.layout import module_layout

        if module_layout(self.model, "decoder").cross_stream == "vision":
            idx = match_rows(call.encoder_hidden_states, student.image, "student decoder pass")
            return image_embeds[idx], atts[idx]
        question = _need(student.find("fusion"), "fused question")
        idx = match_rows(call.encoder_hidden_states, question.output, "student decoder pass (question states)")
        if 0 not in fused:
            fuse(0)
        return fused[0][idx], question.attention_mask[idx]


def _need(call: Optional[Any], what: str):
    if call is None:
        raise ConfigError(f"distill: the student's forward made no {what} pass, which a loss term needs")
    return call


def check_compatible(student: nn.Module, teacher: nn.Module) -> None:
    """Token-level terms feed the student's token ids to the teacher."""
    s_tok, t_tok = getattr(student, "tokenizer", None), getattr(teacher, "tokenizer", None)
    if s_tok is not None and t_tok is not None and s_tok.get_vocab() != t_tok.get_vocab():
        raise ConfigError("distill.teacher: the teacher's tokenizer differs from the student's "
                          "(model.tokenizer); distillation feeds the same token ids to both")
    s_img = getattr(student.visual_encoder, "patch_embed", None)
    t_img = getattr(teacher.visual_encoder, "patch_embed", None)
    if s_img is not None and t_img is not None and s_img.img_size != t_img.img_size:
        raise ConfigError(f"distill.teacher: image size {t_img.img_size} differs from the student's "
                          f"{s_img.img_size}; both see the same images (set distill.teacher.overrides.image_size)")
