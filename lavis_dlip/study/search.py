"""A budgeted search over student shapes (the ``study.search`` section).

    search:
      budget: {params: 0.25}          # <= 1: a fraction of the teacher's; > 1: absolute;
                                      # also flops, latency_ms (measured on this machine)
      space:                          # model keys -> values, crossed; a section takes
        vision: [{width: 64, heads: 2}, {width: 96, heads: 3}]   # settings that go together
        vision.depth: [1, 2, 3]
        text.width: [64, 128]
        text.layers: [1, 2]
      top: 3                          # shapes ranked by short distillation runs
      latency_candidates: 8           # frontier shapes whose latency is measured
      options: [run.max_epoch=1]      # the short runs' schedule

1. Every combination of the space is a candidate; one the model builder refuses, or
   that the base's ``model.init`` cannot fill from the teacher (wider, more heads, larger
   heads or deeper than the teacher's module), is dropped with its reason.
2. Parameters (what inference uses) and FLOPs (one image and one text) of each are
   computed exactly on the meta device, no weights: ``lavis_dlip.report``'s counters
   (FLOPs only for shapes within the parameter budget).
3. The feasible ones (within the parameter and FLOP budgets) are cut to their frontier:
   a shape is dropped if another feasible shape is at least as large in every searched
   key (it has more capacity and still fits).
4. With a latency budget, the ``latency_candidates`` frontier shapes with the most
   parameters are timed (random weights, side by side with the teacher); over it, dropped.
5. The ``top`` remaining shapes with the most parameters (the frontier first, then the
   largest of the others if it has fewer) become arms ``search_1``... of the study,
   trained with ``options`` from the shared cache; the best by mean score is the winner:
   ``winner.yaml`` (the base run yaml with its shape) is ready to train, and the study
   trains it with the base's schedule as ``search_winner``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import OmegaConf

from lavis_dlip.errors import ConfigError, check_keys
from lavis_dlip.blip.build import build_model, run_model_config
from lavis_dlip.blip.layout import module_layout
from lavis_dlip.datasets.builders import LocalBuilder
from lavis_dlip.models.init import FROM_TEACHER, parse_init
from lavis_dlip.report import Workloads, count_params, measure_models
from lavis_dlip.study.spec import flow

SEARCH_KEYS = ("budget", "space", "top", "latency_candidates", "options")
BUDGETS = ("params", "flops", "latency_ms")
MODULE_KEYS = {"vision": "vision", "text": "text", "decoder": "decoder"}  # space key prefix -> model section


@dataclass
class Candidate:
    shape: dict[str, Any]
    params: int = 0
    flops: int = 0
    latency_ms: Optional[float] = None
    dropped: str = ""  # why it is not a candidate any more ("" while it is)
    arm: str = ""  # the study arm that trains it
    meta: dict = field(default_factory=dict)

    def options(self) -> list[str]:
        return [f"model.{k}={flow(v)}" for k, v in self.shape.items()]


def parse(cfg: dict[str, Any]) -> dict[str, Any]:
    check_keys(cfg, SEARCH_KEYS, "study.search")
    budget = dict(cfg.get("budget") or {})
    check_keys(budget, BUDGETS, "study.search.budget")
    if not budget:
        raise ConfigError("study.search.budget: give params, flops and/or latency_ms (<= 1: a fraction of the "
                          "teacher's; > 1: absolute)")
    for key, value in budget.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"study.search.budget.{key} must be a number > 0, got {value!r}")
    space = dict(cfg.get("space") or {})
    if not space:
        raise ConfigError("study.search.space: give model keys -> lists of values, e.g. {vision.width: [32, 64]}")
    for key, values in space.items():
        if key.split(".")[0] not in MODULE_KEYS or not isinstance(values, list) or not values:
            raise ConfigError(f"study.search.space.{key}: a vision, text or decoder key (or section) with a list "
                              f"of values")
    top = cfg.get("top", 3)
    lat = cfg.get("latency_candidates", 8)
    for key, value in (("top", top), ("latency_candidates", lat)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"study.search.{key} must be an integer >= 1, got {value!r}")
    return {"budget": budget, "space": space, "top": top, "latency_candidates": lat,
            "options": [str(o) for o in cfg.get("options") or []]}


def _merged_model(base_raw) -> Any:
    return run_model_config(base_raw.model, "study.base: model")


def _teacher_limits(teacher_cfg, init) -> dict[str, tuple[int, int, int, int]]:
    """Per module filled from the teacher: (width, heads, head size, layers) of the teacher's."""

    if not init:
        return {}
    specs = parse_init(init)
    teacher = build_model(teacher_cfg, meta=True)
    limits = {}
    for module in ("vision", "text", "fusion", "decoder"):
        if module in specs and specs[module][1] in FROM_TEACHER:
            lay = module_layout(teacher, module)
            if lay is not None:
                limits[module] = (lay.width, lay.heads, lay.head_dim, len(lay.layer_ids))
    return limits


