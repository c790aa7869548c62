"""Builders for BLIP's modules at any size, from per-module yaml sections.

LAVIS only builds ViT-B/L (``vit.py`` asserts ``vit_type in [base, large]``) and
BERT from a json file; DLIP students need every module sized on its own. These
builders construct LAVIS's own classes (``VisionTransformerEncoder``,
``XBertEncoder``, ``XBertLMHeadDecoder``) so every LAVIS code path that uses them
keeps working. Keys are validated here, with errors that name the key.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn
import yaml
from lavis.models.med import BertLMHeadModel, XBertLMHeadDecoder
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

from lavis_dlip.errors import ConfigError, check_keys

SHAPES_FILE = Path(__file__).resolve().parent.parent / "configs" / "shapes.yaml"
SHAPES: dict[str, dict] = yaml.safe_load(SHAPES_FILE.read_text())  # preset name -> vision/text/decoder keys

# Without model.shape, a section is BLIP-base's (the base shape) where it says nothing.
VISION_DEFAULTS: dict[str, Any] = {
    "image_size": 384,
    **SHAPES["base"]["vision"],
    "mlp_ratio": 4.0,
    "drop_path": 0.0,
    "grad_ckpt": False,
    "grad_ckpt_layer": 0,
    "layer_norm_eps": 1e-6,
}

TEXT_DEFAULTS: dict[str, Any] = {
    # width, heads, intermediate_size; layers: the unimodal text layers. BLIP-style when
    # fusion_layers is null: these same layers also cross-attend to the image in multimodal mode.
    **SHAPES["base"]["text"],
    # Extra cross-attention layers stacked after the text layers (ALBEF-style
    # split, med.py's ``fusion_layer``); null keeps BLIP's shared layout.
    "fusion_layers": None,
    "dropout": 0.1,
    "max_position_embeddings": 512,
    "vocab_size": 30524,
}

DECODER_DEFAULTS: dict[str, Any] = {
    "width": None,  # null: same as the text encoder
    "heads": None,
    "intermediate_size": None,
    **SHAPES["base"]["decoder"],  # layers
    "dropout": 0.1,
    # BLIP pre-training ties the decoder to the text encoder except self-attention
    # (dlip_pretrain only; needs identical shapes).
    "share": False,
}


def shape_of(cfg: Mapping, name: str) -> dict[str, Any]:
    """The section ``name`` of the config's named shape (``model.shape``; configs/shapes.yaml)."""
    shape = cfg.get("shape")
    if shape is None:
        return {}
    if shape not in SHAPES:
        raise ConfigError(f"model.shape: {shape!r} is not one of {', '.join(SHAPES)} ({SHAPES_FILE.name})")
    return dict(SHAPES[shape].get(name) or {})


