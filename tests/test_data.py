"""Embedded demo data and the local builders: formats, determinism, clear errors."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from conftest import CONFIGS


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_data_is_deterministic(tmp_path):
    from lavis_dlip.datasets.demo_data import generate, load_preset

    preset = load_preset("test")
    generate(preset, tmp_path / "a")
    generate(preset, tmp_path / "b")
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert a == b
    n_images = preset.train_images + preset.val_images + preset.test_images
    assert sum(k.endswith(".jpg") for k in a) == n_images


def test_demo_data_formats(demo_test_data):
    root = demo_test_data
    load = lambda name: json.loads((root / name).read_text())  # noqa: E731
    train = load("retrieval_train.json")
    assert len(train) == 384 * 2 and {"image", "caption", "image_id"} <= set(train[0])
    test = load("retrieval_test.json")
    assert len(test) == 48 and all(isinstance(r["caption"], list) and len(r["caption"]) == 3 for r in test)
    gt = load("caption_test_gt.json")
    ids = {int(r["image"].split("_")[-1][:-4]) for r in load("caption_test.json")}
    assert ids == {img["id"] for img in gt["images"]}
    vqa = load("vqa_test.json")
    annotations = load("vqa_test_annotations.json")["annotations"]
    assert {q["question_id"] for q in vqa} == {a["question_id"] for a in annotations}
    answers = set(load("vqa_answer_list.json"))
    assert all(r["answer"][0] in answers for r in load("vqa_train.json"))


COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
          "yellow": (235, 210, 40), "purple": (140, 60, 180), "orange": (240, 140, 30)}


def test_captions_describe_what_is_drawn(demo_test_data):
    """Every colour a caption names is drawn; colours it does not name are absent."""
    records = json.loads((demo_test_data / "retrieval_train.json").read_text())
    checked = 0
    for rec in records[:200]:
        named = {c for c in COLORS if re.search(rf"\b{c}\b", rec["caption"])}
        pixels = np.asarray(Image.open(demo_test_data / "images" / rec["image"]).convert("RGB")).reshape(-1, 3)
        for color, rgb in COLORS.items():
            close = (np.abs(pixels.astype(int) - rgb).sum(1) < 60).sum()
            if color in named:
                assert close >= 4, (rec, color)
            else:
                assert close < 4, (rec, color)
        checked += 1
    assert checked == 200


def _local_cfg(tmp_path, builder: str, build_info: dict, **extra) -> str:
    cfg = OmegaConf.load(CONFIGS / "retrieval.yaml")
    ds = cfg.datasets.pop("dlip_local_retrieval")
    ds.pop("base_dir")
    ds.build_info = build_info
    ds.update(extra)
    cfg.datasets[builder] = ds
    path = tmp_path / "cfg" / "run.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(cfg))
    return str(path)


def _build(path: str):
    import lavis.tasks as tasks

    from lavis_dlip.config import load_config

    cfg = load_config(path)
    return tasks.setup_task(cfg).build_datasets(cfg)


def _copy_retrieval(src: Path, dst: Path, edit=None) -> None:
    (dst / "images").symlink_to(src / "images")
    for split in ("train", "val", "test"):
        records = json.loads((src / f"retrieval_{split}.json").read_text())
        if edit and split == "train":
            edit(records)
        (dst / f"retrieval_{split}.json").write_text(json.dumps(records))


def _retrieval_info() -> dict:
    return {"images": {"storage": "../data/images"},
            "annotations": {s: {"storage": f"../data/retrieval_{s}.json"} for s in ("train", "val", "test")}}


def test_relative_paths_resolve_against_the_yaml(tmp_path, demo_test_data):
    (tmp_path / "data").mkdir()
    _copy_retrieval(demo_test_data, tmp_path / "data")
    datasets = _build(_local_cfg(tmp_path, "dlip_local_retrieval", _retrieval_info()))
    splits = datasets["dlip_local_retrieval"]
    assert len(splits["train"]) == 768 and len(splits["test"].image) == 48
    sample = splits["train"][0]
    assert sample["image"].shape == (3, 64, 64) and isinstance(sample["text_input"], str)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r[5].pop("caption"), r"retrieval_train.json: record 5 has no 'caption'"),
        (lambda r: r[7].update(image_id=[1]), r"record 7 'image_id' must be str or int"),
        (lambda r: r[3].update(image="train/missing.jpg", image_id="its own"),
         r"record 3: image 'train/missing.jpg' not found"),
    ],
)
def test_malformed_records_are_named(tmp_path, demo_test_data, edit, message):
    from lavis_dlip.datasets.validate import DataError

    (tmp_path / "data").mkdir()
    _copy_retrieval(demo_test_data, tmp_path / "data", edit)
    with pytest.raises(DataError, match=message):
        _build(_local_cfg(tmp_path, "dlip_local_retrieval", _retrieval_info()))


def test_missing_file_and_unreadable_image(tmp_path, demo_test_data):
    from lavis_dlip.datasets.validate import DataError

    (tmp_path / "data").mkdir()
    _copy_retrieval(demo_test_data, tmp_path / "data")
    info = _retrieval_info()
    info["annotations"]["val"]["storage"] = "../data/nope.json"
    key = "datasets.dlip_local_retrieval.build_info.annotations.val.storage"
    with pytest.raises(DataError, match=rf"{key}: file not found: .*nope.json"):
        _build(_local_cfg(tmp_path, "dlip_local_retrieval", info))

    images = tmp_path / "imgs" / "train"
    images.mkdir(parents=True)
    (images / "bad.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "data" / "retrieval_train.json").write_text(
        json.dumps([{"image": "train/bad.jpg", "caption": "x", "image_id": 1}]))
    info = _retrieval_info()
    info["images"]["storage"] = "../imgs"
    info["annotations"] = {"train": info["annotations"]["train"]}
    with pytest.raises(DataError, match=r"record 0: cannot read image .*bad.jpg"):
        _build(_local_cfg(tmp_path, "dlip_local_retrieval", info))


def test_caption_and_vqa_eval_files_are_cross_checked(tmp_path, demo_test_data):
    from lavis_dlip.datasets.validate import DataError

    root = demo_test_data
    gt = json.loads((root / "caption_test_gt.json").read_text())
    gt["images"] = gt["images"][1:]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    info = {"images": {"storage": str(root / "images")},
            "annotations": {"test": {"storage": str(root / "caption_test.json"), "gt": str(tmp_path / "gt.json")}}}
    with pytest.raises(DataError, match=r"caption_test.json: record 0: image id \d+ is not in .*gt.json"):
        _build(_local_cfg(tmp_path, "dlip_local_caption", info))

    anns = json.loads((root / "vqa_test_annotations.json").read_text())
    anns["annotations"] = anns["annotations"][:-1]
    (tmp_path / "anns.json").write_text(json.dumps(anns))
    files = [str(root / f) for f in ("vqa_test.json", "vqa_answer_list.json", "vqa_test_questions.json")]
    info = {"images": {"storage": str(root / "images")},
            "annotations": {"test": {"storage": files + [str(tmp_path / "anns.json")]}}}
    with pytest.raises(DataError, match=r"anns.json: question ids must equal those of .*vqa_test.json"):
        _build(_local_cfg(tmp_path, "dlip_local_vqa", info))
