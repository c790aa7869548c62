"""``dlip_captioning``: LAVIS's captioning task, scored against local ground truth.

LAVIS's ``CaptionTask`` always scores against COCO Karpathy ground truth that it
downloads into ``cache_root/coco_gt`` (tasks/captioning.py:125). When an eval
split comes from ``dlip_local_caption`` with a ``gt`` file, this task scores
against that file instead, with the same pycocoevalcap metrics (BLEU-1..4,
METEOR, ROUGE-L, CIDEr; SPICE where it can run) and the same ``agg_metrics``
(CIDEr + BLEU-4). Other splits keep LAVIS's behaviour.

``run.caption_scorers`` picks the scorers (default: all five, as LAVIS). METEOR
starts a Java process that loads its paraphrase tables, about 9 s per evaluation
on these machines while the other scorers take milliseconds on small splits; Bleu
and CIDEr are always needed (``agg_metrics``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Optional

from lavis.common.dist_utils import main_process
from lavis.common.registry import registry
from lavis.tasks.captioning import CaptionTask

from lavis_dlip.schema import SCORERS
from lavis_dlip.tasks.items import write_items
from lavis_dlip.tasks.loop import TrainLoop




@registry.register_task("dlip_captioning")
class DlipCaptionTask(TrainLoop, CaptionTask):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gt_files: dict[str, str] = {}
        self.scorers: tuple[str, ...] = SCORERS

    @classmethod
    def setup_task(cls, cfg):
        task = super().setup_task(cfg)
        task.scorers = tuple(cfg.run_cfg.get("caption_scorers") or SCORERS)  # validated by schema.check_run
        task.item_scores = bool(cfg.run_cfg.get("item_scores", False))  # each image's CIDEr (tasks/items.py)
        return task

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
        items: dict = {} if self.item_scores else None
        scores = coco_caption_scores(self.gt_files[split_name], eval_result_file, self.scorers, items)
        if items:
            write_items(split_name, items)
        with open(os.path.join(registry.get_path("output_dir"), "evaluate.txt"), "a") as f:
            f.write(json.dumps({split_name: scores}) + "\n")
        return {**scores, "agg_metrics": scores["CIDEr"] + scores["Bleu_4"]}


def coco_caption_scores(gt_file: str, result_file: str, scorers: Sequence[str] = SCORERS,
                        items: Optional[dict] = None) -> dict[str, float]:
    """pycocoevalcap's scores of a LAVIS result file against a COCO-format gt file, as
    ``COCOEvalCap.evaluate`` computes them (PTB-tokenized captions), for ``scorers`` only;
    ``items`` (a dict) receives each image's CIDEr, whose mean is the CIDEr score."""
    from pycocoevalcap import eval as coco_eval  # its Spice is compat's offline-aware one
    from pycocotools.coco import COCO

    coco = COCO(gt_file)
    results = coco.loadRes(result_file)
    ids = results.getImgIds()
    tokenizer = coco_eval.PTBTokenizer()
    gts = tokenizer.tokenize({i: coco.imgToAnns[i] for i in ids})
    res = tokenizer.tokenize({i: results.imgToAnns[i] for i in ids})
    make = {"Bleu": lambda: coco_eval.Bleu(4), "METEOR": coco_eval.Meteor, "ROUGE_L": coco_eval.Rouge,
            "CIDEr": coco_eval.Cider, "SPICE": coco_eval.Spice}
    scores: dict[str, float] = {}
    for name in scorers:
        score, per_image = make[name]().compute_score(gts, res)
        if name == "CIDEr" and items is not None:  # in the order of gts' keys, as Cider scores them
            items.update(image_ids=[int(i) for i in gts], CIDEr=[float(x) for x in per_image])
        if name == "Bleu":
            scores.update({f"Bleu_{n + 1}": s for n, s in enumerate(score)})
        else:
            scores[name] = score
    return {k: float(v) for k, v in scores.items() if not math.isnan(v)}
