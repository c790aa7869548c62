"""A transformers BLIP as a LAVIS BLIP: ``hf:<Hub id or save_pretrained directory>``
wherever a teacher's checkpoint goes (``distill.teacher.checkpoint``, ``model.init.teacher``).

``BlipForImageTextRetrieval``, ``BlipForConditionalGeneration`` and
``BlipForQuestionAnswering`` become ``dlip_retrieval``, ``dlip_caption`` and ``dlip_vqa``
sized from the model's ``BlipConfig`` (never from tensors), its weights through the key
table the exporter uses (``hf_keys.py``, read backwards). The result looks like a
checkpoint this project saved (``{"model": state, "config": {"model": ...}}``), so the
teacher, the init and the cache key read it as they read any other.

transformers computes the ViT's LayerNorms with eps 1e-5: the imported ViT does too
(``model.vision.layer_norm_eps``), with the weights as they are, unless the model was
written by this project's exporter, whose config records the scale it applied and BLIP's
eps (``hf_keys.EXPORT_KEY``): that scale is undone, with the exporter's corrections
(``hf_keys.EXACT_FILE``) bit for bit, and that eps kept.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from lavis_dlip.blip.build import build_model
from lavis_dlip.blip.build import model_config as preset_config
from lavis_dlip.checkpoint import file_sha256
from lavis_dlip.blip.hf_keys import EXACT_FILE, EXPORT_KEY, HF_VISION_EPS, from_hf
from lavis_dlip.blip.layout import is_training_state
from lavis_dlip.errors import ConfigError

HF = "hf:"
ARCHS = {"BlipForImageTextRetrieval": "dlip_retrieval", "BlipForConditionalGeneration": "dlip_caption",
         "BlipForQuestionAnswering": "dlip_vqa"}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CAPTION_PROMPT = "a picture of "  # LAVIS's BLIP captioner's; transformers' config records none


def is_hf(source: Any) -> bool:
    return isinstance(source, str) and source.startswith(HF)


def _name(source: str) -> str:
    return source[len(HF):]


@functools.lru_cache(maxsize=4)
def _config(source: str, where: str):
    from transformers import BlipConfig

    try:
        config = BlipConfig.from_pretrained(_name(source))
    except Exception as err:  # not on the Hub, offline without a cache, not a BLIP directory
        raise ConfigError(f"{where}: {source}: transformers could not read a BLIP config ({type(err).__name__}); "
                          f"give a Hub id (online or in the Hugging Face cache) or a save_pretrained directory"
                          ) from None
    arch = (config.architectures or [None])[0]
    if arch not in ARCHS:
        raise ConfigError(f"{where}: {source} is a transformers {arch}; a teacher is one of {', '.join(ARCHS)}")
    return config


def model_config(source: str, where: str = "distill.teacher.checkpoint") -> Any:
    """The dlip_* model config of the transformers BLIP ``source``: its ``base`` preset with
    every size read from the ``BlipConfig`` (the teacher and the init build the same model)."""
    config = _config(source, where)
    arch = ARCHS[config.architectures[0]]
    v, t = config.vision_config, config.text_config
    exported = getattr(config, EXPORT_KEY, None) or {}
    text = {"width": t.hidden_size, "heads": t.num_attention_heads, "intermediate_size": t.intermediate_size,
            "layers": t.num_hidden_layers, "vocab_size": t.vocab_size,
            "max_position_embeddings": t.max_position_embeddings, "dropout": 0.0}
    cfg: dict[str, Any] = {
        "arch": arch, "model_type": "base", "load_finetuned": False, "load_pretrained": False, "shape": None,
        "tokenizer": _name(source),
        "vision": {"image_size": v.image_size, "patch_size": v.patch_size, "width": v.hidden_size,
                   "depth": v.num_hidden_layers, "heads": v.num_attention_heads,
                   "mlp_ratio": v.intermediate_size / v.hidden_size,
                   "layer_norm_eps": exported.get("vision_layer_norm_eps", HF_VISION_EPS)},
        "text": text,
    }
    if arch == "dlip_retrieval":
        cfg["embed_dim"] = config.image_text_hidden_size
    if arch in ("dlip_caption", "dlip_vqa"):
        cfg["decoder"] = {k: text[k] for k in ("width", "heads", "intermediate_size", "layers", "dropout")}
    if arch == "dlip_caption":
        cfg["prompt"] = CAPTION_PROMPT
    return preset_config(arch, "base", cfg, where)


_CONVERTED: dict[str, dict[str, Any]] = {}  # source -> its checkpoint: the init and the teacher read it once


def checkpoint(source: str, where: str = "distill.teacher.checkpoint") -> dict[str, Any]:
    """``{"model": LAVIS state, "config": {"model": model_config}}`` of the transformers BLIP
    ``source``, converted once per process. What LAVIS has and transformers does not (momentum
    copies, queues, the ITC temperature) is LAVIS's initialisation, the momentum copies equal
    to their models."""
    if source not in _CONVERTED:
        _CONVERTED.clear()  # one teacher at a time in memory
        _CONVERTED[source] = _convert(source, where)
    return _CONVERTED[source]


def forget() -> None:
    """Let go of the converted model (``blip.teacher.forget_weights``)."""
    _CONVERTED.clear()


def _convert(source: str, where: str) -> dict[str, Any]:
    import transformers

    config = _config(source, where)
    cfg = model_config(source, where)
    hf_model = getattr(transformers, config.architectures[0]).from_pretrained(_name(source))
    exported = getattr(config, EXPORT_KEY, None) or {}
    exact = _exact(source) if exported else None
    mapped, unknown = from_hf(hf_model.state_dict(), exported.get("vision_scale", 1.0), exact)
    unknown = [k for k in unknown if not k.endswith("position_ids")]
    model = build_model(cfg, meta=False)
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if not is_training_state(k) and k != "temp" and not k.endswith("position_ids")]
    if unknown or missing or unexpected:
        keys = unknown or unexpected or missing
        raise ConfigError(f"{where}: {source}'s weights do not map onto LAVIS's {cfg.arch}: "
                          f"{len(unknown) + len(unexpected)} without a place, {len(missing)} missing, "
                          f"e.g. '{keys[0]}'")
    _check_tied(model, mapped, source, where)
    if hasattr(model, "copy_params"):
        model.copy_params()
    return {"model": model.state_dict(), "config": {"model": OmegaConf.to_container(cfg)}}


def _exact(source: str) -> Optional[dict]:
    """The exporter's corrections (``hf_keys.EXACT_FILE``) beside its weights, if there."""
    path = _local_file(source, EXACT_FILE)
    return torch.load(path, map_location="cpu", weights_only=True) if path else None


