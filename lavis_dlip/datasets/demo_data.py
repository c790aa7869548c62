"""The embedded demo data: rendered scenes whose captions and questions say what is drawn.

Each image shows one to three shapes (circle, square, triangle, diamond) in six
colours, two sizes, on a 3x3 grid of positions, over one of three backgrounds.
Captions describe them with varied wording (colours, shapes, sizes, positions,
counts); questions ask for counts, colours, shapes, positions and yes/no facts.
Everything is a pure function of the preset (seeded), written once to a cache
directory in LAVIS's formats and reused; nothing binary is committed.

Run yaml files point at it with the resolver ``${dlip_demo_data:PRESET}``, which
generates the data on first use and returns its directory::

    datasets:
      dlip_local_retrieval:
        base_dir: ${dlip_demo_data:demo}

CLI: ``python -m lavis_dlip.datasets.demo_data --preset demo`` prints the directory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from PIL import Image, ImageDraw

VERSION = 1
PRESETS_FILE = Path(__file__).resolve().parent.parent / "configs" / "datasets" / "demo_data.yaml"
ENV_ROOT = "LAVIS_DLIP_DATA_ROOT"

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 210, 40), "purple": (140, 60, 180), "orange": (240, 140, 30),
}
BACKGROUNDS = {"black": (15, 15, 15), "white": (240, 240, 240), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.08, "large": 0.15}
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}


@dataclass(frozen=True)
class Preset:
    seed: int
    image_size: int
    train_images: int
    val_images: int
    test_images: int
    captions_per_train_image: int
    captions_per_eval_image: int
    questions_per_image: int
    caption_train_per_image: int  # of the training captions, how many the captioning split uses


def load_preset(name: str) -> Preset:
    presets = OmegaConf.to_container(OmegaConf.load(PRESETS_FILE).presets)
    if name not in presets:
        raise KeyError(f"unknown demo data preset '{name}' (known: {', '.join(presets)}; see {PRESETS_FILE})")
    return Preset(**presets[name])


# ----------------------------------------------------------------------------- scenes
def _position_phrase(row: str, col: str) -> str:
    if row == "middle" and col == "center":
        return "in the center"
    if row == "middle":
        return f"on the {col}"
    if col == "center":
        return f"at the {row}"
    return f"in the {row} {col}"


def _position_answer(row: str, col: str) -> str:
    if row == "middle" and col == "center":
        return "center"
    if row == "middle":
        return col
    if col == "center":
        return row
    return f"{row} {col}"


def sample_scene(rng: random.Random) -> dict[str, Any]:
    n = rng.choice((1, 1, 2, 2, 3))
    cells = rng.sample([(r, c) for r in ROWS for c in COLS], n)
    objects = [
        {"shape": rng.choice(SHAPES), "color": rng.choice(list(COLORS)),
         "size": rng.choice(list(SIZES)), "row": r, "col": c}
        for r, c in cells
    ]
    return {"background": rng.choice(list(BACKGROUNDS)), "objects": objects}


def render(scene: dict[str, Any], size: int, rng: random.Random) -> Image.Image:
    scale = 4  # draw large, then downsample: anti-aliased edges
    big = size * scale
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene["background"]])
    draw = ImageDraw.Draw(img)
    for obj in scene["objects"]:
        cx = (COLS.index(obj["col"]) + 0.5) / 3 + rng.uniform(-0.03, 0.03)
        cy = (ROWS.index(obj["row"]) + 0.5) / 3 + rng.uniform(-0.03, 0.03)
        r = SIZES[obj["size"]] * rng.uniform(0.9, 1.1)
        x, y, rr = cx * big, cy * big, r * big
        fill = COLORS[obj["color"]]
        if obj["shape"] == "circle":
            draw.ellipse((x - rr, y - rr, x + rr, y + rr), fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle((x - rr, y - rr, x + rr, y + rr), fill=fill)
        elif obj["shape"] == "triangle":
            draw.polygon([(x, y - rr), (x - rr, y + rr), (x + rr, y + rr)], fill=fill)
        else:
            draw.polygon([(x, y - rr), (x + rr, y), (x, y + rr), (x - rr, y)], fill=fill)
    return img.resize((size, size), Image.LANCZOS)


def _describe(obj: dict[str, Any], with_size: bool, with_pos: bool) -> str:
    words = [obj["size"]] if with_size else []
    words += [obj["color"], obj["shape"]]
    if with_pos:
        words.append(_position_phrase(obj["row"], obj["col"]))
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


def caption(scene: dict[str, Any], rng: random.Random) -> str:
    objs, bg = scene["objects"], scene["background"]
    n = len(objs)
    style = rng.randrange(5)
    parts = [_describe(o, with_size=style in (0, 2), with_pos=style in (1, 2, 4)) for o in objs]
    listing = parts[0] if n == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    shapes = {o["shape"] for o in objs}
    if style == 3 and n > 1 and len(shapes) == 1 and len({o["color"] for o in objs}) == 1:
        return f"{COUNT_WORDS[n]} {objs[0]['color']} {objs[0]['shape']}s on a {bg} background"
    if style == 3:
        plural = "shape" if n == 1 else "shapes"
        return f"{COUNT_WORDS[n]} {plural} on a {bg} background: {listing}"
    if style == 4:
        return f"a {bg} picture with {listing}"
    lead = rng.choice(("", "there is ", "an image of ", "a picture showing "))
    return f"{lead}{listing}".strip()


def questions(scene: dict[str, Any], rng: random.Random, k: int) -> list[tuple[str, str]]:
    objs = scene["objects"]
    pool: list[tuple[str, str]] = [
        (rng.choice(("how many shapes are there?", "how many objects are in the picture?")), str(len(objs))),
        ("what color is the background?", scene["background"]),
    ]
    by_shape = {}
    for o in objs:
        by_shape.setdefault(o["shape"], []).append(o)
    for shape, items in by_shape.items():
        if len(items) == 1:
            o = items[0]
            pool.append((f"what color is the {shape}?", o["color"]))
            pool.append((f"where is the {shape}?", _position_answer(o["row"], o["col"])))
    by_color = {}
    for o in objs:
        by_color.setdefault(o["color"], []).append(o)
    for color, items in by_color.items():
        if len(items) == 1:
            pool.append((f"what shape is {color}?", items[0]["shape"]))
    present = {(o["color"], o["shape"]) for o in objs}
    if rng.random() < 0.5:
        color, shape = rng.choice(sorted(present))
    else:
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    pool.append((f"is there a {color} {shape}?", "yes" if (color, shape) in present else "no"))
    rng.shuffle(pool)
    return pool[:k]


ANSWERS = sorted(
    {str(n) for n in COUNT_WORDS} | set(COLORS) | set(BACKGROUNDS) | set(SHAPES) | {"yes", "no"}
    | {_position_answer(r, c) for r in ROWS for c in COLS}
)


# ----------------------------------------------------------------------------- files
def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj))


def generate(preset: Preset, out: Path) -> None:
    """Write the data set into ``out`` (images/, annotation json in LAVIS formats)."""
    rng = random.Random(preset.seed)
    counts = {"train": preset.train_images, "val": preset.val_images, "test": preset.test_images}
    next_id, qid = 0, 0
    files: dict[str, Any] = {}
    for split, count in counts.items():
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        retrieval, captions_eval, gt_images, gt_anns, vqa, vqa_questions, vqa_anns = [], [], [], [], [], [], []
        for _ in range(count):
            scene = sample_scene(rng)
            image_id = next_id
            next_id += 1
            name = f"{split}/demo_{image_id:06d}.jpg"
            render(scene, preset.image_size, rng).save(out / "images" / name, quality=95)
            n_caps = preset.captions_per_train_image if split == "train" else preset.captions_per_eval_image
            caps = [caption(scene, rng) for _ in range(n_caps)]
            if split == "train":
                retrieval += [{"image": name, "caption": c, "image_id": image_id} for c in caps]
            else:
                retrieval.append({"image": name, "caption": caps})
                captions_eval.append({"image": name})
                gt_images.append({"id": image_id})
                gt_anns += [{"image_id": image_id, "caption": c, "id": len(gt_anns)} for c in caps]
            for question, answer in questions(scene, rng, preset.questions_per_image):
                qid += 1
                if split == "train":
                    vqa.append({"question_id": qid, "image": name, "question": question, "answer": [answer]})
                    continue
                vqa.append({"question_id": qid, "image": name, "question": question})
                vqa_questions.append({"question_id": qid, "image_id": image_id, "question": question})
                vqa_anns.append({
                    "question_id": qid, "image_id": image_id, "question_type": question.split()[0],
                    "answer_type": "yes/no" if answer in ("yes", "no") else (
                        "number" if answer.isdigit() else "other"),
                    "multiple_choice_answer": answer,
                    "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)],
                })
        files[f"retrieval_{split}.json"] = retrieval
        files[f"vqa_{split}.json"] = vqa
        if split == "train":
            files["pairs_train.json"] = [{"image": r["image"], "caption": r["caption"]} for r in retrieval]
            files["caption_train.json"] = [r for i, r in enumerate(retrieval)
                                           if i % preset.captions_per_train_image < preset.caption_train_per_image]
        else:
            files[f"caption_{split}.json"] = captions_eval
            files[f"caption_{split}_gt.json"] = {"images": gt_images, "annotations": gt_anns}
            files[f"vqa_{split}_questions.json"] = {
                "info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {},
                "data_subtype": f"demo_{split}", "questions": vqa_questions,
            }
            files[f"vqa_{split}_annotations.json"] = {
                "info": {}, "license": {}, "data_type": "mscoco", "data_subtype": f"demo_{split}",
                "annotations": vqa_anns,
            }
    files["vqa_answer_list.json"] = ANSWERS
    files["preset.json"] = {"version": VERSION, **asdict(preset)}
    for name, obj in files.items():
        _write_json(out / name, obj)


def data_root() -> Path:
    return Path(os.environ.get(ENV_ROOT) or Path.home() / ".cache" / "lavis_dlip" / "demo_data")


def ensure(name: str = "demo") -> Path:
    """The directory of preset ``name``, generated on first use (safe under torchrun:
    each process writes a private copy and the first rename wins)."""
    preset = load_preset(name)
    digest = hashlib.sha1(json.dumps([VERSION, asdict(preset)]).encode()).hexdigest()[:8]
    target = data_root() / f"{name}-v{VERSION}-{digest}"
    if (target / "preset.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        from tqdm.auto import tqdm

        with tqdm(total=1, desc=f"generating demo data '{name}' in {target}", disable=None):
            generate(preset, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "preset.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def demo_data_dir(name: str = "demo") -> str:
    return str(ensure(name))


def register_resolver() -> None:
    """``${dlip_demo_data:NAME}`` in any yaml loaded after ``import lavis_dlip``."""
    if OmegaConf.has_resolver("dlip_demo_data"):
        return
    from omegaconf import version

    if tuple(int(x) for x in version.__version__.split(".")[:2]) >= (2, 4):
        OmegaConf.register_resolver("dlip_demo_data", demo_data_dir)
    else:  # omegaconf < 2.4 has only the name register_new_resolver
        OmegaConf.register_new_resolver("dlip_demo_data", demo_data_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    args = parser.parse_args()
    print(ensure(args.preset))


if __name__ == "__main__":
    main()
