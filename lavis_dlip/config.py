"""Loading and early validation of LAVIS run configs.

LAVIS's ``Config`` asserts on unknown names (``Model 'x' has not been
registered``) or fails later with ``AttributeError: 'NoneType' ...``. Here every
name and required key is checked first, and errors name the file and the key.
"""

from __future__ import annotations

import argparse
import difflib
import os
import tempfile
from typing import Iterable, Optional, Sequence

from omegaconf import OmegaConf

from lavis_dlip import checkpoint, run_yaml, schema
from lavis_dlip.errors import ConfigError
from lavis_dlip.blip.tokenizer import TokenizerNotFoundError, init_blip_tokenizer, is_local
from lavis_dlip.datasets.builders import PLUGIN_BUILDERS
from lavis_dlip.blip.hf_import import is_hf
from lavis_dlip.blip.teacher import teacher_model_config
from lavis_dlip.models import sources
from lavis_dlip.models.init import parse_init

__all__ = ["ConfigError", "load_config", "validate", "validate_merged"]


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
    """Check sections, registry names, run keys and values of a raw yaml."""
    try:
        _check_names(raw, cfg_path, evaluate)
    except ConfigError as err:
        raise ConfigError(f"{cfg_path}: {err}") from None


def _check_names(raw, cfg_path: str, evaluate: bool) -> None:
    from lavis.common.registry import registry

    for section in ("model", "datasets", "run"):
        if raw.get(section) is None:
            raise ConfigError(f"missing top-level section '{section}'")
    for key in raw:
        if key not in schema.TOP_LEVEL:
            raise ConfigError(f"unknown top-level section '{key}'.{_suggest(str(key), schema.TOP_LEVEL)} "
                              f"A run yaml has {', '.join(schema.TOP_LEVEL)}; optimiser settings go under run")

    arch = raw.model.get("arch")
    if arch is None:
        raise ConfigError("missing key 'model.arch'")
    models = registry.mapping["model_name_mapping"]
    if arch not in models:
        raise ConfigError(f"model.arch '{arch}' is not a registered LAVIS model.{_suggest(arch, models)}")
    model_type = raw.model.get("model_type")
    types = models[arch].PRETRAINED_MODEL_CONFIG_DICT
    if model_type not in types:
        raise ConfigError(f"model.model_type '{model_type}' is not a type of '{arch}'; known: {', '.join(types)}")

    builders = registry.mapping["builder_name_mapping"]
    for name in raw.datasets:
        if name not in builders:
            raise ConfigError(f"datasets.{name} is not a registered dataset builder.{_suggest(name, builders)}")

    run = raw.run
    schema.check_run(run)
    required = RUN_REQUIRED_EVAL if evaluate or run.get("evaluate", False) else RUN_REQUIRED_TRAIN
    missing = [k for k in required if run.get(k) is None]
    if missing:
        raise ConfigError(f"missing key(s) {', '.join('run.' + k for k in missing)}")
    tasks = registry.mapping["task_name_mapping"]
    if run.task not in tasks:
        raise ConfigError(f"run.task '{run.task}' is not a registered task.{_suggest(run.task, tasks)}")
    runner = run.get("runner", "runner_base")
    runners = registry.mapping["runner_name_mapping"]
    if runner not in runners:
        raise ConfigError(f"run.runner '{runner}' is not a registered runner.{_suggest(runner, runners)}")
    scheds = registry.mapping["lr_scheduler_name_mapping"]
    if run.get("lr_sched") is not None and run.lr_sched not in scheds:
        raise ConfigError(f"run.lr_sched '{run.lr_sched}' is not a registered scheduler."
                          f"{_suggest(run.lr_sched, scheds)}")
    task_cls = tasks[run.task]
    if hasattr(task_cls, "validate_config"):  # a task checks its own sections (distill, runner)
        task_cls.validate_config(raw, base_dir=os.path.dirname(os.path.abspath(cfg_path)))
    elif raw.get("distill") is not None:
        raise ConfigError(f"a 'distill' section is given but run.task '{run.task}' does not distill; "
                          f"use a dlip_distill_* task (docs/distillation.md)")
    device = str(run.get("device", "auto"))
    if device not in DEVICES and not device.startswith("cuda:"):
        raise ConfigError(f"run.device '{device}' must be one of {', '.join(DEVICES)}")


def validate_merged(cfg, cfg_path: str, evaluate: bool = False) -> None:
    """What needs LAVIS's merged config (model presets, builder defaults): dataset
    and model keys, and every file the run will read, checked before any is read."""
    try:
        _check_datasets(cfg)
        _check_model(cfg, evaluate or bool(cfg.run_cfg.get("evaluate", False)))
    except ConfigError as err:
        raise ConfigError(f"{cfg_path}: {err}") from None


def _check_datasets(cfg) -> None:
    from lavis.common.registry import registry

    processors = registry.mapping["processor_name_mapping"]
    for name, ds in cfg.datasets_cfg.items():
        builder = registry.get_builder_class(name)
        default = OmegaConf.load(builder.default_config_path(type=ds.get("type", "default")))
        schema.check_dataset(name, ds, issubclass(builder, PLUGIN_BUILDERS),
                             list(default.datasets.get(name) or {}), processors)


