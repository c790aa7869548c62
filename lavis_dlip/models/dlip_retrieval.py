"""``dlip_retrieval``: BLIP's retrieval model (ITC + ITM with momentum encoders and
queues) with every module sized from yaml. All forward, evaluation and
``compute_sim_matrix`` code is LAVIS's ``BlipRetrieval``."""

from __future__ import annotations

from lavis.common.registry import registry
from lavis.models.blip_models.blip_feature_extractor import BlipFeatureExtractor
from lavis.models.blip_models.blip_image_text_matching import BlipITM
from lavis.models.blip_models.blip_retrieval import BlipRetrieval

from lavis_dlip.models.base import DlipModelMixin, preset_files
from lavis_dlip.models.components import build_text_encoder, build_vision_encoder
from lavis_dlip.blip.tokenizer import tokenizer_source


@registry.register_model("dlip_retrieval")
class DlipRetrieval(DlipModelMixin, BlipRetrieval):
    PRETRAINED_MODEL_CONFIG_DICT = preset_files("dlip_retrieval")
    MODEL_KEYS = ("embed_dim", "queue_size", "alpha", "momentum", "temp", "negative_all_rank")

    @classmethod
    def from_config(cls, cfg=None):
        cls.check_config(cfg)
        with tokenizer_source(cfg.get("tokenizer")):
            image_encoder = build_vision_encoder(cfg)
            model = cls(
                image_encoder=image_encoder,
                text_encoder=build_text_encoder(cfg, image_encoder.vision_width),
                queue_size=cfg.get("queue_size", 57600),
                alpha=cfg.get("alpha", 0.4),
                embed_dim=cfg.get("embed_dim", 256),
                momentum=cfg.get("momentum", 0.995),
                negative_all_rank=cfg.get("negative_all_rank", False),
                max_txt_len=cfg.get("max_txt_len", 35),
            )
        model.temp.data.fill_(float(cfg.get("temp", 0.07)))
        model.initialize(cfg)
        model.reset_queue_ptr()
        return model

    # Inference on raw inputs, LAVIS's own code (it needs only modules a retrieval model has):
    # match({"image", "text_input"}, match_head="itm" | "itc") -> ITM logits or ITC cosine;
    # extract_features({"image", "text_input"}, mode="image" | "text" | "multimodal").
    match = BlipITM.forward
    extract_features = BlipFeatureExtractor.extract_features
