"""A BLIP model (a DLIP student or LAVIS's own) as ONNX graphs that ONNX Runtime
serves without LAVIS, PyTorch or a tokenizer-inside-forward.

LAVIS's ``forward(samples)`` tokenizes inside the model and mixes training and
inference, which is what blocks ``torch.onnx.export``. Here each inference path is
a small wrapper around the model's own submodules, traced with dynamic batch and
text length:

* retrieval: ``image_encoder.onnx`` (pixels -> ``image_embeds`` for ITM and the
  normalised ITC ``image_feat``), ``text_encoder.onnx`` (ids, mask -> normalised
  ``text_feat``), ``itm.onnx`` (ids, mask, image_embeds -> ITM logits and match
  probability; the ``[ENC]`` token is put in place of ``[CLS]`` inside the graph,
  as BLIP does);
* captioning: ``image_encoder.onnx`` and ``decoder_step.onnx``: one decoder step
  with a key/value cache of its self-attention (``past_*`` in, ``present_*`` out;
  zero-length at the first step);
* VQA: ``image_encoder.onnx``, ``question_encoder.onnx`` (question fused with the
  image) and ``decoder_step.onnx`` reading the question states.

``lavis_dlip.serve`` drives them: preprocessing, tokenizer and LAVIS's greedy
generation, token for token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lavis_dlip.blip import passes

OPSET = 17


class ImageEncoder(nn.Module):
    def __init__(self, model: nn.Module, with_feat: bool):
        super().__init__()
        self.visual_encoder = model.visual_encoder
        self.vision_proj = model.vision_proj if with_feat else None

    def forward(self, pixel_values: torch.Tensor):
        embeds = self.visual_encoder.forward_features(pixel_values)
        if self.vision_proj is None:
            return embeds
        return embeds, passes.image_feat(self, embeds)


class TextEncoder(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.text_encoder, self.text_proj = model.text_encoder, model.text_proj

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        out = self.text_encoder(input_ids, attention_mask=attention_mask, return_dict=True, mode="text")
        return passes.text_feat(self, out.last_hidden_state)


class Fused(nn.Module):
    """Text fused with image (or question) states: the ITM scorer, or VQA's question encoder."""

    def __init__(self, model: nn.Module, itm: bool):
        super().__init__()
        self.text_encoder = model.text_encoder
        self.itm_head = model.itm_head if itm else None
        self.enc_token_id = int(model.tokenizer.enc_token_id)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor):
        states = passes.fused_pass(self, passes.with_enc(input_ids, self.enc_token_id), attention_mask, image_embeds)
        if self.itm_head is None:
            return states
        logits = self.itm_head(states[:, 0, :])
        return logits, logits.softmax(dim=-1)[:, 1]


class DecoderStep(nn.Module):
    """Next-token logits of the last position and the updated self-attention cache."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.text_decoder = model.text_decoder
        self.layers = self.text_decoder.bert.config.num_hidden_layers

    def forward(self, input_ids, encoder_hidden_states, encoder_attention_mask, *past):
        cache = tuple((past[2 * i], past[2 * i + 1]) for i in range(self.layers))
        out = self.text_decoder(input_ids, encoder_hidden_states=encoder_hidden_states,
                                encoder_attention_mask=encoder_attention_mask, past_key_values=cache,
                                use_cache=True, return_dict=True)
        present = [t for layer in out.past_key_values for t in layer[:2]]
        return (out.logits[:, -1, :], *present)


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            axes: dict[str, dict[int, str]]) -> None:
    with torch.no_grad():
        torch.onnx.export(module.eval(), args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)


def _example_image(model: nn.Module, batch: int = 2) -> torch.Tensor:
    size = int(model.visual_encoder.patch_embed.img_size[0])
    return torch.randn(batch, 3, size, size)


def _example_text(model: nn.Module, batch: int = 2, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1000, 2000, (batch, length))
    ids[:, 0] = model.tokenizer.cls_token_id
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    return ids, mask


def decoder_cache_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, heads, head width) of the decoder's self-attention cache."""
    cfg = model.text_decoder.bert.config
    return cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads


