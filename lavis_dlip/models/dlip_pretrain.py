"""``dlip_pretrain``: BLIP's pre-training model (ITC + ITM + image-grounded LM, with
momentum encoders and queues) with every module sized from yaml. The decoder
shares all weights but self-attention with the text encoder when
``decoder.share: true`` (BLIP's layout; needs identical shapes). Forward and
losses are LAVIS's ``BlipPretrain``."""

from __future__ import annotations

from lavis.common.registry import registry
from lavis.models.blip_models.blip_pretrain import BlipPretrain
from lavis.models.blip_models.blip_retrieval import BlipRetrieval

from lavis_dlip.errors import ConfigError
from lavis_dlip.models.base import DlipModelMixin, preset_files
from lavis_dlip.models.components import (
    build_text_decoder,
    build_text_encoder,
    build_vision_encoder,
    decoder_config,
    text_config,
)
from lavis_dlip.blip.tokenizer import tokenizer_source


@registry.register_model("dlip_pretrain")
class DlipPretrain(DlipModelMixin, BlipPretrain):
    PRETRAINED_MODEL_CONFIG_DICT = preset_files("dlip_pretrain")
    MODEL_KEYS = ("embed_dim", "queue_size", "alpha", "momentum", "temp")

    @classmethod
    def from_config(cls, cfg=None):
        cls.check_config(cfg)
        share = bool(decoder_config(cfg)["share"])
        if share:
            t, d = text_config(cfg), decoder_config(cfg)
            same = (t["fusion_layers"] is None and t["layers"] == d["layers"]
                    and all(t[k] == d[k] for k in ("width", "heads", "intermediate_size")))
            if not same:
                raise ConfigError(
                    "model.decoder.share: true ties the decoder to the text encoder (BLIP), which needs "
                    "the same layers, width, heads and intermediate_size and text.fusion_layers: null; "
                    "set model.decoder.share: false for a decoder of its own shape"
                )
        with tokenizer_source(cfg.get("tokenizer")):
            image_encoder = build_vision_encoder(cfg)
            model = cls(
                image_encoder=image_encoder,
                text_encoder=build_text_encoder(cfg, image_encoder.vision_width),
                text_decoder=build_text_decoder(cfg, image_encoder.vision_width),
                queue_size=cfg.get("queue_size", 57600),
                alpha=cfg.get("alpha", 0.4),
                embed_dim=cfg.get("embed_dim", 256),
                momentum=cfg.get("momentum", 0.995),
                tie_enc_dec_weights=share,
                max_txt_len=cfg.get("max_txt_len", 30),
            )
        model.temp.data.fill_(float(cfg.get("temp", 0.07)))
        model.initialize(cfg)
        return model

    # Zero-shot retrieval (ITC top-k re-ranked by ITM), as BLIP evaluates a pre-trained model:
    # LAVIS's retrieval scoring needs only modules a pre-training model has.
    compute_sim_matrix = BlipRetrieval.compute_sim_matrix
