"""How a teacher is named, what it is, and its weights read once.

``distill.teacher`` (and ``model.init.teacher`` as a mapping) keys:

* ``arch``, ``model_type``: a registered model (``blip_retrieval``/``coco``,
  ``blip_pretrain``/``base``, ``dlip_retrieval``/``base``, ...);
* ``cfg_path``: instead, take the ``model`` section of a run yaml (a teacher trained
  with this project), relative to the distillation yaml;
* ``overrides``: model-config keys merged on top (e.g. ``{image_size: 224}``);
* ``checkpoint``: weights to load (path or URL); replaces the model type's own; or
  ``hf:<Hub id or directory>``, a transformers BLIP, which is also the teacher's model
  when neither ``arch`` nor ``cfg_path`` is given (``hf_import.py``);
* ``load_weights``: ``False`` builds the teacher with random weights (dry runs, tests).

A run names its teacher's checkpoint twice (``model.init.teacher`` to inherit from it,
``distill.teacher.checkpoint`` to distill from it) and keys its teacher-output cache by
the file's sha256: ``read_weights`` reads the file once per process, hashing it as it
reads, and hands every caller the same object.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Any, Mapping

from omegaconf import OmegaConf

from lavis_dlip import checkpoint
from lavis_dlip.blip import hf_import
from lavis_dlip.blip.build import model_config
from lavis_dlip.errors import ConfigError, check_keys
from lavis_dlip.paths import is_url, local_path

TEACHER_KEYS = ("arch", "model_type", "cfg_path", "overrides", "checkpoint", "load_weights")


def teacher_model_config(cfg: Mapping[str, Any], base_dir: str = ".", where: str = "distill.teacher") -> Any:
    """The teacher's model config (validated, nothing built); ``where`` names the yaml
    section in errors (``distill.teacher`` or ``model.init.teacher``)."""
    check_keys(cfg, TEACHER_KEYS, where)
    if cfg.get("cfg_path"):
        path = cfg["cfg_path"] if os.path.isabs(cfg["cfg_path"]) else os.path.join(base_dir, cfg["cfg_path"])
        if not os.path.isfile(path):
            raise ConfigError(f"{where}.cfg_path: file not found: {path}")
        model_cfg = OmegaConf.load(path).get("model")
        if model_cfg is None:
            raise ConfigError(f"{where}.cfg_path: {path} has no 'model' section")
    elif hf_import.is_hf(cfg.get("checkpoint")) and not cfg.get("arch"):
        model_cfg = hf_import.model_config(cfg["checkpoint"], f"{where}.checkpoint")
    else:
        model_cfg = OmegaConf.create({k: cfg.get(k) for k in ("arch", "model_type")})
    merged = model_config(model_cfg.get("arch"), model_cfg.get("model_type"), where=where)
    merged = OmegaConf.merge(merged, model_cfg, OmegaConf.create(dict(cfg.get("overrides") or {})))
    if cfg.get("checkpoint") or not cfg.get("load_weights", True):
        merged.load_finetuned = False
        merged.load_pretrained = False
    return merged


_READ: dict[tuple, tuple[str, Any]] = {}  # (path, size, mtime) -> (sha256, the checkpoint's object)


def _stat_key(path: str) -> tuple:
    stat = os.stat(path)
    return path, stat.st_size, stat.st_mtime_ns


def read_weights(source: str, key: str) -> Any:
    """The checkpoint ``source`` (path or URL) as ``torch.load`` gives it, read once per
    process: a second caller (the init, then the distillation teacher) gets the same object;
    ``hf:...``: a transformers BLIP in LAVIS's layout, as this project saves checkpoints."""
    if hf_import.is_hf(source):
        return hf_import.checkpoint(str(source), key)
    path = _local(source, key)
    memo = _stat_key(path)
    if memo not in _READ:
        data = open(path, "rb").read()
        _READ.clear()  # one teacher at a time in memory
        _READ[memo] = (hashlib.sha256(data).hexdigest(), checkpoint.load_bytes(io.BytesIO(data), source, key))
    return _READ[memo][1]


def weights_identity(source: str) -> str:
    """``sha256:<hex>`` of a local checkpoint (from the read if there was one), else the URL."""
    if hf_import.is_hf(source):
        return hf_import.identity(str(source))
    if is_url(str(source)):
        return str(source)
    path = local_path(str(source))
    memo = _stat_key(path)
    if memo in _READ:
        return "sha256:" + _READ[memo][0]
    return "sha256:" + checkpoint.file_sha256(path)


def forget_weights() -> None:
    """Let go of the weights read (once every model that needs them has them)."""
    _READ.clear()
    hf_import.forget()


def _local(source: str, key: str) -> str:
    path = local_path(str(source))
    if is_url(path):
        path = checkpoint.download(path, source, key)
    checkpoint.check_exists(path, key)
    return path
