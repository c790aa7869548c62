"""Running a study: one teacher, one teacher-output cache, every arm x seed as an
ordinary training run, then the statistics (``study/write.py``).

* The teacher is trained once (``study.teacher.train``, kept as the demo keeps its
  teachers: a study on the demo's data reuses the demo's) or given (``checkpoint``),
  and evaluated once, with per-item scores, as its students are.
* The cache holds the union of the fields every arm's terms read (each arm's student
  and terms are built to know them) and is built once; arms whose terms need no
  teacher read none.
* Each run has its own directory ``runs/<arm>/seed<seed>-<key>``, ``key`` a hash of its
  run yaml with its options applied: a finished run is never run again, so a killed
  study, run again, runs only what is missing; a changed recipe gets a new directory.
* Runs go ``parallel`` at a time (``lavis_dlip.stages``), threads split between them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from lavis.datasets.data_utils import apply_to_sample
from omegaconf import OmegaConf

from lavis_dlip.errors import ConfigError
from lavis_dlip.stages import Progress, Stage, run_stages, stage_threads
from lavis_dlip.study.records import finished, record
from lavis_dlip.study.spec import Arm, StudySpec, apply_options
from lavis_dlip.blip.tokenizer import tokenizer_source
from lavis_dlip.cache_teacher import build_cache
from lavis_dlip.cli import build_runner, run
from lavis_dlip.config import load_config
from lavis_dlip.distill.cache import BUILDING, Spec, read_manifest
from lavis_dlip.distill.distiller import ATTRIBUTE
from lavis_dlip.distill.losses import TERMS, teacher_free_terms
from lavis_dlip.blip.teacher import teacher_model_config
from lavis_dlip.study import search as shape_search
from lavis_dlip.study.write import headline, write
from lavis_dlip.kept import drop_earlier_runs, kept_dir, train_or_reuse

GROUP = "study"
DISTILL_TASKS = {"retrieval": "dlip_distill_retrieval", "dlip_captioning": "dlip_distill_captioning",
                 "captioning": "dlip_distill_captioning", "vqa": "dlip_distill_vqa",
                 "image_text_pretrain": "dlip_distill_pretrain"}
CACHED_STEP = 1.15  # a step from the teacher-output cache against the student's alone (docs/benchmarks/distill_cost.md)

logger = logging.getLogger(__name__)


@dataclass
class RunPlan:
    arm: Arm
    seed: int
    options: list[str]
    key: str
    out: Path
    cached: bool  # reads the shared teacher-output cache
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def stage(self) -> str:
        return f"{self.arm.name} seed {self.seed}"


# ----------------------------------------------------------------------------- the teacher
def teacher_data(train_yaml: str) -> Path:
    """What the teacher's key names as its data: its first dataset's base_dir (the demo's
    data directory for the demo's teachers, so that a study reuses the demo's teacher)."""
    raw = OmegaConf.load(train_yaml)
    for ds in (raw.get("datasets") or {}).values():
        if ds.get("base_dir"):
            return Path(str(ds.base_dir))
    return Path(train_yaml).parent


def teacher_checkpoint(spec: StudySpec) -> Path:
    if spec.teacher.get("checkpoint"):
        return Path(spec.teacher["checkpoint"])
    train = Path(spec.teacher["train"])
    return kept_dir(train, teacher_data(str(train)), spec.teacher["options"]) / "checkpoint.pth"


def _train_teacher(train_yaml: str, out: str, options: list[str]) -> dict:
    result = train_or_reuse(Path(train_yaml), teacher_data(train_yaml), Path(out), options)
    return {**result, "checkpoint": str(result["checkpoint"])}


def teacher_yaml(spec: StudySpec) -> str:
    """The teacher's run yaml: ``train``, else the one the base's ``distill.teacher.cfg_path`` names."""
    if spec.teacher.get("train"):
        return spec.teacher["train"]
    teacher = spec.base_raw().distill.teacher
    if not teacher.get("cfg_path"):
        raise ConfigError("study.teacher: with a checkpoint, the base's distill.teacher needs a cfg_path (the "
                          "teacher's run yaml) to evaluate it; or give study.teacher.train")
    return str((spec.base.parent / str(teacher.cfg_path)).resolve())


def teacher_eval_options(spec: StudySpec, ckpt: Path, out: Path) -> tuple[str, list[str]]:
    """The teacher evaluated as its students are (the distillation task, per-item scores)."""
    cfg = teacher_yaml(spec)
    task = str(OmegaConf.load(cfg).run.task)
    if task not in DISTILL_TASKS and not task.startswith("dlip_distill_"):
        raise ConfigError(f"study: the teacher's run.task '{task}' has no distillation task to score it by")
    return cfg, [*spec.teacher["options"], f"model.finetuned={ckpt}", "model.load_finetuned=True",
                 "model.init=null", f"run.task={DISTILL_TASKS.get(task, task)}", "run.runner=runner_dlip",
                 f"distill={json.dumps({'teacher': {'cfg_path': cfg}, 'terms': [{'name': 'task'}]})}",
                 "run.item_scores=True", f"run.output_dir={out}", "run.progress=False"]


def _evaluate(cfg: str, options: list[str], out: str) -> dict:
    done = finished(Path(out))
    if done:
        return {**done, "seconds": 0.0, "reused": True}
    start = time.time()
    run(cfg, options, evaluate=True)
    return record(Path(out), start, options)


# ----------------------------------------------------------------------------- runs
def run_key(spec: StudySpec, options: Sequence[str]) -> str:
    """A hash of the run yaml with the run's options applied (not its output directory)."""
    raw = apply_options(OmegaConf.load(spec.base), [o for o in options if not o.startswith("run.output_dir=")])
    return hashlib.sha256(OmegaConf.to_yaml(raw).encode()).hexdigest()[:10]


