"""A run yaml as the plugin reads it: the file, its ``--options`` and the renamed keys
(``renamed.py``), with errors that name the file and the option; and the ``distill``
section, which LAVIS's ``Config`` does not keep (it keeps model, datasets and run).

``config.load_config`` reads every run this way; the distillation tasks read the
``distill`` section this way when LAVIS's own ``train.py`` built the config.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf

from lavis_dlip.checkpoint import first_line
from lavis_dlip.errors import ConfigError
from lavis_dlip.renamed import upgrade


def read(cfg_path: str, options: Optional[Sequence[str]] = None):
    """The yaml at ``cfg_path`` with ``options`` (``key=value``, values parsed as yaml) applied."""
    if os.path.isdir(cfg_path):
        raise ConfigError(f"--cfg-path {cfg_path} is a directory; give a run yaml file in it "
                          f"(e.g. {os.path.join(cfg_path, 'train.yaml')})")
    if not os.path.isfile(cfg_path):
        raise ConfigError(f"config file not found: {cfg_path}")
    try:
        raw = OmegaConf.load(cfg_path)
    except Exception as err:  # yaml.YAMLError and friends
        raise ConfigError(f"{cfg_path}: not valid yaml: {err}") from err
    opts = list(options or [])
    for opt in opts:
        if "=" not in opt:
            raise ConfigError(f"--options expects key=value pairs, got '{opt}'")
    for opt in opts:  # update() also reaches list items: distill.terms.0.weight=2
        key, value = opt.split("=", 1)
        try:
            parsed = OmegaConf.from_dotlist([f"v={value}"]).v
        except Exception as err:  # yaml's ScannerError and friends: name the option
            why = getattr(err, "problem", None) or first_line(err)
            raise ConfigError(f"{cfg_path}: --options {opt}: the value is not valid yaml ({why}); quote a string "
                              f"that holds ':', '{{' or '[', e.g. {key}='{value}'") from None
        OmegaConf.update(raw, key, parsed, merge=True)
    try:
        return upgrade(raw)  # old key names, each with a deprecation line
    except ConfigError as err:
        raise ConfigError(f"{cfg_path}: {err}") from None


def attach_distill(cfg: Any, raw: Any, cfg_path: str) -> None:
    """Put ``raw``'s ``distill`` section into LAVIS's ``cfg``, its relative paths resolved
    against the yaml's directory (``distill.base_dir``)."""
    if raw.get("distill") is None:
        return
    cfg.config.distill = raw.distill
    if cfg.config.distill.get("base_dir") is None:
        cfg.config.distill.base_dir = os.path.dirname(os.path.abspath(cfg_path))


def ensure_distill(cfg: Any) -> None:
    """A config LAVIS's ``Config`` built from a file (its ``train.py``) has no ``distill``
    section, or only the part ``--options`` gave: read it from the file and the options."""
    distill = cfg.config.get("distill")
    args = getattr(cfg, "args", None)
    if (distill is not None and distill.get("terms") is not None) or getattr(args, "cfg_path", None) is None:
        return
    attach_distill(cfg, read(args.cfg_path, getattr(args, "options", None)), args.cfg_path)
