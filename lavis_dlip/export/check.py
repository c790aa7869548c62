"""An export compared with the PyTorch model it came from, on the same inputs.

Each comparison returns the largest absolute difference per output (fp32); generated
text must match token for token or the check fails. Inputs are a few synthetic
images (random pixels through the exported preprocessing) and fixed strings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lavis_dlip.blip import passes
from lavis_dlip.errors import ConfigError
from lavis_dlip.export.hf import HF_CLASSES, task_of
from lavis_dlip.serve import load

TEXTS = ["a red circle in the top left", "two blue squares on a white background", "a picture of a dog"]
QUESTIONS = ["what color is the circle?", "how many shapes are there?", "is there a red square?"]
# the largest absolute difference (fp32) an export may show and still pass
TOLERANCE = {"onnx": 1e-4, "hf": 1e-4}


def example_images(n: int = 3, size: int = 96, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def lavis_reference(model: torch.nn.Module, task: str, pixels: np.ndarray, gen: dict) -> dict[str, Any]:
    """What LAVIS's own code computes for the example inputs."""
    image = torch.from_numpy(pixels)
    tok = model.tokenizer
    ref: dict[str, Any] = {}
    with torch.no_grad():
        embeds = model.visual_encoder.forward_features(image)
        ref["image_embeds"] = embeds.numpy()
        if task == "retrieval":
            text = tok(TEXTS, padding="longest", truncation=True, max_length=model.max_txt_len, return_tensors="pt")
            out = model.text_encoder(text.input_ids, attention_mask=text.attention_mask, return_dict=True,
                                     mode="text")
            ref["text_feat"] = passes.text_feat(model, out.last_hidden_state)
            ref["image_feat"] = passes.image_feat(model, embeds)
            ids = passes.with_enc(text.input_ids, tok.enc_token_id)
            ref["itm_prob"] = passes.itm_logits(model, ids, text.attention_mask, embeds).softmax(-1)[:, 1]
        elif task == "caption":
            ref["text"] = model.generate({"image": image}, num_beams=1, max_length=gen["max_len"],
                                         min_length=gen["min_len"])
        else:
            ref["text"] = model.predict_answers({"image": image, "text_input": QUESTIONS}, num_beams=1,
                                                inference_method="generate", max_len=gen["max_len"],
                                                min_len=gen["min_len"])
    return {k: v.numpy() if torch.is_tensor(v) else v for k, v in ref.items()}


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def compare_onnx(model: torch.nn.Module, directory: Path) -> dict[str, float]:
    served = load(directory)
    task = served.cfg["task"]
    images = example_images()
    pixels = served.pixels(images)
    ref = lavis_reference(model, task, pixels, served.cfg.get("generate", {}))
    diffs = {"image_embeds": _diff(served.image_embeds(images), ref["image_embeds"])}
    if task == "retrieval":
        embeds, feats = served.image_features(images)
        diffs["image_feat"] = _diff(feats, ref["image_feat"])
        diffs["text_feat"] = _diff(served.text_features(TEXTS), ref["text_feat"])
        diffs["itm_prob"] = _diff(served.itm(TEXTS, embeds), ref["itm_prob"])
    else:
        text = served.caption(images) if task == "caption" else served.answer(images, QUESTIONS)
        if text != ref["text"]:
            raise ConfigError(f"ONNX export of {directory}: generated text differs from LAVIS's: "
                              f"{text!r} vs {ref['text']!r}")
    return diffs


def compare_hf(model: torch.nn.Module, directory: Path) -> dict[str, float]:
    import transformers
    from transformers import BlipProcessor

    task = task_of(model)
    hf_model = getattr(transformers, HF_CLASSES[task]).from_pretrained(str(directory)).eval()
    processor = BlipProcessor.from_pretrained(str(directory))
    images = example_images()
    pixels = processor(images=images, return_tensors="np")["pixel_values"].astype(np.float32)
    gen = {"max_len": 20, "min_len": 5} if task == "caption" else {"max_len": 10, "min_len": 1}
    ref = lavis_reference(model, task, pixels, gen)
    diffs: dict[str, float] = {}
    with torch.no_grad():
        pv = torch.from_numpy(pixels)
        diffs["image_embeds"] = _diff(hf_model.vision_model(pv)[0].numpy(), ref["image_embeds"])
        if task == "retrieval":
            text = processor(text=TEXTS, padding="longest", return_tensors="pt")
            ids = passes.with_enc(text.input_ids, model.tokenizer.enc_token_id)  # BLIP's ITM input (see export/hf.py)
            itm = hf_model(input_ids=ids, pixel_values=pv, attention_mask=text.attention_mask, use_itm_head=True)
            diffs["itm_prob"] = _diff(itm.itm_score.softmax(-1)[:, 1].numpy(), ref["itm_prob"])
            sim = hf_model(input_ids=text.input_ids, pixel_values=pv, attention_mask=text.attention_mask,
                           use_itm_head=False).itm_score
            diffs["itc_sim"] = _diff(sim.numpy(), ref["image_feat"] @ ref["text_feat"].T)
            return diffs
        if task == "caption":
            prompt = processor(text=[model.prompt] * len(images), return_tensors="pt")
            out = hf_model.generate(pixel_values=pv, input_ids=prompt.input_ids, num_beams=1,
                                    max_length=gen["max_len"], min_length=gen["min_len"])
            text = [t[len(model.prompt):] for t in processor.batch_decode(out, skip_special_tokens=True)]
        else:
            q = processor(text=QUESTIONS, padding="longest", return_tensors="pt")
            ids = passes.with_enc(q.input_ids, model.tokenizer.enc_token_id)
            out = hf_model.generate(pixel_values=pv, input_ids=ids, attention_mask=q.attention_mask, num_beams=1,
                                    max_length=gen["max_len"], min_length=gen["min_len"])
            text = processor.batch_decode(out, skip_special_tokens=True)
    if text != ref["text"]:
        raise ConfigError(f"transformers export of {directory}: generated text differs from LAVIS's: "
                          f"{text!r} vs {ref['text']!r}")
    return diffs


def compare(model: torch.nn.Module, directory: Path, fmt: str) -> dict[str, float]:
    """Largest absolute difference per output; raises if any exceeds ``TOLERANCE`` or
    if generated text differs."""
    diffs = compare_onnx(model, directory) if fmt == "onnx" else compare_hf(model, directory)
    worst = max(diffs, key=diffs.get)
    if diffs[worst] > TOLERANCE[fmt]:
        raise ConfigError(f"{fmt} export of {directory}: {worst} differs from the PyTorch model by "
                          f"{diffs[worst]:.2e} (tolerance {TOLERANCE[fmt]:g})")
    return diffs
