"""LAVIS's `load_model_and_preprocess` gives DLIP students and processors that
work on a PIL image and a string (the snippets of docs/usage.md)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def image(demo_test_data) -> Image.Image:
    return Image.open(sorted((demo_test_data / "images" / "test").glob("*.jpg"))[0]).convert("RGB")


def test_retrieval_scores_a_pil_image_and_a_string(image, tmp_path):
    from lavis.models import load_model_and_preprocess

    model, vis, txt = load_model_and_preprocess("dlip_retrieval", "test", is_eval=True)
    torch.save({"model": model.state_dict()}, tmp_path / "student.pth")
    model.load_checkpoint(str(tmp_path / "student.pth"))  # how a distilled checkpoint is loaded
    samples = {"image": vis["eval"](image).unsqueeze(0), "text_input": [txt["eval"]("A red circle, top left.")]}
    itm = model.match(samples, match_head="itm")
    itc = model.match(samples, match_head="itc")
    assert itm.shape == (1, 2) and itc.shape == (1, 1) and -1.0 <= itc.item() <= 1.0
    feats = model.extract_features(samples, mode="multimodal")
    assert feats.multimodal_embeds.shape[0] == 1
    image_feat = model.extract_features(samples, mode="image").image_embeds_proj[:, 0]
    text_feat = model.extract_features(samples, mode="text").text_embeds_proj[:, 0]
    assert torch.allclose(image_feat @ text_feat.t(), itc, atol=1e-5)


def test_captioning_and_vqa_answer_for_a_pil_image(image):
    from lavis.models import load_model_and_preprocess

    model, vis, _ = load_model_and_preprocess("dlip_caption", "test", is_eval=True)
    captions = model.generate({"image": vis["eval"](image).unsqueeze(0)}, num_beams=2, max_length=12, min_length=3)
    assert len(captions) == 1 and isinstance(captions[0], str)

    model, vis, txt = load_model_and_preprocess("dlip_vqa", "test", is_eval=True)
    answers = model.predict_answers({"image": vis["eval"](image).unsqueeze(0),
                                     "text_input": [txt["eval"]("What color is the circle?")]},
                                    inference_method="generate", max_len=5, min_len=1)
    assert len(answers) == 1 and isinstance(answers[0], str)
