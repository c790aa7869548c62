"""Per-item test scores beside LAVIS's own results (``run.item_scores: True``): what
``lavis_dlip.study`` bootstraps over to put intervals on a score.

A split's evaluation then also writes ``<result_dir>/<split>_items.json``:

* retrieval: each image query's rank of its best caption and each text query's rank of
  its image (``img_ranks``, ``txt_ranks``, ``txt2img``), ranked exactly as LAVIS's
  ``RetrievalTask._report_metrics`` ranks them, so the recalls they give are LAVIS's;
* VQA: each question's VQA accuracy (``question_ids``, ``accuracy``), from LAVIS's
  ``VQAEval``;
* captioning (``dlip_captioning`` with a local ground-truth file): each image's CIDEr
  (``image_ids``, ``CIDEr``), as pycocoevalcap's CIDEr scores it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from lavis.common.dist_utils import is_main_process
from lavis.common.registry import registry

ITEMS = "{split}_items.json"


def write_items(split: str, items: dict[str, Any]) -> Path:
    path = Path(registry.get_path("result_dir")) / ITEMS.format(split=split)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(items))
    os.replace(tmp, path)
    return path


def retrieval_ranks(scores_i2t: np.ndarray, scores_t2i: np.ndarray, txt2img, img2txt) -> dict[str, list]:
    """The rank behind each recall of LAVIS's ``_report_metrics`` (the same argsort)."""
    img_ranks = [min(int(np.where(np.argsort(row)[::-1] == t)[0][0]) for t in img2txt[i])
                 for i, row in enumerate(scores_i2t)]
    txt_ranks = [int(np.where(np.argsort(row)[::-1] == txt2img[t])[0][0]) for t, row in enumerate(scores_t2i)]
    return {"img_ranks": img_ranks, "txt_ranks": txt_ranks, "txt2img": [int(txt2img[t]) for t in range(len(txt_ranks))]}


class ItemScoresMixin:
    """Left of LAVIS's ``RetrievalTask`` or ``VQATask``: with ``run.item_scores``, every
    evaluated split also writes its per-item scores."""

    item_scores = False
    _items: dict[str, Any] | None = None

    @classmethod
    def setup_task(cls, cfg):
        task = super().setup_task(cfg)
        task.item_scores = bool(cfg.run_cfg.get("item_scores", False))
        return task

    # retrieval ---------------------------------------------------------------------------
    def evaluation(self, model, data_loader, **kwargs):
        if not (self.item_scores and hasattr(model, "compute_sim_matrix") and hasattr(data_loader.dataset, "txt2img")):
            return super().evaluation(model, data_loader, **kwargs)
        score_i2t, score_t2i = model.compute_sim_matrix(data_loader, task_cfg=self.cfg)
        if not is_main_process():
            return None
        dataset = data_loader.dataset
        self._items = retrieval_ranks(score_i2t, score_t2i, dataset.txt2img, dataset.img2txt)
        return self._report_metrics(score_i2t, score_t2i, dataset.txt2img, dataset.img2txt)

    def after_evaluation(self, val_result, split_name=None, **kwargs):
        if self._items is not None and is_main_process():
            write_items(split_name, self._items)
            self._items = None
        return super().after_evaluation(val_result, split_name=split_name, **kwargs)

    # VQA ---------------------------------------------------------------------------------
    def _report_metrics(self, *args, **kwargs):
        metrics = super()._report_metrics(*args, **kwargs)
        split = kwargs.get("split")
        ques, anno = getattr(self, "ques_files", {}), getattr(self, "anno_files", {})
        if self.item_scores and split in ques and split in anno and is_main_process():
            from lavis.common.vqa_tools.vqa import VQA
            from lavis.common.vqa_tools.vqa_eval import VQAEval

            vqa = VQA(anno[split], ques[split])
            scorer = VQAEval(vqa, vqa.loadRes(resFile=kwargs["result_file"], quesFile=ques[split]), n=2)
            scorer.evaluate()
            ids = sorted(scorer.evalQA)
            write_items(split, {"question_ids": ids, "accuracy": [float(scorer.evalQA[q]) for q in ids]})
        return metrics
