"""``dlip_captioning``: LAVIS's captioning task, scored against local ground truth.

LAVIS's ``CaptionTask`` always scores against COCO Karpathy ground truth that it
downloads into ``cache_root/coco_gt`` (tasks/captioning.py:125). When an eval
split comes from ``dlip_local_caption`` with a ``gt`` file, this task scores
against that file instead, with the same pycocoevalcap metrics (BLEU-1..4,
METEOR, ROUGE-L, CIDEr; SPICE where it can run) and the same ``agg_metrics``
(CIDEr + BLEU-4). Other splits keep LAVIS's behaviour.
"""

from __future__ import annotations

import json
import math
import os

from lavis.common.dist_utils import main_process
from lavis.common.registry import registry
from lavis.tasks.captioning import CaptionTask


@registry.register_task("dlip_captioning")
class DlipCaptionTask(CaptionTask):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gt_files: dict[str, str] = {}

    def build_datasets(self, cfg):
        datasets = super().build_datasets(cfg)
        for splits in datasets.values():
            for split, dataset in splits.items():
                gt = getattr(dataset, "coco_gt_file", None)
                if gt:
                    self.gt_files[split] = gt
        return datasets

    @main_process
    def _report_metrics(self, eval_result_file, split_name):
        if split_name not in self.gt_files:
            return super()._report_metrics(eval_result_file=eval_result_file, split_name=split_name)
        scores = coco_caption_scores(self.gt_files[split_name], eval_result_file)
        with open(os.path.join(registry.get_path("output_dir"), "evaluate.txt"), "a") as f:
            f.write(json.dumps({split_name: scores}) + "\n")
        return {**scores, "agg_metrics": scores["CIDEr"] + scores["Bleu_4"]}


def coco_caption_scores(gt_file: str, result_file: str) -> dict[str, float]:
    """pycocoevalcap's scores of a LAVIS result file against a COCO-format gt file."""
    from pycocoevalcap.eval import COCOEvalCap
    from pycocotools.coco import COCO

    coco = COCO(gt_file)
    evaluator = COCOEvalCap(coco, coco.loadRes(result_file))
    evaluator.evaluate()
    return {k: float(v) for k, v in evaluator.eval.items() if not math.isnan(v)}
