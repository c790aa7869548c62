"""Checks of local annotation files in LAVIS's formats, run before training starts.

Every error names the file and the record (index and, where there is one, id)
and says what to fix, so a bad record fails in seconds rather than mid-epoch.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Sequence

from PIL import Image


class DataError(ValueError):
    """A local data file is missing or malformed."""


# Required keys and their types per (kind, split kind). ``str|int`` ids follow LAVIS.
SCHEMAS: dict[str, dict[str, dict[str, tuple[type, ...]]]] = {
    "pairs": {"train": {"image": (str,), "caption": (str,)}},
    "retrieval": {
        "train": {"image": (str,), "caption": (str,), "image_id": (str, int)},
        "eval": {"image": (str,), "caption": (list,)},
    },
    "caption": {
        "train": {"image": (str,), "caption": (str,), "image_id": (str, int)},
        "eval": {"image": (str,)},
    },
    "vqa": {
        "train": {"image": (str,), "question": (str,), "answer": (list,)},
        "eval": {"image": (str,), "question": (str,), "question_id": (int,)},
    },
}


def load_json(path: str, what: str) -> Any:
    if not os.path.isfile(path):
        raise DataError(f"{what}: file not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(f"{what}: {path} is not valid JSON ({err})") from err


def check_records(records: Any, path: str, kind: str, split: str) -> None:
    schema = SCHEMAS[kind]["train" if split == "train" else "eval"]
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    if not records:
        raise DataError(f"{path}: no records")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: record {i} is a {type(rec).__name__}, expected an object")
        for key, types in schema.items():
            if key not in rec:
                raise DataError(f"{path}: record {i} has no '{key}' (needs: {', '.join(schema)})")
            if not isinstance(rec[key], types) or isinstance(rec[key], bool):
                names = " or ".join(t.__name__ for t in types)
                raise DataError(f"{path}: record {i} '{key}' must be {names}, got {type(rec[key]).__name__}")
        if kind == "retrieval" and split != "train":
            if not rec["caption"] or not all(isinstance(c, str) for c in rec["caption"]):
                raise DataError(f"{path}: record {i} 'caption' must be a non-empty list of strings")
        if kind == "vqa" and split == "train" and not rec["answer"]:
            raise DataError(f"{path}: record {i} 'answer' is empty")
    if kind in ("retrieval", "caption"):
        (check_image_ids if split == "train" else check_unique_images)(records, path)


def check_image_ids(records: Sequence[Mapping], path: str) -> None:
    """One ``image_id`` per image and one image per ``image_id``: LAVIS's retrieval
    training takes captions with the same id as one image's (ITC's positives, ITM's
    excluded negatives), so ten images under id 0 would train as one."""
    image_of: dict[Any, tuple[int, str]] = {}
    id_of: dict[str, tuple[int, Any]] = {}
    for i, rec in enumerate(records):
        image, image_id = rec["image"], rec["image_id"]
        if image_id in image_of and image_of[image_id][1] != image:
            j, other = image_of[image_id]
            raise DataError(f"{path}: records {j} and {i} give image_id {image_id!r} to two images ('{other}' and "
                            f"'{image}'); an image_id names one image, whose captions are each other's positives: "
                            f"give each image its own id")
        if image in id_of and id_of[image][1] != image_id:
            j, other = id_of[image]
            raise DataError(f"{path}: records {j} and {i} give image '{image}' two image_ids ({other!r} and "
                            f"{image_id!r}); its captions would be trained as each other's negatives: use one id")
        image_of.setdefault(image_id, (i, image))
        id_of.setdefault(image, (i, image_id))


def check_unique_images(records: Sequence[Mapping], path: str) -> None:
    """An eval record holds all of an image's captions: an image listed twice would
    be scored as two images, each wrong for the other's captions."""
    seen: dict[str, int] = {}
    for i, rec in enumerate(records):
        if rec["image"] in seen:
            raise DataError(f"{path}: records {seen[rec['image']]} and {i} both list image '{rec['image']}'; "
                            f"an eval record holds all of an image's captions: merge them into one record")
        seen[rec["image"]] = i