def _export_decoder(model: nn.Module, states: torch.Tensor, path: Path) -> None:
    layers, heads, dim = decoder_cache_shape(model)
    batch = states.shape[0]
    past = [torch.randn(batch, heads, 3, dim) for _ in range(2 * layers)]
    names = [f"past_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    presents = [n.replace("past", "present") for n in names]
    ids = torch.randint(1000, 2000, (batch, 1))
    mask = torch.ones(states.shape[:2], dtype=torch.long)
    axes = {"input_ids": {0: "batch", 1: "new_tokens"}, "encoder_hidden_states": {0: "batch", 1: "states"},
            "encoder_attention_mask": {0: "batch", 1: "states"}, "logits": {0: "batch"},
            **{n: {0: "batch", 2: "past"} for n in names}, **{n: {0: "batch", 2: "total"} for n in presents}}
    _export(DecoderStep(model), (ids, states, mask, *past), path,
            ["input_ids", "encoder_hidden_states", "encoder_attention_mask", *names], ["logits", *presents], axes)


def export_onnx(model: nn.Module, task: str, out: Path) -> list[str]:
    """Write the graphs of ``task`` into ``out``; their file names."""
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    image = _example_image(model)
    ids, mask = _example_text(model)
    text_axes = {"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"}}
    embeds_axes = {"image_embeds": {0: "batch"}}
    files = []
    with torch.no_grad():
        embeds = model.visual_encoder.forward_features(image)
    if task == "retrieval":
        _export(ImageEncoder(model, True), (image,), out / "image_encoder.onnx", ["pixel_values"],
                ["image_embeds", "image_feat"],
                {"pixel_values": {0: "batch"}, **embeds_axes, "image_feat": {0: "batch"}})
        _export(TextEncoder(model), (ids, mask), out / "text_encoder.onnx", ["input_ids", "attention_mask"],
                ["text_feat"], {**text_axes, "text_feat": {0: "batch"}})
        _export(Fused(model, itm=True), (ids, mask, embeds), out / "itm.onnx",
                ["input_ids", "attention_mask", "image_embeds"], ["itm_logits", "itm_prob"],
                {**text_axes, **embeds_axes, "itm_logits": {0: "batch"}, "itm_prob": {0: "batch"}})
        files = ["image_encoder.onnx", "text_encoder.onnx", "itm.onnx"]
    elif task == "caption":
        _export(ImageEncoder(model, False), (image,), out / "image_encoder.onnx", ["pixel_values"],
                ["image_embeds"], {"pixel_values": {0: "batch"}, **embeds_axes})
        _export_decoder(model, embeds, out / "decoder_step.onnx")
        files = ["image_encoder.onnx", "decoder_step.onnx"]
    elif task == "vqa":
        _export(ImageEncoder(model, False), (image,), out / "image_encoder.onnx", ["pixel_values"],
                ["image_embeds"], {"pixel_values": {0: "batch"}, **embeds_axes})
        _export(Fused(model, itm=False), (ids, mask, embeds), out / "question_encoder.onnx",
                ["input_ids", "attention_mask", "image_embeds"], ["question_states"],
                {**text_axes, **embeds_axes, "question_states": {0: "batch", 1: "length"}})
        with torch.no_grad():
            states = Fused(model, itm=False)(ids, mask, embeds)
        _export_decoder(model, states, out / "decoder_step.onnx")
        files = ["image_encoder.onnx", "question_encoder.onnx", "decoder_step.onnx"]
    return files


def serving_config(model: nn.Module, task: str, image: dict[str, Any], run_cfg: Any) -> dict[str, Any]:
    """What ``lavis_dlip.serve`` needs beside the graphs: preprocessing, special tokens,
    LAVIS's generation settings."""
    tok = model.tokenizer
    cfg: dict[str, Any] = {"task": task, "image": image, "pad_token_id": tok.pad_token_id,
                           "cls_token_id": tok.cls_token_id, "sep_token_id": tok.sep_token_id,
                           "bos_token_id": tok.bos_token_id, "enc_token_id": int(tok.enc_token_id),
                           "max_txt_len": int(getattr(model, "max_txt_len", 35))}
    if task in ("caption", "vqa"):
        layers, heads, dim = decoder_cache_shape(model)
        cfg["decoder"] = {"layers": layers, "heads": heads, "head_dim": dim}
        default_len = (30, 5) if task == "caption" else (10, 1)
        cfg["generate"] = {"max_len": int(run_cfg.get("max_len", default_len[0])),
                           "min_len": int(run_cfg.get("min_len", default_len[1]))}
    if task == "caption":
        cfg["prompt"] = model.prompt
    return cfg
