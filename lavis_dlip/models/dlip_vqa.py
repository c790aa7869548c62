"""``dlip_vqa``: BLIP's VQA model (image-grounded question encoder + answer decoder
cross-attending to the question states) with sizes from yaml. Training loss and
``predict_answers`` (rank or generate) are LAVIS's ``BlipVQA``."""

from __future__ import annotations

from lavis.common.registry import registry
from lavis.models.blip_models.blip_vqa import BlipVQA

from lavis_dlip.models.base import DlipModelMixin, preset_files
from lavis_dlip.models.components import (
    build_text_decoder,
    build_text_encoder,
    build_vision_encoder,
)
from lavis_dlip.blip.tokenizer import tokenizer_source


@registry.register_model("dlip_vqa")
class DlipVQA(DlipModelMixin, BlipVQA):
    PRETRAINED_MODEL_CONFIG_DICT = preset_files("dlip_vqa")

    @classmethod
    def from_config(cls, cfg=None):
        cls.check_config(cfg)
        with tokenizer_source(cfg.get("tokenizer")):
            image_encoder = build_vision_encoder(cfg)
            text_encoder = build_text_encoder(cfg, image_encoder.vision_width)
            model = cls(
                image_encoder=image_encoder,
                text_encoder=text_encoder,
                text_decoder=build_text_decoder(cfg, text_encoder.config.hidden_size),
                max_txt_len=cfg.get("max_txt_len", 35),
            )
        model.initialize(cfg)
        return model