def _check_model(cfg, evaluate: bool) -> None:
    from lavis.common.registry import registry

    model_cfg = cfg.model_cfg
    model_cls = registry.get_model_class(model_cfg.arch)
    if hasattr(model_cls, "check_config"):
        model_cls.check_config(model_cfg)
    files = []  # (path, key): every checkpoint the run will read
    finetuned = model_cfg.get("load_finetuned", False) and model_cfg.get("finetuned")
    if finetuned:
        files.append((model_cfg.finetuned, "model.finetuned"))
    elif model_cfg.get("load_pretrained", False) and model_cfg.get("pretrained"):
        files.append((model_cfg.pretrained, "model.pretrained"))
    init = model_cfg.get("init")
    if init and not finetuned:  # a finetuned checkpoint replaces every weight: no init runs
        files += _init_files(init)
    tokenizers = [(model_cfg.get("tokenizer"), "model.tokenizer")]
    distill = cfg.config.get("distill")
    if distill is not None and not evaluate:  # evaluation builds no teacher

        teacher = distill.teacher
        if teacher.get("checkpoint") and teacher.get("load_weights", True):
            files.append((teacher.checkpoint, "distill.teacher.checkpoint"))
        tokenizer = teacher_model_config(teacher, distill.get("base_dir") or ".").get("tokenizer")
        tokenizers.append((tokenizer, "distill.teacher's model.tokenizer"))
    resume = cfg.run_cfg.get("resume_ckpt_path")
    if resume and not evaluate:
        files.append((resume, "run.resume_ckpt_path"))
    for path, key in files:
        if not is_hf(path):  # a transformers BLIP: read (and checked) when the teacher is built
            checkpoint.check_exists(str(path), key)
    for source, key in tokenizers:
        if source:
            _check_tokenizer(str(source), key)


def _init_files(init) -> list[tuple[str, str]]:
    """Checkpoints ``model.init`` reads (its teacher's); its pretrained sources, a
    timm/DeiT file or URL or a Hugging Face BERT directory, are checked here."""
    files = []
    teacher = init.get("teacher")
    if isinstance(teacher, str):
        files.append((teacher, "model.init.teacher"))
    elif teacher is not None and teacher.get("checkpoint") and teacher.get("load_weights", True):
        files.append((teacher.checkpoint, "model.init.teacher.checkpoint"))
    for module, (spec, strategy, _) in parse_init(init).items():
        source = str(spec.get("source") or "")
        named = source.startswith((sources.TIMM, sources.HF))  # resolved by timm or transformers
        if strategy == "pretrained" and source and not named and not checkpoint.is_url(source) \
                and not os.path.exists(checkpoint.local_path(source)):
            raise ConfigError(f"model.init.{module}.source: {source}: no such file or directory")
    return files


def _check_tokenizer(source: str, key: str) -> None:
    """A local tokenizer (path or ``pkg://``) is loaded now, cached for the model: a
    wrong path should not wait until every image has been checked. A hub name is
    fetched when the model is built (offline runs need a local one)."""

    if not is_local(source):
        return
    try:
        init_blip_tokenizer(source)
    except TokenizerNotFoundError as err:
        raise ConfigError(f"{key}: {err}") from None


def check_output_dir(run, cfg_path: str) -> None:
    """``run.output_dir`` (or a resumed run's checkpoint directory) must be, or be
    creatable as, a writable directory: found now, not after the model is built."""
    resume = run.get("resume_ckpt_path")
    key, path = ("run.resume_ckpt_path", os.path.dirname(os.path.abspath(str(resume)))) \
        if resume and os.path.isfile(str(resume)) and not run.get("evaluate", False) \
        else ("run.output_dir", os.path.abspath(os.path.expanduser(str(run.output_dir))))
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        where = f"{probe} is a file" if probe == path else f"{probe}, a file, is on its path"
        raise ConfigError(f"{cfg_path}: {key}: {where}, not a directory; point run.output_dir at a directory")
    try:  # an unnamed file: a real write, leaving no trace (read-only file systems refuse it)
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise ConfigError(f"{cfg_path}: {key}: cannot write in {probe} ({err.strerror}); "
                          f"point run.output_dir at a writable directory") from None


def load_config(cfg_path: str, options: Optional[Sequence[str]] = None, evaluate: bool = False):
    """LAVIS ``Config`` for ``cfg_path`` with ``--options``, validated first.

    Relative dataset paths of the plugin's local builders are resolved against the
    yaml's directory (recorded as ``datasets.<name>.base_dir``).
    """
    import lavis_dlip  # noqa: F401  (registers the plugin before LAVIS's Config looks names up)
    from lavis.common.config import Config

    raw = run_yaml.read(cfg_path, options)
    opts = list(options or [])
    if evaluate and raw.get("run") is not None:  # evaluation builds no teacher and reads no cache
        raw.run.evaluate = True
    validate(raw, cfg_path, evaluate=evaluate)
    check_output_dir(raw.run, cfg_path)

    cfg = Config(argparse.Namespace(cfg_path=cfg_path, options=opts))
    base_dir = os.path.dirname(os.path.abspath(cfg_path))
    run_yaml.attach_distill(cfg, raw, cfg_path)  # LAVIS's Config keeps only model, datasets and run
    from lavis.common.registry import registry

    for name in cfg.datasets_cfg:
        ds = cfg.datasets_cfg[name]
        if ds.get("base_dir") is None and issubclass(registry.get_builder_class(name), PLUGIN_BUILDERS):
            ds.base_dir = base_dir
    validate_merged(cfg, cfg_path, evaluate=evaluate)
    return cfg
