"""A study yaml: one base distillation run, its teacher, seeds, and the arms to compare.

    study:
      title: what it asks                   # optional
      base: ../demo/distill_retrieval.yaml  # the distillation run yaml every arm starts from
      teacher: {train: ../demo/teacher_retrieval.yaml}   # or {checkpoint: PATH}
      seeds: [42, 43, 44]
      options: [run.max_epoch=4]            # --options for every run
      references: [teacher, no_teacher, init_only, base]   # the default; [] for none
      arms:                                 # named override sets, --options syntax
        vision_random: [model.init.vision.strategy=random]
      axes:                                 # key -> values, crossed: one arm per combination
        model.text.layers: [1, 2]
      cache: {augmentations: 1}             # the shared teacher-output cache (distill.cache's keys)
      search: {...}                         # a budgeted shape search (study/search.py)
      output_dir: output/study/retrieval
      parallel: 2

Reference arms (every other arm is reported against them): ``teacher`` (evaluated
once), ``no_teacher`` (the same student from random weights, only its own losses),
``init_only`` (the base's ``model.init``, only the student's own losses) and ``base``
(the base recipe as it is). The student's own losses are the base's teacher-free
terms (``itc``, ``itm``, ``lm``, ``task``: ``distill.losses.teacher_free_terms``).
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf

from lavis_dlip.errors import ConfigError, check_keys
from lavis_dlip.distill.cache.config import CACHE_KEYS
from lavis_dlip.distill.losses import teacher_free_terms

STUDY_KEYS = ("title", "base", "teacher", "seeds", "options", "references", "arms", "axes", "cache", "search",
              "output_dir", "parallel")
REFERENCES = ("teacher", "no_teacher", "init_only", "base")
TEACHER_KEYS = ("checkpoint", "train", "options")
SAFE = re.compile(r"[^A-Za-z0-9_.,=+-]")


@dataclass(frozen=True)
class Arm:
    """One recipe: ``options`` over the base; ``group``: reference, arm, axis or search;
    ``axis``: the value of each axis key, for axis arms."""
    name: str
    options: tuple[str, ...]
    group: str
    axis: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass
class StudySpec:
    path: Path
    title: str
    base: Path
    teacher: dict[str, Any]
    seeds: list[int]
    options: list[str]
    references: list[str]
    arms: list[Arm]
    cache: dict[str, Any]
    search: Optional[dict[str, Any]]
    output_dir: Path
    parallel: int

    def base_raw(self, options: Sequence[str] = ()):
        """The base yaml with ``options`` applied as ``--options`` applies them (no LAVIS merge)."""
        return apply_options(OmegaConf.load(self.base), [*self.options, *options])


def apply_options(raw, options: Sequence[str]):
    for opt in options:
        key, _, value = opt.partition("=")
        OmegaConf.update(raw, key, OmegaConf.from_dotlist([f"v={value}"]).v, merge=True)
    return raw


def flow(value: Any) -> str:
    """A value as an ``--options`` right-hand side (JSON is yaml)."""
    return value if isinstance(value, str) else json.dumps(value)


def arm_name(text: str) -> str:
    """A name that is also a directory name."""
    return SAFE.sub("_", text)


def expand_axes(axes: Any, where: str = "study.axes") -> list[Arm]:
    """Every combination of the axes' values, one arm each: ``text.layers=1,vision.depth=2``."""
    if not axes:
        return []
    if not OmegaConf.is_dict(axes) and not isinstance(axes, dict):
        raise ConfigError(f"{where}: give a mapping of key -> list of values, e.g. {{model.text.layers: [1, 2]}}")
    keys = list(axes)
    values = []
    for key in keys:
        vals = axes[key]
        vals = OmegaConf.to_container(vals) if OmegaConf.is_list(vals) else vals
        if not isinstance(vals, list) or not vals:
            raise ConfigError(f"{where}.{key}: give a non-empty list of values, got {vals!r}")
        values.append(vals)
    arms = []
    for combo in itertools.product(*values):
        axis = dict(zip(keys, combo))
        name = ",".join(f"{k.removeprefix('model.')}={flow(v)}" for k, v in axis.items())
        arms.append(Arm(arm_name(name), tuple(f"{k}={flow(v)}" for k, v in axis.items()), "axis", axis))
    return arms