def uses_teacher(spec: StudySpec, options: Sequence[str]) -> bool:
    terms = spec.base_raw(options).distill.get("terms") or []
    return any(t.get("name") in TERMS and not TERMS[t["name"]].teacher_free for t in terms)


def cache_option(spec: StudySpec) -> str:
    base = spec.base_raw().distill.get("cache")
    cfg = {} if base is None else ({"dir": base} if isinstance(base, str) else dict(base))
    cfg.update(spec.cache)
    cfg["dir"] = str(spec.output_dir / "cache")
    return f"distill.cache={json.dumps(cfg)}"


def plan(spec: StudySpec, arms: Sequence[Arm]) -> list[RunPlan]:
    ckpt = teacher_checkpoint(spec)
    plans = []
    for arm in arms:
        cached = uses_teacher(spec, arm.options)
        for seed in spec.seeds:
            options = [*spec.options, *arm.options, f"run.seed={seed}", f"model.init.teacher={ckpt}"
                       if spec.base_raw(arm.options).model.get("init") else "model.init=null",
                       f"distill.teacher.checkpoint={ckpt}", "run.item_scores=True", "run.progress=False",
                       cache_option(spec) if cached else "distill.cache=null"]
            key = run_key(spec, options)
            out = spec.output_dir / "runs" / arm.name / f"seed{seed}-{key}"
            plans.append(RunPlan(arm, seed, [*options, f"run.output_dir={out}"], key, out, cached))
    return plans


def _train(base: str, options: list[str], out: str) -> dict:
    """One run of the study, unless it finished before (then its record, ``reused``)."""

    done = finished(Path(out))
    if done:
        return {**done, "seconds": 0.0, "reused": True}
    drop_earlier_runs(Path(out))  # a killed attempt's directory
    start = time.time()
    run(base, options)
    return record(Path(out), start, options)


# ----------------------------------------------------------------------------- the shared cache
def union_fields(spec: StudySpec, plans: Sequence[RunPlan]) -> list[str]:
    """Every field some arm's terms read: each distinct cached recipe's student and terms are
    built (layer maps depend on the student's shape) and their cache specs united."""
    import lavis.tasks as tasks

    fields: set[str] = set()
    seen = set()
    token = BUILDING.set(True)
    try:
        for p in plans:
            recipe = tuple(o for o in p.options if not o.startswith(("run.", "model.init.teacher=")))
            if not p.cached or recipe in seen:
                continue
            seen.add(recipe)
            try:
                cfg = load_config(str(spec.base), p.options)
                task = tasks.setup_task(cfg)
                task.build_datasets(cfg)
                with tokenizer_source(cfg.model_cfg.get("tokenizer")):
                    student = task.build_model(cfg)
            except ConfigError as err:
                raise ConfigError(f"{spec.path}: arm '{p.arm.name}': {err}") from None
            fields |= set(Spec.from_terms(list(getattr(student, ATTRIBUTE).terms), task.cache_cfg["topk"]).fields)
    finally:
        BUILDING.reset(token)
    return sorted(fields)