def check_images(records: Sequence[Mapping], path: str, image_root: str, verify: str = "header") -> None:
    """Every referenced image exists and opens (``verify``: none, exists, header, full)."""
    if verify == "none":
        return
    seen: set[str] = set()
    for i, rec in enumerate(records):
        name = rec["image"]
        if name in seen:
            continue
        seen.add(name)
        file = os.path.join(image_root, name)
        if not os.path.isfile(file):
            raise DataError(f"{path}: record {i}: image '{name}' not found under {image_root}")
        if verify == "exists":
            continue
        try:
            with Image.open(file) as img:
                if verify == "full":
                    img.load()
                else:
                    img.verify()
        except Exception as err:
            raise DataError(f"{path}: record {i}: cannot read image {file} ({err})") from err


def lavis_caption_image_id(image: str) -> int:
    """The id LAVIS's COCOCapEvalDataset parses from a file name (coco_caption_datasets.py:42)."""
    return int(image.split("/")[-1].strip(".jpg").split("_")[-1])


def check_caption_gt(records: Sequence[Mapping], path: str, gt_path: str) -> None:
    """The COCO-style ground truth covers exactly the images of the eval split."""
    gt = load_json(gt_path, f"caption ground truth for {path}")
    if not isinstance(gt, dict) or "images" not in gt or "annotations" not in gt:
        raise DataError(f"{gt_path}: expected COCO format {{'images': [...], 'annotations': [...]}}")
    gt_ids = {img.get("id") for img in gt["images"]}
    for j, ann in enumerate(gt["annotations"]):
        if not {"image_id", "caption", "id"} <= set(ann):
            raise DataError(f"{gt_path}: annotation {j} needs image_id, caption and id")
    for i, rec in enumerate(records):
        try:
            image_id = lavis_caption_image_id(rec["image"])
        except ValueError:
            raise DataError(
                f"{path}: record {i}: LAVIS reads the image id from the file name, so eval "
                f"images must be named like 'name_<int>.jpg' (got '{rec['image']}')"
            ) from None
        if image_id not in gt_ids:
            raise DataError(f"{path}: record {i}: image id {image_id} is not in {gt_path}")


def check_vqa_eval(ann_paths: Sequence[str], records: Sequence[Mapping]) -> None:
    """LAVIS's VQA eval files, in its order: records, answer list, questions, annotations."""
    path = ann_paths[0]
    if len(ann_paths) >= 2:
        answers = load_json(ann_paths[1], "VQA answer list")
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise DataError(f"{ann_paths[1]}: the answer list must be a JSON list of strings")
    if len(ann_paths) == 3:
        raise DataError(f"{path}: give both the questions and the annotations file (LAVIS order: "
                        "records, answer_list, questions, annotations), or neither")
    if len(ann_paths) < 4:
        return
    questions = load_json(ann_paths[2], "VQA questions")
    annotations = load_json(ann_paths[3], "VQA annotations")
    if not isinstance(questions, dict) or "questions" not in questions:
        raise DataError(f"{ann_paths[2]}: expected VQA-API questions {{'questions': [...], ...}}")
    if not isinstance(annotations, dict) or "annotations" not in annotations:
        raise DataError(f"{ann_paths[3]}: expected VQA-API annotations {{'annotations': [...]}}")
    qids = _ids(questions["questions"], ann_paths[2])
    aids = _ids(annotations["annotations"], ann_paths[3])
    rids = {rec["question_id"] for rec in records}
    for name, ids in ((ann_paths[2], qids), (ann_paths[3], aids)):
        if ids != rids:
            missing = sorted(rids - ids)[:5]
            extra = sorted(ids - rids)[:5]
            raise DataError(
                f"{name}: question ids must equal those of {path} "
                f"(missing e.g. {missing}, extra e.g. {extra})"
            )


def _ids(items: Iterable[Mapping], path: str) -> set[int]:
    ids = set()
    for j, item in enumerate(items):
        if not isinstance(item.get("question_id"), int):
            raise DataError(f"{path}: entry {j} needs an integer question_id")
        ids.add(item["question_id"])
    return ids