def _section(cfg: Mapping, name: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """The section's keys over its shape's (``model.shape``) over its defaults; each value
    of the default's type (sizes are integers >= 1, rates numbers, switches True or False)."""
    given = {**shape_of(cfg, name), **dict(cfg.get(name) or {})}
    check_keys(given, defaults, f"model.{name}")
    for key, value in given.items():
        default = defaults[key]
        if value is None or default is None:
            continue
        if isinstance(default, bool):
            ok, what = isinstance(value, bool), "True or False"
        elif isinstance(default, int):
            ok, what = isinstance(value, int) and not isinstance(value, bool) and value >= min(default, 1), (
                "an integer >= 1" if default >= 1 else "an integer >= 0")
        else:
            ok, what = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0, "a number >= 0"
        if not ok:
            raise ConfigError(f"model.{name}.{key} must be {what}, got {value!r}")
    return {**defaults, **given}


def vision_config(cfg: Mapping) -> dict[str, Any]:
    v = _section(cfg, "vision", VISION_DEFAULTS)
    if v["image_size"] % v["patch_size"]:
        raise ConfigError(
            f"model.vision.image_size ({v['image_size']}) must be a multiple of "
            f"model.vision.patch_size ({v['patch_size']})"
        )
    if v["width"] % v["heads"]:
        raise ConfigError(
            f"model.vision.width ({v['width']}) must be divisible by model.vision.heads ({v['heads']})"
        )
    return v


def build_vision_encoder(cfg: Mapping) -> nn.Module:
    """A LAVIS ``VisionTransformerEncoder`` of any width and depth."""
    from lavis.models.vit import VisionTransformerEncoder

    v = vision_config(cfg)
    encoder = VisionTransformerEncoder(
        img_size=v["image_size"],
        patch_size=v["patch_size"],
        embed_dim=v["width"],
        depth=v["depth"],
        num_heads=v["heads"],
        mlp_ratio=v["mlp_ratio"],
        drop_path_rate=v["drop_path"],
        use_grad_checkpointing=v["grad_ckpt"],
        ckpt_layer=v["grad_ckpt_layer"],
        norm_layer=partial(nn.LayerNorm, eps=v["layer_norm_eps"]),
    )
    encoder.vision_width = v["width"]  # what BLIP's heads read (vit.py sets it in from_config)
    return encoder


def text_config(cfg: Mapping) -> dict[str, Any]:
    t = _section(cfg, "text", TEXT_DEFAULTS)
    if t["width"] % t["heads"]:
        raise ConfigError(
            f"model.text.width ({t['width']}) must be divisible by model.text.heads ({t['heads']})"
        )
    if t["fusion_layers"] is not None and int(t["fusion_layers"]) < 1:
        raise ConfigError("model.text.fusion_layers must be null (BLIP-style shared layers) or >= 1")
    return t


def bert_config(
    width: int,
    heads: int,
    intermediate_size: int,
    layers: int,
    encoder_width: int,
    dropout: float,
    vocab_size: int,
    max_position_embeddings: int = 512,
    fusion_layer: Optional[int] = None,
):
    """BertConfig with the fields LAVIS's med.py reads (see lavis/configs/models/med_config.json)."""
    from transformers import BertConfig

    config = BertConfig(
        hidden_size=width,
        num_attention_heads=heads,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=0,
        layer_norm_eps=1e-12,
        add_cross_attention=True,
    )
    config.encoder_width = encoder_width
    config.add_type_embeddings = False
    if fusion_layer is not None:
        config.fusion_layer = fusion_layer  # med.py: layers >= fusion_layer cross-attend
    return config


def build_text_encoder(cfg: Mapping, encoder_width: int) -> nn.Module:
    """A LAVIS ``XBertEncoder``: ``layers`` text layers plus optional fusion layers."""
    from lavis.models.med import XBertEncoder

    t = text_config(cfg)
    fusion = t["fusion_layers"]
    total = t["layers"] + (int(fusion) if fusion is not None else 0)
    config = bert_config(
        width=t["width"],
        heads=t["heads"],
        intermediate_size=t["intermediate_size"],
        layers=total,
        encoder_width=encoder_width,
        dropout=t["dropout"],
        vocab_size=t["vocab_size"],
        max_position_embeddings=t["max_position_embeddings"],
        fusion_layer=t["layers"] if fusion is not None else None,
    )
    return XBertEncoder(config=config, add_pooling_layer=False)


def decoder_config(cfg: Mapping) -> dict[str, Any]:
    d = _section(cfg, "decoder", DECODER_DEFAULTS)
    t = text_config(cfg)
    for key in ("width", "heads", "intermediate_size"):
        if d[key] is None:
            d[key] = t[key]
    if d["width"] % d["heads"]:
        raise ConfigError(
            f"model.decoder.width ({d['width']}) must be divisible by model.decoder.heads ({d['heads']})"
        )
    d["vocab_size"] = t["vocab_size"]
    d["max_position_embeddings"] = t["max_position_embeddings"]
    return d


@dataclass
class ScoredLMOutput(CausalLMOutputWithCrossAttentions):
    """A training forward's output: ``logits`` is None; ``scored_logits`` holds the
    next-token logits ``[N, V]`` of the ``N`` scored positions, row-major over
    ``scored_mask`` (``[B, L-1]``: ``labels[:, 1:] != -100``)."""

    scored_logits: Optional[torch.FloatTensor] = None
    scored_mask: Optional[torch.BoolTensor] = None
    scored_lse: Optional[torch.FloatTensor] = None  # [N] log-partition of each row, differentiable
    scored_probs: Optional[torch.FloatTensor] = None  # [N, V] softmax of each row, no gradient


class SmoothedCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy with label smoothing ``eps`` (PyTorch's definition), each
    row's log-partition ``lse`` as a second, differentiable output, and the softmax
    as a third, without gradient: ``lm_kd`` reuses them instead of more passes over
    the vocabulary (a teacher's softmax is its target distribution; ``exp`` over
    30,524 logits a row is the costly part). Forward keeps the softmax for backward,
    which is then one pass without ``exp`` for both differentiable outputs:
    ``softmax(z) (g_loss + g_lse) - eps g_loss / V - (1 - eps) g_loss onehot(y)``,
    where autograd's would be several."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, target: torch.Tensor, eps: float):
        p = torch.softmax(z, dim=-1)
        top, where = z.max(dim=-1, keepdim=True)
        lse = (top - p.gather(-1, where).log())[:, 0]  # the largest probability is >= 1 / V: its log is safe
        loss = lse - (1.0 - eps) * z.gather(-1, target[:, None])[:, 0] - eps * z.mean(-1)
        ctx.save_for_backward(p, target)
        ctx.mark_non_differentiable(p)
        ctx.eps = eps
        return loss, lse, p

    @staticmethod
    def backward(ctx, g_loss: torch.Tensor, g_lse: torch.Tensor, _g_p: None):
        p, target = ctx.saved_tensors
        eps, vocab = ctx.eps, p.shape[-1]  # an unused output's gradient comes as zeros (autograd's default)
        grad = torch.addcmul((-eps / vocab) * g_loss[:, None], p, (g_loss + g_lse)[:, None])
        return grad.scatter_add_(-1, target[:, None], -(1.0 - eps) * g_loss[:, None]), None, None


class ScoredLMHeadDecoder(XBertLMHeadDecoder):
    """LAVIS's decoder, except that a training forward (``labels`` given) runs the LM
    head only where a label scores a token. LAVIS's computes the full vocabulary's
    logits (30,524) at every position, prompt and padding included, then ignores
    them in the loss: for a narrow student that is most of a step. The loss is
    LAVIS's (cross-entropy with label smoothing 0.1, ``reduction`` mean or per-sequence
    sum); generation and ``return_logits`` are LAVIS's code unchanged."""

    LABEL_SMOOTHING = 0.1  # med.py's BertLMHeadModel.forward

    def forward(self, *args, **kwargs):
        a = _DECODER_FORWARD.bind(self, *args, **kwargs).arguments
        labels = a.get("labels")
        if (labels is None or a.get("return_logits") or a.get("soft_labels") is not None
                or a.get("return_dict") is False or a.get("past_key_values") is not None):
            return super().forward(*args, **kwargs)
        out = self.bert(
            a.get("input_ids"), attention_mask=a.get("attention_mask"), position_ids=a.get("position_ids"),
            head_mask=a.get("head_mask"), inputs_embeds=a.get("inputs_embeds"),
            encoder_hidden_states=a.get("encoder_hidden_states"),
            encoder_attention_mask=a.get("encoder_attention_mask"), use_cache=False,
            output_attentions=a.get("output_attentions"), output_hidden_states=a.get("output_hidden_states"),
            return_dict=True, is_decoder=a.get("is_decoder", True), mode=a.get("mode", "multimodal"),
        )
        keep = labels[:, 1:] != -100
        logits = self.cls(out.last_hidden_state[:, :-1][keep])
        loss, lse, probs = SmoothedCrossEntropy.apply(logits, labels[:, 1:][keep], self.LABEL_SMOOTHING)
        reduction = a.get("reduction", "mean")
        if reduction == "none":  # per sequence, summed over its tokens (BlipVQA's answer loss)
            loss = loss.new_zeros(labels.shape[0]).index_add(0, keep.nonzero()[:, 0], loss)
        else:
            loss = loss.mean() if reduction == "mean" else loss.sum()
        return ScoredLMOutput(loss=loss, hidden_states=out.hidden_states, attentions=out.attentions,
                              cross_attentions=out.cross_attentions, scored_logits=logits, scored_mask=keep,
                              scored_lse=lse, scored_probs=probs)


# the signature of LAVIS's forward: arguments bind by name, and transformers' generate()
# checks its model kwargs against it
_DECODER_FORWARD = inspect.signature(BertLMHeadModel.forward)
ScoredLMHeadDecoder.forward.__signature__ = _DECODER_FORWARD


def build_text_decoder(cfg: Mapping, encoder_width: int) -> nn.Module:
    """A LAVIS ``XBertLMHeadDecoder`` (training: :class:`ScoredLMHeadDecoder`)
    cross-attending to ``encoder_width`` features."""
    d = decoder_config(cfg)
    config = bert_config(
        width=d["width"],
        heads=d["heads"],
        intermediate_size=d["intermediate_size"],
        layers=d["layers"],
        encoder_width=encoder_width,
        dropout=d["dropout"],
        vocab_size=d["vocab_size"],
        max_position_embeddings=d["max_position_embeddings"],
    )
    return ScoredLMHeadDecoder(config=config)