def _build_cache(base: str, options: list[str], plans: list[RunPlan], spec: StudySpec) -> dict:
    directory = spec.output_dir / "cache"
    reused = bool((read_manifest(str(directory)) or {}).get("complete"))
    start = time.time()
    fields = union_fields(spec, plans)
    stats = build_cache(base, options, fields=fields)
    return {"seconds": 0.0 if reused else time.time() - start, "reused": reused, "fields": fields, **stats}


# ----------------------------------------------------------------------------- the study
def stages(spec: StudySpec, plans: Sequence[RunPlan]) -> tuple[dict, dict]:
    """The study's stages (teacher, its evaluation, the cache, every run) and their logs."""
    ckpt = teacher_checkpoint(spec)
    out = spec.output_dir
    st: dict[tuple[str, str], Stage] = {}
    if spec.teacher.get("train"):
        st[(GROUP, "teacher")] = Stage(_train_teacher, (spec.teacher["train"], str(out / "teacher"),
                                                        spec.teacher["options"]), reused=ckpt.is_file())
    after = ("teacher",) if (GROUP, "teacher") in st else ()
    if "teacher" in spec.references:
        cfg, options = teacher_eval_options(spec, ckpt, out / "teacher_eval")
        st[(GROUP, "teacher eval")] = Stage(_evaluate, (cfg, options, str(out / "teacher_eval")), after,
                                            reused=finished(out / "teacher_eval") is not None)
    cached = [p for p in plans if p.cached]
    if cached:
        st[(GROUP, "cache")] = Stage(_build_cache, (str(spec.base), cached[0].options, list(plans), spec), after,
                                     reused=bool((read_manifest(str(out / "cache")) or {}).get("complete")))
    for p in plans:
        st[(GROUP, p.stage)] = Stage(_train, (str(spec.base), p.options, str(p.out)),
                                     ("cache",) if p.cached else after, reused=finished(p.out) is not None)
    logs = {key: out / "logs" / f"{key[1].replace(' ', '_')}.log" for key in st}
    return st, logs


def _describe(key, result: dict) -> str:
    name = key[1]
    if result.get("reused"):
        return f"{name}: done before, reused"
    if name == "cache":
        mib = result["bytes"] / 2**20
        return f"cache: {result['entries']} entries, {mib:.1f} MiB ({result['seconds'] / 60:.1f} min)"
    test = result.get("test") or {}
    shown = ", ".join(f"{k} {v:.2f}" for k, v in test.items() if k in ("r_mean", "CIDEr", "agg_metrics")
                      and isinstance(v, (int, float)))
    return f"{name}: {shown or 'done'} ({result.get('seconds', 0.0) / 60:.1f} min)"


def estimate_s(spec: StudySpec, plans: Sequence[RunPlan], teacher: bool = False) -> dict[str, float]:
    """Seconds per run from one timed training step of the student (cached runs x CACHED_STEP),
    times the steps of the run's schedule; with ``teacher`` (it is to be trained), the
    teacher's the same way, under ``"teacher"``. The steps are timed on the threads a stage
    gets (``spec.parallel`` share the CPU): a larger model's step, timed on all of them,
    is estimated too short. Evaluation and the cache not counted."""
    import torch

    probe = [*spec.options, "model.init=null", "distill.teacher.load_weights=False", "distill.teacher.checkpoint=null",
             f"distill.terms={json.dumps(_own(spec))}", "distill.cache=null"]
    threads = torch.get_num_threads()
    torch.set_num_threads(stage_threads(spec.parallel))
    try:
        step, steps, _ = _timed_step(str(spec.base), probe, spec.output_dir / "probe")
        out = {}
        for p in plans:
            epochs = int(spec.base_raw(p.arm.options).run.max_epoch)
            out[p.stage] = step * steps * epochs * (CACHED_STEP if p.cached else 1.0)
        if teacher:
            options = [*spec.teacher["options"], "model.init=null"]  # the step's cost, not its init's
            step, steps, epochs = _timed_step(spec.teacher["train"], options, spec.output_dir / "probe")
            out["teacher"] = step * steps * epochs
    finally:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    return out


