"""Loading and early validation of LAVIS run configs.

LAVIS's ``Config`` asserts on unknown names (``Model 'x' has not been
registered``) or fails later with ``AttributeError: 'NoneType' ...``. Here every
name and required key is checked first, and errors name the file and the key.
"""

from __future__ import annotations

import argparse
import difflib
import os
from typing import Iterable, Optional, Sequence

from omegaconf import OmegaConf

from lavis_dlip.errors import ConfigError

__all__ = ["ConfigError", "load_config", "validate"]


def _suggest(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=3)
    return f" Did you mean: {', '.join(close)}?" if close else ""


RUN_REQUIRED_TRAIN = (
    "task", "lr_sched", "init_lr", "min_lr", "max_epoch",
    "batch_size_train", "batch_size_eval", "output_dir",
)
RUN_REQUIRED_EVAL = ("task", "batch_size_eval", "output_dir")
DEVICES = ("cpu", "cuda", "auto")


def validate(raw, cfg_path: str, evaluate: bool = False) -> None:
    """Check sections, registry names and required run keys of a raw yaml."""
    from lavis.common.registry import registry

    where = f"{cfg_path}:"
    for section in ("model", "datasets", "run"):
        if raw.get(section) is None:
            raise ConfigError(f"{where} missing top-level section '{section}'")

    arch = raw.model.get("arch")
    if arch is None:
        raise ConfigError(f"{where} missing key 'model.arch'")
    models = registry.mapping["model_name_mapping"]
    if arch not in models:
        raise ConfigError(
            f"{where} model.arch '{arch}' is not a registered LAVIS model.{_suggest(arch, models)}"
        )
    model_type = raw.model.get("model_type")
    types = models[arch].PRETRAINED_MODEL_CONFIG_DICT
    if model_type not in types:
        raise ConfigError(
            f"{where} model.model_type '{model_type}' is not a type of '{arch}'; "
            f"known: {', '.join(types)}"
        )

    builders = registry.mapping["builder_name_mapping"]
    for name in raw.datasets:
        if name not in builders:
            raise ConfigError(
                f"{where} datasets.{name} is not a registered dataset builder.{_suggest(name, builders)}"
            )

    run = raw.run
    required = RUN_REQUIRED_EVAL if evaluate or run.get("evaluate", False) else RUN_REQUIRED_TRAIN
    missing = [k for k in required if run.get(k) is None]
    if missing:
        raise ConfigError(f"{where} missing key(s) {', '.join('run.' + k for k in missing)}")
    tasks = registry.mapping["task_name_mapping"]
    if run.task not in tasks:
        raise ConfigError(f"{where} run.task '{run.task}' is not a registered task.{_suggest(run.task, tasks)}")
    runner = run.get("runner", "runner_base")
    runners = registry.mapping["runner_name_mapping"]
    if runner not in runners:
        raise ConfigError(f"{where} run.runner '{runner}' is not a registered runner.{_suggest(runner, runners)}")
    scheds = registry.mapping["lr_scheduler_name_mapping"]
    if run.get("lr_sched") is not None and run.lr_sched not in scheds:
        raise ConfigError(
            f"{where} run.lr_sched '{run.lr_sched}' is not a registered scheduler.{_suggest(run.lr_sched, scheds)}"
        )
    task_cls = tasks[run.task]
    if hasattr(task_cls, "validate_config"):  # a task checks its own sections (distill, runner)
        try:
            task_cls.validate_config(raw, base_dir=os.path.dirname(os.path.abspath(cfg_path)))
        except ConfigError as err:
            raise ConfigError(f"{where} {err}") from None
    elif raw.get("distill") is not None:
        raise ConfigError(f"{where} a 'distill' section is given but run.task '{run.task}' does not distill; "
                          f"use a dlip_distill_* task (docs/distillation.md)")
    device = str(run.get("device", "auto"))
    if device not in DEVICES and not device.startswith("cuda:"):
        raise ConfigError(f"{where} run.device '{device}' must be one of {', '.join(DEVICES)}")


def load_config(cfg_path: str, options: Optional[Sequence[str]] = None, evaluate: bool = False):
    """LAVIS ``Config`` for ``cfg_path`` with ``--options``, validated first.

    Relative dataset paths of the plugin's local builders are resolved against the
    yaml's directory (recorded as ``datasets.<name>.base_dir``).
    """
    import lavis_dlip  # noqa: F401  (registers the plugin before LAVIS's Config looks names up)
    from lavis.common.config import Config

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
        OmegaConf.update(raw, key, OmegaConf.from_dotlist([f"v={value}"]).v, merge=True)
    validate(raw, cfg_path, evaluate=evaluate)

    cfg = Config(argparse.Namespace(cfg_path=cfg_path, options=opts))
    base_dir = os.path.dirname(os.path.abspath(cfg_path))
    if raw.get("distill") is not None:  # LAVIS's Config keeps only model, datasets and run
        cfg.config.distill = raw.distill
        if cfg.config.distill.get("base_dir") is None:
            cfg.config.distill.base_dir = base_dir
    for name in cfg.datasets_cfg:
        ds = cfg.datasets_cfg[name]
        if ds.get("base_dir") is None:
            ds.base_dir = base_dir
    return cfg