def _local_file(source: str, file: str) -> Optional[str]:
    """``file`` of the model: in its directory, or in the Hugging Face cache; None if absent."""
    name = _name(source)
    if os.path.isdir(name):
        path = os.path.join(name, file)
        return path if os.path.isfile(path) else None
    try:
        from transformers.utils import cached_file

        return cached_file(name, file)
    except Exception:  # noqa: BLE001 (not in the repository, or not cached)
        return None


def _check_tied(model, mapped: dict, source: str, where: str) -> None:
    """LAVIS ties some weights (the decoder's output layer to its word embeddings): the
    transformers model must hold one value in them, or LAVIS cannot compute what it computes."""
    shared: dict[int, list[str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if value.numel():
            shared.setdefault(value.data_ptr(), []).append(key)
    for keys in shared.values():
        given = [k for k in keys if k in mapped]
        if any(not torch.equal(mapped[given[0]], mapped[k]) for k in given[1:]):
            raise ConfigError(f"{where}: LAVIS's {type(model).__name__} ties '{given[0]}' and '{given[1]}'; "
                              f"{source} holds different values in them, which LAVIS cannot represent")


def weights_file(source: str) -> Optional[str]:
    """The local file holding the weights (the directory's, or the Hugging Face cache's)."""
    return next((path for file in WEIGHT_FILES if (path := _local_file(source, file))), None)


def identity(source: str) -> str:
    """``hf:<name>@sha256:<hex>`` of the weights file (the cache key of a teacher read from it)."""
    path = weights_file(source)
    return source if path is None else f"{source}@sha256:{file_sha256(path)}"


def _rounded(values) -> list[float]:
    return [round(float(x), 6) for x in values]


def check_inputs(source: str, image_size: int, mean: list[float], std: list[float], tokenizer: Any,
                 where: str = "distill.teacher.checkpoint") -> None:
    """The student's images and tokens are the teacher's: its processor's image size, mean and
    std, and its tokenizer's vocabulary and BLIP tokens; refused with one line where they differ."""
    from transformers import BlipImageProcessor, BertTokenizer

    name = _name(source)
    try:
        proc = BlipImageProcessor.from_pretrained(name)
    except Exception:  # noqa: BLE001 (a model without a processor: nothing to compare)
        proc = None
    if proc is not None:
        size = proc.size.get("height") if isinstance(proc.size, dict) else proc.size
        theirs = (int(size), _rounded(proc.image_mean), _rounded(proc.image_std))
        ours = (int(image_size), _rounded(mean), _rounded(std))
        if theirs != ours:
            raise ConfigError(f"{where}: {source}'s processor takes images at {theirs[0]} px, mean {theirs[1]}, "
                              f"std {theirs[2]}; the student's data gives {ours[0]} px, mean {ours[1]}, std {ours[2]}: "
                              f"set the datasets' vis_processor to the teacher's")
    try:
        tok = BertTokenizer.from_pretrained(name)
    except Exception:  # noqa: BLE001
        return
    theirs = (len(tok), tok.convert_tokens_to_ids("[DEC]"), tok.convert_tokens_to_ids("[ENC]"), tok.pad_token_id)
    ours = (len(tokenizer), tokenizer.bos_token_id, tokenizer.enc_token_id, tokenizer.pad_token_id)
    if theirs != ours:
        raise ConfigError(f"{where}: {source}'s tokenizer (size, [DEC], [ENC], [PAD] ids {theirs}) is not the "
                          f"student's ({ours}): give the student the teacher's vocabulary (model.tokenizer)")
