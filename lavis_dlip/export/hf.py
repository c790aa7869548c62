"""A BLIP model (a DLIP student or LAVIS's own) as Hugging Face transformers' BLIP
classes: ``BlipForImageTextRetrieval``, ``BlipForConditionalGeneration`` and
``BlipForQuestionAnswering``, with a ``BlipProcessor`` beside the weights.

The config is read from the model's own modules (the ViT's blocks, the BERTs'
``BertConfig``), never guessed from tensors. The weights go through the key table of
``blip/hf_keys.py`` (``hf_state``): LAVIS's ViT keys renamed to transformers'
``vision_model.*``, its residual stream rescaled so that transformers' LayerNorm eps
computes BLIP's; the BERT keys keep their names; momentum copies, queues and the ITC
temperature are dropped; any other key the table does not place fails the export, naming it.

What transformers cannot express is refused with the reason: an ALBEF-style split
text encoder (``model.text.fusion_layers``), and a VQA model whose answer decoder
differs from its question encoder (one ``text_config`` holds both) or whose vision
width differs from its text width (``text_config.encoder_hidden_size`` is the
width of the vision states *and*, in the answer decoder, of the question states).

Note for users: BLIP feeds image-grounded text (ITM, VQA questions) with the
``[ENC]`` token in place of ``[CLS]``; transformers' classes take ``input_ids`` as
given, so set ``input_ids[:, 0] = processor.tokenizer.enc_token_id`` (saved as
``additional_special_tokens[0]``) for LAVIS's scores (``lavis_dlip.serve`` does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lavis_dlip.errors import ConfigError
from lavis_dlip.blip.hf_keys import EXACT_FILE, EXPORT_KEY, HF_VISION_EPS, corrections, residual_scale, to_hf

HF_CLASSES = {"retrieval": "BlipForImageTextRetrieval", "caption": "BlipForConditionalGeneration",
              "vqa": "BlipForQuestionAnswering"}


def task_of(model: nn.Module) -> str:
    """retrieval, caption or vqa, by LAVIS class (students subclass LAVIS's)."""
    from lavis.models.blip_models.blip_caption import BlipCaption
    from lavis.models.blip_models.blip_retrieval import BlipRetrieval
    from lavis.models.blip_models.blip_vqa import BlipVQA

    for cls, task in ((BlipRetrieval, "retrieval"), (BlipCaption, "caption"), (BlipVQA, "vqa")):
        if isinstance(model, cls):
            return task
    raise ConfigError(f"{type(model).__name__} is not a BLIP retrieval, captioning or VQA model; "
                      f"export supports {', '.join(HF_CLASSES)}")


def _bert_config(model: nn.Module, task: str):
    bert = model.text_decoder.bert if task == "caption" else model.text_encoder
    cfg = bert.config
    if getattr(cfg, "fusion_layer", None) is not None:
        raise ConfigError(
            f"transformers' BLIP text model cross-attends in every layer; this model's text encoder has "
            f"{cfg.fusion_layer} text-only layers before its fusion layers (model.text.fusion_layers): "
            "export it to ONNX instead")
    if task == "vqa":
        dec = model.text_decoder.bert.config
        fields = ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers")
        diff = [f"{f} {getattr(cfg, f)} vs {getattr(dec, f)}" for f in fields if getattr(cfg, f) != getattr(dec, f)]
        if diff:
            raise ConfigError("transformers' BlipForQuestionAnswering builds its question encoder and answer "
                              "decoder from one text_config; this model's differ (encoder vs decoder: "
                              f"{'; '.join(diff)}): export it to ONNX instead")
        if int(model.visual_encoder.embed_dim) != cfg.hidden_size:
            raise ConfigError(
                "transformers' BlipForQuestionAnswering gives the answer decoder's cross-attention the vision "
                f"width (text_config.encoder_hidden_size); this model's vision width "
                f"{int(model.visual_encoder.embed_dim)} differs from its text width {cfg.hidden_size}, which the "
                "decoder reads: export it to ONNX instead")
    return cfg


def vision_eps(model: nn.Module) -> float:
    """The one LayerNorm eps of the model's ViT (a ViT with several cannot be rescaled to one)."""
    eps = {float(m.eps) for m in model.visual_encoder.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) != 1:
        raise ConfigError(f"export to transformers: the ViT's LayerNorms use {len(eps)} different eps "
                          f"({sorted(eps)}); transformers' BlipVisionModel has one: export it to ONNX instead")
    return eps.pop()


def blip_config(model: nn.Module, task: str):
    """transformers' ``BlipConfig`` of ``model``."""
    from transformers import BlipConfig, BlipTextConfig, BlipVisionConfig

    ve = model.visual_encoder
    block = ve.blocks[0]
    vision = BlipVisionConfig(
        hidden_size=int(ve.embed_dim), intermediate_size=int(block.mlp.fc1.out_features),
        num_hidden_layers=len(ve.blocks), num_attention_heads=int(block.attn.num_heads),
        image_size=int(ve.patch_embed.img_size[0]), patch_size=int(ve.patch_embed.patch_size[0]),
        layer_norm_eps=HF_VISION_EPS, hidden_act="gelu", projection_dim=int(ve.embed_dim))
    bert = _bert_config(model, task)
    tok = model.tokenizer
    text = BlipTextConfig(
        vocab_size=bert.vocab_size, hidden_size=bert.hidden_size, encoder_hidden_size=int(ve.embed_dim),
        intermediate_size=bert.intermediate_size, num_hidden_layers=bert.num_hidden_layers,
        num_attention_heads=bert.num_attention_heads, max_position_embeddings=bert.max_position_embeddings,
        layer_norm_eps=bert.layer_norm_eps, hidden_act=bert.hidden_act, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
        sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id, projection_dim=bert.hidden_size)
    embed = int(model.vision_proj.out_features) if task == "retrieval" else 256
    config = BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=embed,
                        image_text_hidden_size=embed)
    config.architectures = [HF_CLASSES[task]]
    return config


