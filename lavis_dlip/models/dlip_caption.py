"""``dlip_caption``: BLIP's captioner (ViT + image-grounded text decoder) with
sizes from yaml. ``generate`` and the LM loss are LAVIS's ``BlipCaption``."""

from __future__ import annotations

from lavis.common.registry import registry
from lavis.models.blip_models.blip_caption import BlipCaption

from lavis_dlip.models.base import DlipModelMixin, preset_files
from lavis_dlip.models.components import build_text_decoder, build_vision_encoder
from lavis_dlip.blip.tokenizer import tokenizer_source


@registry.register_model("dlip_caption")
class DlipCaption(DlipModelMixin, BlipCaption):
    PRETRAINED_MODEL_CONFIG_DICT = preset_files("dlip_caption")
    MODEL_KEYS = ("prompt",)

    @classmethod
    def from_config(cls, cfg=None):
        cls.check_config(cfg)
        with tokenizer_source(cfg.get("tokenizer")):
            image_encoder = build_vision_encoder(cfg)
            model = cls(
                image_encoder=image_encoder,
                text_decoder=build_text_decoder(cfg, image_encoder.vision_width),
                prompt=cfg.get("prompt", "a picture of "),
                max_txt_len=cfg.get("max_txt_len", 40),
            )
        model.initialize(cfg)
        return model
