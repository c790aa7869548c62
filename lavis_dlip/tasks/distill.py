"""Distillation tasks: LAVIS's tasks whose training step adds DLIP's loss terms
from a frozen teacher (``distill`` section of the run yaml).

* ``dlip_distill_pretrain``: image-text pairs (LAVIS's COCO/VG/SBU/CC3M caption
  builders or ``dlip_local_pairs``); student ``dlip_pretrain`` (ITC, ITM, LM) or
  ``dlip_retrieval`` (ITC, ITM). Validation and test splits that hold retrieval
  annotations are scored as zero-shot retrieval; others are skipped, as LAVIS's
  pre-training task does.
* ``dlip_distill_retrieval``: LAVIS's retrieval task (fine-tuning, recall@k);
  ITC/ITM distillation from a fine-tuned ``blip_retrieval`` teacher.
* ``dlip_distill_captioning``: ``dlip_captioning`` (LAVIS's captioning task: COCO
  metrics, local ground truth where given); LM-logit and decoder distillation
  from a ``blip_caption`` teacher.
* ``dlip_distill_vqa``: LAVIS's VQA task (VQA accuracy); answer-decoder
  distillation from a ``blip_vqa`` teacher, whose decoder reads its own fused
  question states.

The teacher lives on the task, outside the model: it is not optimised, not
wrapped in DDP and not checkpointed. With ``run.evaluate: True`` it is not built.
With ``distill.cache`` its outputs are read from a teacher-output cache
(``distill/cache/``): the train split replays the cached augmentations (a stream: its
outputs shards beside the data shards), and the teacher is built only as a shape (on
the meta device) unless a term needs it online.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from lavis.common.registry import registry
from lavis.processors.blip_processors import BlipImageBaseProcessor
from lavis.tasks.image_text_pretrain import ImageTextPretrainTask
from lavis.tasks.retrieval import RetrievalTask
from lavis.tasks.vqa import VQATask

from lavis_dlip.distill import ATTRIBUTE, TERMS, Distiller, FrozenTeacher, build_terms, load_teacher
from lavis_dlip.distill.distiller import BALANCE
from lavis_dlip.distill.cache import (
    BUILDING, VERSION as CACHE_VERSION, CacheReader, ReplayDataset, Spec, cache_config, data_key, teacher_key,
)
from lavis_dlip.distill.cache.keys import stream_data_key
from lavis_dlip.distill.cache.shards import ShardOutputs
from lavis_dlip.distill.teacher import check_compatible
from lavis_dlip.datasets.stream import ShardStream, StoredAugmentations, stream_lavis_laion
from lavis_dlip.errors import ConfigError, check_keys
from lavis_dlip.run_yaml import ensure_distill
from lavis_dlip.tasks.captioning import DlipCaptionTask
from lavis_dlip.tasks.items import ItemScoresMixin
from lavis_dlip.tasks.loop import TrainLoop
from lavis_dlip.distill import validate_terms
from lavis_dlip.blip import hf_import
from lavis_dlip.blip.teacher import teacher_model_config

logger = logging.getLogger(__name__)


class DistillTaskMixin:
    """Left of a LAVIS task: builds the teacher and terms, runs the distillation step."""

    teacher: Optional[FrozenTeacher] = None
    cache: Optional[CacheReader] = None
    cache_cfg: Optional[dict] = None
    cache_dataset: Optional[ReplayDataset | ShardStream] = None  # the train split, replaying the cached augmentations
    RUNNER = "runner_dlip"  # its train step returns (loss, terms) and it places the teacher

    @classmethod
    def setup_task(cls, cfg):
        ensure_distill(cfg)  # a config LAVIS's own train.py built lacks the distill section
        return super().setup_task(cfg=cfg)

    @classmethod
    def validate_config(cls, raw, base_dir: str) -> None:
        """The ``distill`` section and the runner, checked before anything is built."""

        task, runner = raw.run.task, raw.run.get("runner", "runner_base")
        if runner != cls.RUNNER:
            raise ConfigError(f"run.runner '{runner}' cannot run run.task '{task}': distillation needs "
                              f"run.runner: {cls.RUNNER} (LAVIS's runners expect a bare loss and know no teacher)")
        distill = raw.get("distill")
        if distill is None:
            raise ConfigError(f"run.task '{task}' needs a top-level 'distill' section with teacher and terms")
        check_keys(distill, ("teacher", "terms", "base_dir", "cache", "balance"), "distill")
        if str(distill.get("balance") or "none") not in BALANCE:
            raise ConfigError(f"distill.balance: '{distill.balance}' is not one of {', '.join(BALANCE)}")
        if distill.get("teacher") is None:
            raise ConfigError("missing key 'distill.teacher'")
        teacher_model_config(distill.teacher, distill.get("base_dir") or base_dir)
        validate_terms(distill.get("terms"))
        if not raw.run.get("evaluate", False):
            cache_config(distill.get("cache"), distill.get("base_dir") or base_dir)

    def build_datasets(self, cfg):
        datasets = super().build_datasets(cfg)
        stream_lavis_laion(datasets)  # before the cache wraps the train split (runner_dlip does it for the rest)
        distill = cfg.config.get("distill")
        self.cache_cfg = None
        if distill is None or cfg.run_cfg.get("evaluate", False):
            return datasets
        self.cache_cfg = cache_config(distill.get("cache"), distill.get("base_dir") or os.getcwd())
        if self.cache_cfg is None:
            return datasets
        train = [name for name, splits in datasets.items() if "train" in splits]
        if len(train) != 1:
            raise ConfigError(f"distill.cache: caches one train split, the config has {len(train)} "
                              f"({', '.join(train) or 'none'})")
        name, split = train[0], datasets[train[0]]["train"]
        if isinstance(split, ShardStream):  # teacher outputs as shards beside the data shards
            split.stored = StoredAugmentations(self.cache_cfg["augmentations"], self.cache_cfg["seed"])
            self.cache_dataset, self._cache_data = split, stream_data_key(split, name, cfg.datasets_cfg[name])
            return datasets
        self.cache_dataset = ReplayDataset(split, self.cache_cfg["augmentations"], self.cache_cfg["seed"])
        self._cache_data = data_key(split, name, cfg.datasets_cfg[name])
        datasets[name]["train"] = self.cache_dataset
        return datasets

    def cache_key(self, cfg, student) -> dict:
        """What a cache for this run must have been built from (distill/cache/keys.py)."""
        distill, c = cfg.config.distill, self.cache_cfg
        spec = Spec.from_terms(list(getattr(student, ATTRIBUTE).terms), c["topk"])
        return {"version": CACHE_VERSION,
                "teacher": teacher_key(distill.teacher, distill.get("base_dir") or os.getcwd()),
                "data": self._cache_data,
                "student_text": {k: str(cfg.model_cfg.get(k)) for k in ("arch", "tokenizer", "max_txt_len", "prompt")},
                "augmentations": {"k": c["augmentations"], "seed": c["seed"]},
                "fields": {"fields": spec.fields, "topk": c["topk"], "dtype": c["dtype"]}}

    def build_model(self, cfg):
        model = super().build_model(cfg)
        if cfg.run_cfg.get("evaluate", False):
            return model  # evaluation needs the student alone
        distill = cfg.config.get("distill")
        if distill is None:
            raise ConfigError(f"run.task {cfg.run_cfg.task} needs a top-level 'distill' section "
                              f"(teacher and terms); see docs/distillation.md")
        base_dir = distill.get("base_dir") or os.getcwd()
        cached = self.cache_cfg is not None
        # read from a cache, or not read at all (only the student's own losses): the teacher's shape only
        online = any(not TERMS[spec["name"]].teacher_free for spec in distill.terms)
        self.teacher = load_teacher(distill.teacher, base_dir=base_dir,
                                    shape_only=not online or (cached and not BUILDING.get()))
        check_compatible(model, self.teacher.model)
        if hf_import.is_hf(distill.teacher.get("checkpoint")):
            _check_hf_inputs(cfg, model, str(distill.teacher.checkpoint))
        setattr(model, ATTRIBUTE, Distiller(build_terms(distill.terms, model, self.teacher.model),
                                            balance=str(distill.get("balance") or "none")))
        if cached and not BUILDING.get():
            reader = ShardOutputs if isinstance(self.cache_dataset, ShardStream) else CacheReader
            self.cache = reader(self.cache_cfg["dir"], self.cache_key(cfg, model))
            self.cache_dataset.reader = self.cache  # batches arrive with the teacher's outputs
            if self.cache.online_fusion:  # itm_kd on the student's own negatives: the teacher's text encoder runs
                logger.warning("distill.cache: itm_kd with pairs: all scores the student's own hard negatives, "
                               "which no cache holds: the teacher's text encoder runs on them every step. "
                               "pairs: mined (the teacher's negatives, cached) runs no teacher; "
                               "see docs/distillation.md")
                self.teacher = load_teacher(distill.teacher, base_dir=base_dir)
        return model

    def train_step(self, model, samples):
        student = getattr(model, "module", model)  # DDP wraps it
        return getattr(student, ATTRIBUTE).step(model, student, self.teacher, samples, cache=self.cache)


def _check_hf_inputs(cfg, student, source: str) -> None:
    """A transformers teacher's processor and tokenizer against the student's data and tokenizer."""
    default = BlipImageBaseProcessor()  # LAVIS's mean and std, where a processor names none
    for ds in cfg.datasets_cfg.values():
        proc = (ds.get("vis_processor") or {}).get("train")
        if proc is None:  # an evaluation split's dataset: the teacher never sees its images
            continue
        mean = proc.get("mean") or list(default.normalize.mean)
        std = proc.get("std") or list(default.normalize.std)
        hf_import.check_inputs(source, int(proc.get("image_size", 384)), mean, std, student.tokenizer)


@registry.register_task("dlip_distill_pretrain")
class DistillPretrainTask(DistillTaskMixin, TrainLoop, ImageTextPretrainTask):
    def __init__(self, cfg=None):
        super().__init__()
        self._retrieval = _ItemsRetrieval(cfg=cfg)

    @classmethod
    def setup_task(cls, cfg):
        ensure_distill(cfg)
        task = cls(cfg=cfg.run_cfg)
        task._retrieval.item_scores = bool(cfg.run_cfg.get("item_scores", False))
        return task

    def evaluation(self, model, data_loader, cuda_enabled=True):
        if not hasattr(data_loader.dataset, "img2txt"):
            return None
        return self._retrieval.evaluation(model, data_loader)

    def after_evaluation(self, val_result, **kwargs):
        return self._retrieval.after_evaluation(val_result, **kwargs)  # its per-item scores, if asked for


class _ItemsRetrieval(ItemScoresMixin, RetrievalTask):
    """LAVIS's retrieval evaluation with per-item scores (``run.item_scores``)."""


@registry.register_task("dlip_distill_retrieval")
class DistillRetrievalTask(DistillTaskMixin, TrainLoop, ItemScoresMixin, RetrievalTask):
    pass


@registry.register_task("dlip_distill_captioning")
class DistillCaptionTask(DistillTaskMixin, DlipCaptionTask):
    pass


@registry.register_task("dlip_distill_vqa")
class DistillVQATask(DistillTaskMixin, TrainLoop, ItemScoresMixin, VQATask):
    pass