def _fits(student, limits) -> str:
    for module, (width, heads, head_dim, layers) in limits.items():
        lay = module_layout(student, module)
        if lay is None:
            continue
        if lay.width > width or lay.heads > heads or lay.head_dim > head_dim or len(lay.layer_ids) > layers:
            return (f"model.init.{module} from the teacher needs at most its width {width}, {heads} heads of "
                    f"{head_dim} and {layers} layers; this shape has {lay.width}, {lay.heads} of {lay.head_dim}, "
                    f"{len(lay.layer_ids)}")
    return ""


def _flops(model, text_len: int) -> int:
    import torch

    size = int(model.visual_encoder.patch_embed.img_size[0])
    with torch.inference_mode():
        return Workloads(model, size, text_len, 16, 1, "meta").module_flops()["total"]


def _limit(budget: dict, key: str, teacher_value: float) -> Optional[float]:
    value = budget.get(key)
    if value is None:
        return None
    return value * teacher_value if value <= 1 else float(value)


def search(cfg: dict[str, Any], base_raw, teacher_cfg, text_len: int = 32, repeats: int = 3
           ) -> tuple[list[Candidate], dict[str, Any]]:
    """Every candidate with its costs and why it was dropped; the teacher's costs and the limits.
    The chosen ones (``dropped == ""``) are the ``top`` largest that fit, largest first."""

    model_cfg = _merged_model(base_raw)
    teacher = build_model(teacher_cfg, meta=True)
    t_params, t_flops = count_params(teacher)["total"], _flops(teacher, text_len)
    limits = _teacher_limits(teacher_cfg, model_cfg.get("init"))
    budget = cfg["budget"]
    max_params, max_flops = _limit(budget, "params", t_params), _limit(budget, "flops", t_flops)
    space = cfg["space"]
    candidates = []
    for values in itertools.product(*space.values()):
        cand = Candidate(dict(zip(space, values)))
        candidates.append(cand)
        shaped = OmegaConf.merge(model_cfg, OmegaConf.from_dotlist(cand.options()).model)
        try:
            student = build_model(shaped, meta=True)
        except ConfigError as err:
            cand.dropped = f"not buildable: {err}"
            continue
        cand.params = count_params(student)["total"]
        cand.dropped = _fits(student, limits)
        if not cand.dropped and max_params is not None and cand.params > max_params:
            cand.dropped = f"{cand.params / 1e6:.2f}M parameters, over the budget's {max_params / 1e6:.2f}M"
        if cand.dropped:
            continue
        cand.flops = _flops(student, text_len)
        if max_flops is not None and cand.flops > max_flops:
            cand.dropped = f"{cand.flops / 1e9:.3f} GFLOPs, over the budget's {max_flops / 1e9:.3f}"
    feasible = [c for c in candidates if not c.dropped]
    for c in feasible:
        bigger = [o for o in feasible if o is not c and all(_at_least(o.shape[k], c.shape[k]) for k in space)
                  and any(o.shape[k] != c.shape[k] for k in space)]
        if bigger:
            c.dropped = f"inside the frontier: {_describe(bigger[0].shape)} is as large or larger and fits"
    frontier = sorted((c for c in feasible if not c.dropped), key=lambda c: (-c.params, -c.flops))
    info = {"teacher": {"params": t_params, "flops": t_flops}, "limits": {"params": max_params, "flops": max_flops}}
    if "latency_ms" in budget:
        timed = frontier[:cfg["latency_candidates"]]
        for c in frontier[cfg["latency_candidates"]:]:
            c.dropped = "not timed (latency_candidates)"
        t_ms = _latency(teacher_cfg, [OmegaConf.merge(model_cfg, OmegaConf.from_dotlist(c.options()).model)
                                      for c in timed], timed, text_len, repeats)
        info["teacher"]["latency_ms"] = t_ms
        info["limits"]["latency_ms"] = _limit(budget, "latency_ms", t_ms)
        for c in timed:
            if c.latency_ms > info["limits"]["latency_ms"]:
                c.dropped = f"{c.latency_ms:.1f} ms, over the budget's {info['limits']['latency_ms']:.1f}"
        frontier = [c for c in timed if not c.dropped]
    # the frontier's largest first; fewer than ``top`` on it: the largest others that fit as well
    inside = sorted((c for c in feasible if c.dropped.startswith("inside the frontier")),
                    key=lambda c: (-c.params, -c.flops))
    for i, c in enumerate(frontier + inside[:max(0, cfg["top"] - len(frontier))]):
        if i < cfg["top"]:
            c.arm, c.dropped = f"search_{i + 1}", ""
        else:
            c.dropped = f"not among the top {cfg['top']} by parameters"
    return candidates, info


