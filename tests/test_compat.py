"""The LAVIS 1.0.2 workarounds in lavis_dlip.compat do what they say."""

from __future__ import annotations

import math
import os

import pytest
import torch
from omegaconf import OmegaConf


def test_torchvision_and_lavis_import():
    import lavis_dlip  # noqa: F401
    import torchvision.transforms as T
    from PIL import Image

    out = T.Compose([T.Resize((8, 8)), T.ToTensor()])(Image.new("RGB", (20, 20)))
    assert out.shape == (3, 8, 8)


def test_cache_root_is_usable():
    import lavis_dlip  # noqa: F401
    from lavis.common.registry import registry

    root = registry.get_path("cache_root")
    assert os.path.isdir(root) and os.access(root, os.W_OK)
    assert not os.path.exists("/export/home/.cache/lavis") or root == "/export/home/.cache/lavis"


def test_register_path_overwrites():
    from lavis.common.registry import registry

    from lavis_dlip import compat

    compat.register_path("dlip_test_path", "/a")
    compat.register_path("dlip_test_path", "/b")
    assert registry.get_path("dlip_test_path") == "/b"


def test_negative_all_rank_runs_in_one_process(demo_test_data):
    import lavis_dlip  # noqa: F401
    from lavis.models import load_model

    model = load_model("dlip_retrieval", "test", device="cpu", is_eval=False)
    model.negative_all_rank = True
    images = torch.randn(4, 3, 64, 64)
    out = model({"image": images, "text_input": ["a red circle", "a blue square", "two shapes", "a green star"],
                 "image_id": torch.arange(4), "epoch": 0, "iters": 0, "num_iters_per_epoch": 10})
    assert torch.isfinite(out.loss) and out.loss_itm > 0


def test_init_distributed_mode_without_torchrun(monkeypatch):
    from lavis_dlip import compat

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    run_cfg = OmegaConf.create({"device": "cpu"})
    compat.init_distributed_mode(run_cfg)
    assert run_cfg.distributed is False


def test_spice_is_skipped_offline(monkeypatch):
    import lavis_dlip  # noqa: F401
    from pycocoevalcap.eval import Spice

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    score, scores = Spice().compute_score({1: ["a red circle"]}, {1: ["a red circle"]})
    assert math.isnan(score) and len(scores) == 1


def test_caption_scores_are_pycocoevalcaps_for_the_chosen_scorers(tmp_path, monkeypatch):
    """``run.caption_scorers`` computes what COCOEvalCap.evaluate reports, for those scorers only."""
    import json

    import lavis_dlip  # noqa: F401
    from pycocoevalcap.eval import COCOEvalCap
    from pycocotools.coco import COCO

    from lavis_dlip.tasks.captioning import coco_caption_scores

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    refs = {1: ["a red circle left of a blue square", "a red circle"], 2: ["two green triangles", "green shapes"],
            3: ["a blue square at the top", "one blue square"]}
    gt = {"images": [{"id": i} for i in refs], "annotations": [
        {"image_id": i, "id": 10 * i + j, "caption": c} for i, cs in refs.items() for j, c in enumerate(cs)]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    results = [{"image_id": 1, "caption": "a red circle"}, {"image_id": 2, "caption": "two green squares"},
               {"image_id": 3, "caption": "a blue square"}]
    (tmp_path / "res.json").write_text(json.dumps(results))

    coco = COCO(str(tmp_path / "gt.json"))
    evaluator = COCOEvalCap(coco, coco.loadRes(str(tmp_path / "res.json")))
    evaluator.evaluate()
    ours = coco_caption_scores(str(tmp_path / "gt.json"), str(tmp_path / "res.json"), ["Bleu", "ROUGE_L", "CIDEr"])
    assert set(ours) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}
    assert ours == {k: pytest.approx(evaluator.eval[k], abs=0) for k in ours} and ours["CIDEr"] > 0


def test_model_device_is_the_first_parameters():
    """LAVIS's ``BaseModel.device``, patched to read one parameter: still the first one's device."""
    import lavis_dlip  # noqa: F401
    from lavis.models.base_model import BaseModel

    class Two(BaseModel):
        def __init__(self):
            super().__init__()
            self.first = torch.nn.Linear(2, 2, device="meta")
            self.second = torch.nn.Linear(2, 2)

    model = Two()
    assert model.device == torch.device("meta")
    model.first.to_empty(device="cpu")
    assert model.device == torch.device("cpu")