def reference_arms(names: Sequence[str], base_terms: Sequence[Any]) -> list[Arm]:
    """The reference arms asked for; init_only and no_teacher train the base's own losses."""
    if {"init_only", "no_teacher"} & set(names):
        own = f"distill.terms={json.dumps(teacher_free_terms(base_terms))}"
        make = {"init_only": (own, "distill.balance=none"),
                "no_teacher": (own, "distill.balance=none", "model.init=null")}
    else:
        make = {}
    make["base"] = ()
    return [Arm(n, make[n], "reference") for n in names if n != "teacher"]


def load_study(path: str, overrides: Sequence[str] = ()) -> StudySpec:
    """The study yaml at ``path`` (``overrides``: ``study.key=value`` dotlist), validated."""
    if not os.path.isfile(path):
        raise ConfigError(f"study file not found: {path}")
    raw = OmegaConf.load(path)
    for opt in overrides:
        key, _, value = opt.partition("=")
        OmegaConf.update(raw, key, OmegaConf.from_dotlist([f"v={value}"]).v, merge=True)
    try:
        return _parse(raw, Path(path))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def _parse(raw, path: Path) -> StudySpec:
    if raw.get("study") is None:
        raise ConfigError("missing top-level section 'study'")
    s = raw.study
    check_keys(s, STUDY_KEYS, "study")
    here = path.resolve().parent
    if not s.get("base"):
        raise ConfigError("missing key 'study.base' (the distillation run yaml the arms start from)")
    base = (here / str(s.base)).resolve()
    if not base.is_file():
        raise ConfigError(f"study.base: file not found: {base}")
    base_raw = OmegaConf.load(base)
    if base_raw.get("distill") is None:
        raise ConfigError(f"study.base: {base} has no distill section; give a distillation run yaml")
    teacher = dict(s.get("teacher") or {})
    check_keys(teacher, TEACHER_KEYS, "study.teacher")
    if bool(teacher.get("checkpoint")) == bool(teacher.get("train")):
        raise ConfigError("study.teacher: give one of checkpoint (a trained teacher's .pth) or train "
                          "(a teacher run yaml, trained once and kept)")
    for key in ("checkpoint", "train"):
        if teacher.get(key):
            teacher[key] = str((here / str(teacher[key])).resolve())
            if not os.path.isfile(teacher[key]):
                raise ConfigError(f"study.teacher.{key}: file not found: {teacher[key]}")
    teacher["options"] = [str(o) for o in teacher.get("options") or []]
    seeds = list(s.get("seeds") or [])
    if not seeds or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ConfigError(f"study.seeds: give distinct integers >= 0, e.g. [42, 43, 44]; got {seeds!r}")
    options = [str(o) for o in s.get("options") or []]
    for o in options:
        if "=" not in o:
            raise ConfigError(f"study.options: '{o}' is not key=value")
    refs = list(REFERENCES if s.get("references") is None else s.references)
    unknown = [r for r in refs if r not in REFERENCES]
    if unknown:
        raise ConfigError(f"study.references: {unknown} unknown; choose from {', '.join(REFERENCES)}")
    arms = reference_arms(refs, (base_raw.distill.get("terms") or []))
    for name, opts in (s.get("arms") or {}).items():
        opts = [opts] if isinstance(opts, str) else list(opts)
        if not all(isinstance(o, str) and "=" in o for o in opts):
            raise ConfigError(f"study.arms.{name}: give a list of key=value options")
        if arm_name(str(name)) != str(name):
            raise ConfigError(f"study.arms.{name}: an arm's name is a directory name: letters, digits, _.,=+-")
        arms.append(Arm(str(name), tuple(opts), "arm"))
    arms += expand_axes(s.get("axes"))
    names = [a.name for a in arms] + (["teacher"] if "teacher" in refs else [])
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"study: arm names must be unique; twice: {', '.join(twice)}")
    parallel = s.get("parallel", 1)
    if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
        raise ConfigError(f"study.parallel must be an integer >= 1, got {parallel!r}")
    cache = dict(s.get("cache") or {})

    check_keys(cache, [k for k in CACHE_KEYS if k != "dir"], "study.cache")
    out = Path(os.path.expanduser(str(s.get("output_dir") or f"output/study/{path.stem}")))
    return StudySpec(path=path, title=str(s.get("title") or path.stem), base=base, teacher=teacher, seeds=seeds,
                     options=options, references=refs, arms=arms, cache=cache,
                     search=None if s.get("search") is None else OmegaConf.to_container(s.search),
                     output_dir=out if out.is_absolute() else Path.cwd() / out, parallel=parallel)