def _timed_step(cfg_path: str, options: Sequence[str], out: Path) -> tuple[float, int, int]:
    """Seconds of one training step of ``cfg_path``'s model on its data (the best of two after
    a first), its steps per epoch and its epochs."""
    logging.disable(logging.INFO)  # the probe's config and data logs are not the plan
    try:
        runner = build_runner(load_config(cfg_path, [*options, "run.progress=False", f"run.output_dir={out}"]))
        model = runner.model
        model.train()
        batches = iter(runner.train_loader)
    finally:
        logging.disable(logging.NOTSET)
    times, device = [], runner.device
    for i in range(3):
        samples = apply_to_sample(lambda t: t.to(device), next(batches))
        samples.update(epoch=0, num_iters_per_epoch=len(runner.train_loader), iters=i)
        start = time.perf_counter()
        loss, _ = runner.task.train_step(model, samples)
        loss.backward()
        runner.optimizer.step()
        runner.optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return min(times[1:]), len(runner.train_loader), runner.max_epoch


def _own(spec: StudySpec) -> list[dict]:
    return teacher_free_terms(spec.base_raw().distill.get("terms"))


def emit(spec: StudySpec, plans: Sequence[RunPlan], path: Path) -> None:
    """One command per step, for a cluster scheduler: the teacher, the cache, ``torchrun``
    for every run, then the report (``--only`` runs one step of the study)."""
    study = shlex.quote(str(spec.path.resolve()))
    lines = ["#!/usr/bin/env bash", f"# lavis_dlip.study {spec.path}: {len(plans)} runs; "
             "NPROC processes per run (torchrun --nproc_per_node)", "set -euo pipefail", "NPROC=${NPROC:-8}"]
    lines.append(f"python -m lavis_dlip.study --cfg-path {study} --only teacher")
    lines.append(f"python -m lavis_dlip.study --cfg-path {study} --only cache")
    for p in plans:
        opts = " ".join(shlex.quote(o) for o in p.options)
        lines.append(f"torchrun --nproc_per_node=$NPROC -m lavis_dlip.train --cfg-path {shlex.quote(str(spec.base))} "
                     f"--options {opts}")
    if any(p.arm.group == "search" for p in plans):
        lines.append("# the shape search's winner is chosen from the short runs above: once they are done, "
                     f"emit again (python -m lavis_dlip.study --cfg-path {study} --emit FILE) for its runs")
    lines.append(f"python -m lavis_dlip.study --cfg-path {study} --only report")
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)


