"""BLIP's passes, written once for everything that runs them outside LAVIS's forward (the
teacher's replay, the loss terms, the cost report, export and its check): the ITC
features of images and texts, and the fused (ITM) pass of a text with an image, whose
text starts with BLIP's ``[ENC]`` token in place of ``[CLS]``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def with_enc(input_ids: torch.Tensor, enc_token_id: int) -> torch.Tensor:
    """Image-grounded text (ITM, VQA questions) starts with [ENC] instead of [CLS] (traceable)."""
    return torch.cat([torch.full_like(input_ids[:, :1], enc_token_id), input_ids[:, 1:]], dim=1)


def image_feat(model: nn.Module, image_embeds: torch.Tensor) -> torch.Tensor:
    """The normalised ITC feature of each image, from its ViT output."""
    return F.normalize(model.vision_proj(image_embeds[:, 0, :]), dim=-1)


def text_feat(model: nn.Module, text_states: torch.Tensor) -> torch.Tensor:
    """The normalised ITC feature of each text, from its unimodal text encoder output."""
    return F.normalize(model.text_proj(text_states[:, 0, :]), dim=-1)


def fused_pass(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               image_embeds: torch.Tensor) -> torch.Tensor:
    """Row ``i``'s text (its ids as given: with [ENC] for ITM) cross-attending to row ``i``'s
    image (or question) states: the text encoder's last hidden state."""
    atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    return model.text_encoder(input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                              encoder_attention_mask=atts, return_dict=True).last_hidden_state


def itm_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               image_embeds: torch.Tensor) -> torch.Tensor:
    """The ITM head's two logits (no match, match) of each (text, image) row pair."""
    return model.itm_head(fused_pass(model, input_ids, attention_mask, image_embeds)[:, 0, :])
