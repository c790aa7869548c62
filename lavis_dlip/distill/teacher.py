"""The frozen teacher: any LAVIS BLIP model, loaded from its registry name and
model type (weights from LAVIS's yaml URLs, a checkpoint path or URL, or random;
``distill.teacher``'s keys: ``blip/teacher.py``), queried module by module so that it
never updates its momentum encoders or queues."""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

import torch
from torch import nn

from lavis_dlip.errors import CheckpointError, ConfigError
from lavis_dlip.distill.capture import Capture, Point, Records
from lavis_dlip.blip.passes import fused_pass
from lavis_dlip.distill.outputs import BlipOutputs, match_rows
from lavis_dlip.models.components import ScoredLMHeadDecoder
from lavis_dlip import checkpoint as ckpt
from lavis_dlip.blip.build import build_model, random_model
from lavis_dlip.blip.layout import module_layout
from lavis_dlip.blip.teacher import read_weights, teacher_model_config
from lavis_dlip.blip.tokenizer import tokenizer_source
from lavis_dlip.models.base import DlipModelMixin

logger = logging.getLogger(__name__)


def load_teacher(cfg: Mapping[str, Any], base_dir: str = ".", shape_only: bool = False) -> FrozenTeacher:
    """The frozen teacher; ``shape_only``: built on the meta device, no weights read
    (its outputs come from a cache; terms need only its layout and widths)."""
    from lavis.common.registry import registry

    model_cfg = teacher_model_config(cfg, base_dir)
    if shape_only:
        return FrozenTeacher(build_model(model_cfg, meta=True))
    checkpoint = cfg.get("checkpoint")
    with tokenizer_source(model_cfg.get("tokenizer")):
        if cfg.get("load_weights", True):
            model = registry.get_model_class(model_cfg.arch).from_config(model_cfg)
        else:  # dry runs and tests: the teacher's shape, random stand-ins for what the checkpoint lacks
            state = read_weights(checkpoint, "distill.teacher.checkpoint") if checkpoint else {}
            model = random_model(model_cfg, given=state.get("model", state) if isinstance(state, dict) else None)
    if checkpoint:
        _load_weights(model, checkpoint, "distill.teacher.checkpoint")
    logger.info("teacher %s/%s (%s)", model_cfg.arch, model_cfg.model_type,
                checkpoint or ("LAVIS weights" if cfg.get("load_weights", True) else "random weights"))
    return FrozenTeacher(model)


def _load_weights(model: nn.Module, checkpoint: str, key: str) -> None:
    """The checkpoint (read once: ``blip.teacher.read_weights``) into the teacher: our models
    strictly, with one-line errors; LAVIS's own as its ``load_checkpoint`` loads them
    (not strictly), a file that does not fit named here."""
    state = read_weights(checkpoint, key)
    if isinstance(model, DlipModelMixin):
        model.load_state(state, checkpoint, key)
        return
    try:
        model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state, strict=False)
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
        """What the teacher's decoder attends to, as ``blip/layout.py`` says: the
        teacher's image embeddings (captioning, pre-training) or its fused question
        states (BLIP's VQA answer decoder), row for row as the student's decoder saw them."""

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