def hf_state(state: dict[str, torch.Tensor], eps: float) -> tuple[dict[str, torch.Tensor], list[str]]:
    """LAVIS BLIP keys -> transformers BLIP keys (``blip/hf_keys.py``); (mapped state, dropped
    keys). ``eps``: the ViT's LayerNorm eps. A key that is neither mapped nor a known
    LAVIS-only key fails the export."""
    out, dropped, unknown = to_hf(state, eps)
    if unknown:
        raise ConfigError(f"export to transformers: {len(unknown)} weights have no place in transformers' BLIP, "
                          f"e.g. '{unknown[0]}'")
    return out, dropped


def image_settings(model: nn.Module) -> dict[str, Any]:
    """The eval image preprocessing (LAVIS's blip_image_eval, its default mean and std):
    size, mean, std, bicubic."""
    from lavis.processors.blip_processors import BlipImageBaseProcessor

    base = BlipImageBaseProcessor()
    norm = base.normalize
    return {"image_size": int(model.visual_encoder.patch_embed.img_size[0]), "mean": list(map(float, norm.mean)),
            "std": list(map(float, norm.std)), "resample": "bicubic"}


def export_hf(model: nn.Module, out: Path) -> dict[str, Any]:
    """Write ``out`` so that ``Blip*.from_pretrained(out)`` and ``BlipProcessor.from_pretrained(out)``
    load it; returns what was written and dropped (``export`` records it in dlip_export.json)."""
    import transformers
    from PIL import Image
    from transformers import BlipImageProcessor, BlipProcessor

    task = task_of(model)
    config = blip_config(model, task)
    eps = vision_eps(model)
    setattr(config, EXPORT_KEY, {"vision_scale": residual_scale(eps), "vision_layer_norm_eps": eps})  # for import
    hf_model = getattr(transformers, HF_CLASSES[task])(config).eval()
    state, dropped = hf_state(model.state_dict(), eps)
    expected = hf_model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("position_ids")]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        raise ConfigError(f"export to transformers {HF_CLASSES[task]}: {len(missing)} of its weights have no "
                          f"source{f', e.g. {missing[0]!r}' if missing else ''}; {len(extra)} weights have no "
                          f"place{f', e.g. {extra[0]!r}' if extra else ''}")
    bad = [k for k in state if state[k].shape != expected[k].shape]
    if bad:
        raise ConfigError(f"export to transformers: shape mismatch at '{bad[0]}': "
                          f"{tuple(state[bad[0]].shape)} vs {tuple(expected[bad[0]].shape)}")
    hf_model.load_state_dict(state, strict=False)
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out)
    torch.save(corrections(state, model.state_dict(), eps), out / EXACT_FILE)  # read back bit for bit
    img = image_settings(model)
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": img["image_size"], "width": img["image_size"]},
                                           resample=Image.BICUBIC, image_mean=img["mean"], image_std=img["std"]),
        tokenizer=model.tokenizer)
    processor.save_pretrained(out)
    return {"format": "hf", "class": HF_CLASSES[task], "task": task, "dropped": len(dropped),
            "weights": len(state), "prompt": getattr(model, "prompt", None),
            "enc_token_id": int(model.tokenizer.enc_token_id)}