def _at_least(a: Any, b: Any) -> bool:
    """``a`` is as large as ``b``: numbers, or sections (``vision: {width: 96, heads: 3}``) key by key."""
    if isinstance(a, dict) and isinstance(b, dict):
        return all(_at_least(a.get(k), b.get(k)) for k in set(a) | set(b))
    return a is not None and b is not None and a >= b


def _latency(teacher_cfg, student_cfgs, candidates, text_len: int, repeats: int) -> float:
    """The candidates' and the teacher's inference latency (every workload summed), side by side."""
    import torch

    torch.manual_seed(0)
    models = {"teacher": build_model(teacher_cfg, meta=False).eval()}
    models.update({f"c{i}": build_model(cfg, meta=False).eval() for i, cfg in enumerate(student_cfgs)})
    costs = {c.name: sum(c.latency_ms.values()) for c in
             measure_models(models, None, text_len, 16, 8, "cpu", warmup=1, repeats=repeats)}
    for i, cand in enumerate(candidates):
        cand.latency_ms = costs[f"c{i}"]
    return costs["teacher"]


def _describe(shape: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in shape.items())


def winner_yaml(base_raw, base_dir: str, shape: dict[str, Any], path) -> None:
    """The base run yaml (the study's options applied) with the winner's shape, its
    ``model.init`` map kept, its relative paths still read from ``base_dir``: ready to train."""

    raw = OmegaConf.merge(base_raw, OmegaConf.from_dotlist([f"model.{k}={flow(v)}" for k, v in shape.items()]))
    if raw.get("distill") is not None and raw.distill.get("base_dir") is None:
        raw.distill.base_dir = base_dir
    from lavis.common.registry import registry

    for name, ds in (raw.get("datasets") or {}).items():
        builder = registry.get_builder_class(name)
        if builder is not None and issubclass(builder, LocalBuilder) and ds.get("base_dir") is None:
            ds.base_dir = base_dir
    header = ("# The study's shape-search winner: the base run yaml with this shape.\n"
              f"#   python -m lavis_dlip.train --cfg-path {path}\n")
    path.write_text(header + OmegaConf.to_yaml(raw))