def run_study(spec: StudySpec, dry_run: bool = False, emit_path: Optional[Path] = None,
              only: Optional[str] = None, progress_s: float = 60.0) -> Optional[dict]:
    """Plan, run what is missing (all of it, or ``only`` teacher / cache / report), write the report."""

    arms = list(spec.arms)
    search_cfg = shape_search.parse(spec.search) if spec.search else None
    plans = plan(spec, arms)
    candidates, search_info = [], {}
    if search_cfg is not None:
        base = spec.base_raw()
        teacher_cfg = teacher_model_config(base.distill.teacher, str(spec.base.parent))
        candidates, search_info = shape_search.search(search_cfg, base, teacher_cfg,
                                                      text_len=int(base.model.get("max_txt_len", 32)))
        short = [Arm(c.arm, tuple([*c.options(), *search_cfg["options"]]), "search", dict(c.shape))
                 for c in candidates if c.arm]
        plans += plan(spec, short)
    st, logs = stages(spec, plans)
    if emit_path is not None:
        emit(spec, plans, emit_path)
        print(f"wrote {emit_path}: {len(plans)} runs")
        return None
    if dry_run or only is None:
        train_teacher = (GROUP, "teacher") in st and not st[(GROUP, "teacher")].reused
        estimates = estimate_s(spec, [p for p in plans if not st[(GROUP, p.stage)].reused], train_teacher)
    if dry_run:
        _print_plan(spec, plans, st, estimates, candidates)
        return None
    if only in ("teacher", "cache"):
        keys = [k for k in st if k[1] in ("teacher", "teacher eval", only)]
        run_stages({k: st[k]._replace(after=tuple(a for a in st[k].after if (GROUP, a) in keys)) for k in keys},
                   logs, 1, describe=_describe)
        return None
    if only is None:
        reference = {key: estimates[key[1]] / 60 for key in st if key[1] in estimates}
        progress = Progress.plan(f"lavis-dlip study {spec.title}", st, spec.parallel, None, reference,
                                 interval=progress_s)
        results = run_stages(st, logs, spec.parallel, progress, describe=_describe, isolate=True)
        if candidates:  # the winner of the short runs, trained with the study's own schedule
            winner = _search_winner(spec, plans, candidates)
            if winner is not None:
                full = plan(spec, [Arm("search_winner", tuple(winner.options()), "search", dict(winner.shape))])
                more, more_logs = stages(spec, full)
                extra = {k: v._replace(after=()) for k, v in more.items() if k[1].startswith("search_winner")}
                results.update(run_stages(extra, more_logs, spec.parallel, describe=_describe, isolate=True))
                plans += full
    else:
        plans += plan(spec, [Arm("search_winner", tuple(w.options()), "search", dict(w.shape))
                             for w in [_search_winner(spec, plans, candidates)] if w is not None])
    return write(spec, plans, candidates, search_info)


def _search_winner(spec: StudySpec, plans: Sequence[RunPlan], candidates):
    """The candidate whose short runs scored best (mean over seeds), its ``winner.yaml`` written."""

    scores = {}
    for c in candidates:
        runs = [finished(p.out) for p in plans if p.arm.name == c.arm]
        if c.arm and runs and all(runs):
            scores[c.arm] = sum(headline(r["test"]) for r in runs) / len(runs)
    if not scores:
        return None
    best = max(scores, key=scores.get)
    winner = next(c for c in candidates if c.arm == best)
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    base = spec.base_raw([f"model.init.teacher={teacher_checkpoint(spec)}",
                          f"distill.teacher.checkpoint={teacher_checkpoint(spec)}"])
    shape_search.winner_yaml(base, str(spec.base.parent), winner.shape, spec.output_dir / "winner.yaml")
    return winner


def _print_plan(spec, plans, st, estimates, candidates) -> None:
    arms = list(dict.fromkeys(p.arm.name for p in plans))
    todo = [p for p in plans if not st[(GROUP, p.stage)].reused]
    runs = sum(estimates.get(p.stage, 0.0) for p in todo) / spec.parallel
    total = runs + estimates.get("teacher", 0.0)  # the teacher trains alone: every run waits for it
    print(f"study {spec.title}: {len(arms)} arms x {len(spec.seeds)} seeds = {len(plans)} runs "
          f"({len(plans) - len(todo)} finished before), {spec.parallel} at a time")
    print(f"  shared: teacher {teacher_checkpoint(spec)}"
          f"{' (to train)' if (GROUP, 'teacher') in st and not st[(GROUP, 'teacher')].reused else ''}; "
          f"cache {spec.output_dir / 'cache'} for {sum(p.cached for p in plans)} runs")
    for name in arms:
        p = next(p for p in plans if p.arm.name == name)
        print(f"  {name:<28} {'cache' if p.cached else 'no teacher outputs':<20} {' '.join(p.arm.options)}")
    if candidates:
        print(f"  shape search: {len(candidates)} shapes, {sum(bool(c.arm) for c in candidates)} to try; then "
              f"the winner's {len(spec.seeds)} runs with the study's schedule (not in the count or estimate)")
    teacher = f", the teacher's {estimates['teacher'] / 60:.0f} min first" if "teacher" in estimates else ""
    print(f"  estimate: about {total / 60:.0f} min of training{teacher} (a timed step x the steps; cache and "
          f"evaluation not counted)")
