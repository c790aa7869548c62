"""What every DLIP model class shares: yaml presets inside this package, model-key
validation, and strict checkpoint loading."""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import torch

from lavis_dlip.errors import CheckpointError, ConfigError, check_keys
from lavis_dlip import checkpoint as ckpt
from lavis_dlip.models.components import SHAPES, decoder_config, vision_config
from lavis_dlip.models.init import apply_init, parse_init
from lavis_dlip.blip.layout import QUEUES

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "models")

# Keys every DLIP model accepts besides its own; LAVIS's loader keys included.
COMMON_KEYS = (
    "arch", "model_type", "tokenizer", "shape", "vision", "text", "decoder",
    "load_finetuned", "load_pretrained", "finetuned", "pretrained", "max_txt_len", "init",
)

PRESETS = tuple(SHAPES)  # a preset per shape and model: configs/models/dlip_<arch>_<shape>.yaml

logger = logging.getLogger(__name__)


def preset_files(arch: str) -> dict[str, str]:
    """Model type -> preset yaml (in lavis_dlip/configs/models), LAVIS's convention."""
    return {name: f"{arch}_{name}.yaml" for name in PRESETS}


class DlipModelMixin:
    """Mixed into subclasses of LAVIS's BLIP models (left of the LAVIS base)."""

    MODEL_KEYS: tuple[str, ...] = ()
    PRETRAINED_MODEL_CONFIG_DICT: dict[str, str] = {}

    @classmethod
    def default_config_path(cls, model_type: str) -> str:
        """Presets live in lavis_dlip/configs/models, not under LAVIS's library root."""
        if model_type not in cls.PRETRAINED_MODEL_CONFIG_DICT:
            raise ConfigError(
                f"unknown model_type '{model_type}' for {cls.__name__}; "
                f"known: {', '.join(cls.PRETRAINED_MODEL_CONFIG_DICT)}"
            )
        return os.path.join(CONFIG_DIR, cls.PRETRAINED_MODEL_CONFIG_DICT[model_type])

    @classmethod
    def check_config(cls, cfg: Mapping[str, Any]) -> None:
        """Every key and section of the model config (nothing is built)."""

        check_keys(cfg, COMMON_KEYS + cls.MODEL_KEYS, "model")
        vision_config(cfg)
        decoder_config(cfg)  # includes the text section
        if cfg.get("init"):
            parse_init(cfg["init"])

    def initialize(self, cfg: Mapping[str, Any]):
        """Module-wise init (``model.init``, see lavis_dlip.models.init), then the
        checkpoint named by ``finetuned``/``pretrained``, which overrides it. With a
        finetuned checkpoint (evaluation) the init is skipped: the strict load
        replaces every weight, and the init's teacher need not be at hand."""

        finetuned = cfg.get("load_finetuned", False) and cfg.get("finetuned")
        self.init_report = apply_init(self, None if finetuned else cfg.get("init"))
        self.load_checkpoint_from_config(cfg)
        return self.init_report

    def load_checkpoint_from_config(self, cfg: Mapping[str, Any], **kwargs) -> None:
        """LAVIS's version asserts a path exists; a DLIP model without one stays as
        initialised (random or module-wise init)."""
        if cfg.get("load_finetuned", False) and cfg.get("finetuned"):
            self.load_checkpoint(cfg["finetuned"], key="model.finetuned")
        elif cfg.get("load_pretrained", False) and cfg.get("pretrained"):
            self.load_checkpoint(cfg["pretrained"], key="model.pretrained")

    def load_checkpoint(self, url_or_filename: str, key: str = "checkpoint"):
        """Strict load of ``ckpt['model']`` (or a bare state dict): LAVIS's loader
        silently ignores missing and mismatched keys, which hides a wrong preset.
        Errors are one line naming the file and ``key``, the config key that named it."""

        self.load_state(ckpt.read(url_or_filename, key), url_or_filename, key)

    def load_state(self, checkpoint: Any, url_or_filename: str, key: str = "checkpoint") -> None:
        """``load_checkpoint`` of an object already read (``ckpt['model']`` or a state dict)."""
        state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
        if not isinstance(state_dict, Mapping) or not all(torch.is_tensor(v) for v in state_dict.values()):
            raise CheckpointError(f"{key}: {url_or_filename} holds no state dict (a mapping of tensors, "
                                  "alone or under 'model')")
        self.load_state_dict(fitting_state(self, state_dict, url_or_filename, key), strict=True)
        logger.info("loaded checkpoint %s", url_or_filename)


def fitting_state(model, state_dict: Mapping[str, torch.Tensor], name: str, key: str) -> dict:
    """``state_dict`` without the modules ``model`` lacks, if the rest fits exactly;
    else a one-line ``CheckpointError`` saying how it differs (shapes, missing and
    unexpected keys, a first example of each), naming the file and ``key``."""
    own = model.state_dict()
    state_dict = _drop_absent_modules(dict(state_dict), own, name)
    problems = []
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
                  for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    for label, items in (("shape mismatches", mismatched), ("missing keys", missing), ("unexpected keys", unexpected)):
        if items:
            problems.append(f"{label}: {len(items)}, e.g. {items[0]}")
    if problems:
        raise CheckpointError(f"{key}: {name} does not fit {type(model).__name__}: {'; '.join(problems)}; "
                              "was it saved from the same arch and model_type?")
    return state_dict


def _drop_absent_modules(state_dict: dict, own: dict, name: str) -> dict:
    """Keys of whole modules this model does not have (a pre-training checkpoint's
    decoder in a retrieval model, the distillation projections ``dlip_distill``)
    are dropped with a log line; every module the model has must match exactly."""
    present = {k.split(".", 1)[0] for k in own}
    dropped = sorted({k.split(".", 1)[0] for k in state_dict} - present)
    if dropped:
        logger.info("%s: ignoring modules this model does not have: %s", name, ", ".join(dropped))
    kept = {k: v for k, v in state_dict.items() if k.split(".", 1)[0] in present}
    # Queues are training state of one task's model (BLIP pre-training -> retrieval changes them): keep ours.
    queues = [k for k in own if k in QUEUES]
    if any(k not in kept or kept[k].shape != own[k].shape for k in queues):
        kept.update({k: own[k] for k in queues})
    return kept
