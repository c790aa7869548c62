"""Distillation end to end on CPU: a teacher trained here, distilled with
`python -m lavis_dlip.train`, evaluated with `.evaluate` and loaded with LAVIS's
`load_model`; the teacher stays frozen, outside the optimizer and checkpoints."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import CONFIGS, SMOKE_RETRIEVAL, check, output_dirs, read_metrics, run_main

RECALLS = {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10"}


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory, demo_test_data):
    out = tmp_path_factory.mktemp("teacher")
    # the teacher's quality is not what is tested: trained on the smoke data
    check(run_main("lavis_dlip.train", CONFIGS / "teacher_retrieval.yaml", f"run.output_dir={out}", SMOKE_RETRIEVAL,
                   cwd=out))
    return output_dirs(out)[0] / "checkpoint_best.pth"


def _train_logs(job) -> list[dict]:
    lines = (job / "log.txt").read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith('{"train_')]


def _check_student_checkpoint(cfg, ckpt, arch: str, test: dict, tmp_path, data: str, reevaluate: bool = True
                              ) -> None:
    """The checkpoint holds the student and its projections, nothing of the teacher;
    LAVIS's load_model takes it, and re-evaluating it gives the run's test metrics."""
    from lavis.models import load_model

    state = torch.load(ckpt, map_location="cpu", weights_only=False)["model"]
    own = load_model(arch, "test", checkpoint=str(ckpt)).state_dict()
    assert set(state) - set(own) == {k for k in state if k.startswith("dlip_distill.")} != set()
    assert all(torch.equal(own[k], state[k]) for k in own)
    if not reevaluate:
        return
    again = run_main("lavis_dlip.evaluate", cfg, f"run.output_dir={tmp_path}/again", data, cwd=tmp_path,
                    extra=["--checkpoint", str(ckpt)])
    check(again)
    assert read_metrics(output_dirs(tmp_path / "again")[0])["test"] == pytest.approx(test)


def test_distill_retrieval_trains_evaluates_and_loads(tmp_path, teacher_checkpoint):
    cfg = CONFIGS / "distill_retrieval.yaml"
    check(run_main("lavis_dlip.train", cfg, f"run.output_dir={tmp_path}/run", SMOKE_RETRIEVAL,
                  f"distill.teacher.checkpoint={teacher_checkpoint}", cwd=tmp_path))
    job = output_dirs(tmp_path / "run")[0]
    test = read_metrics(job)["test"]
    assert RECALLS <= set(test)

    logs = _train_logs(job)
    terms = {"itc", "itm", "itc_kd", "itm_kd", "hidden_vision", "attention_fusion_cross", "embed"}
    assert {f"train_loss_{t}" for t in terms} <= set(logs[0])
    assert float(logs[-1]["train_loss_itc_kd"]) < float(logs[0]["train_loss_itc_kd"])  # it learns from the teacher

    _check_student_checkpoint(cfg, job / "checkpoint_best.pth", "dlip_retrieval", test, tmp_path, SMOKE_RETRIEVAL)


@pytest.mark.parametrize("name, arch, metrics, terms, kept", [
    ("distill_caption", "dlip_caption", {"Bleu_4", "CIDEr", "ROUGE_L", "agg_metrics"},
     {"lm", "lm_kd", "hidden_decoder", "attention_decoder_cross", "embed"}, "checkpoint_best.pth"),
    ("distill_vqa", "dlip_vqa", {"agg_metrics", "other", "yes/no", "number"},
     {"task", "lm_kd", "hidden_fusion", "hidden_decoder", "attention_decoder_cross"},
     "checkpoint_1.pth"),  # no val split: one checkpoint per epoch, as LAVIS keeps them
])
def test_distill_finetune_generation_tasks_train_evaluate_and_load(tmp_path, demo_test_data, name, arch, metrics,
                                                                    terms, kept):
    """Captioning and VQA: distilled with their decoder terms, scored with LAVIS's
    metrics (COCO caption scores; VQA accuracy), reloaded for evaluation."""
    cfg = CONFIGS / f"{name}.yaml"
    # VQA on the smoke data (192 questions); captioning's decoder needs the test data's 384 captions to move
    preset = "smoke" if name == "distill_vqa" else "test"
    data = f"datasets.dlip_local_{name.split('_')[1]}.base_dir=${{dlip_demo_data:{preset}}}"
    check(run_main("lavis_dlip.train", cfg, f"run.output_dir={tmp_path}/run", data, cwd=tmp_path))
    job = output_dirs(tmp_path / "run")[0]
    test = read_metrics(job)["test"]
    assert metrics <= set(test) and 0.0 < test["agg_metrics"]

    logs = _train_logs(job)
    assert {f"train_loss_{t}" for t in terms} <= set(logs[0])
    # the student's decoder moves toward the (random, wider) teacher's states
    assert float(logs[-1]["train_loss_hidden_decoder"]) < 0.7 * float(logs[0]["train_loss_hidden_decoder"])

    if kept != "checkpoint_best.pth":  # written once per epoch, stored once
        assert os.path.samefile(job / kept, job / "checkpoint_latest.pth")
    # re-evaluated for captioning; VQA's evaluation from a checkpoint is tests/test_train_eval.py's
    _check_student_checkpoint(cfg, job / kept, arch, test, tmp_path, data, reevaluate=arch != "dlip_vqa")


def test_distill_pretrain_keeps_teacher_frozen_and_out_of_the_runner(tmp_path, demo_test_data, monkeypatch):
    import lavis.tasks as tasks
    from lavis.common.registry import registry
    from lavis.models import load_model

    from lavis_dlip.cli import setup_seeds
    from lavis_dlip.config import load_config

    monkeypatch.chdir(tmp_path)
    smoke = [f"datasets.{name}.base_dir=${{dlip_demo_data:smoke}}"
             for name in ("dlip_local_pairs", "dlip_local_retrieval")]
    cfg = load_config(str(CONFIGS / "distill_pretrain.yaml"), [f"run.output_dir={tmp_path}/run", *smoke])
    setup_seeds(cfg.run_cfg)
    task = tasks.setup_task(cfg)
    datasets = task.build_datasets(cfg)
    model = task.build_model(cfg)
    teacher = task.teacher.model
    before = {k: v.clone() for k, v in teacher.state_dict().items()}

    runner = registry.get_runner_class("runner_dlip")(cfg=cfg, job_id="job", task=task, model=model,
                                                      datasets=datasets)
    metrics = runner.train()
    assert RECALLS <= set(metrics["test"])  # zero-shot retrieval of a pre-trained student

    after = teacher.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert next(teacher.parameters()).device == runner.device
    optimised = {id(p) for group in runner.optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in teacher.parameters()}
    assert {id(p) for p in model.dlip_distill.parameters()} <= optimised

    job = tmp_path / "run" / "job"
    logs = _train_logs(job)
    expected = {"train_loss_lm_kd", "train_loss_attention_decoder", "train_loss_hidden_text", "train_loss_embed"}
    assert expected <= set(logs[0])
    best = job / "checkpoint_best.pth"
    state = torch.load(best, map_location="cpu", weights_only=False)["model"]
    assert set(state) == set(model.state_dict())  # the student (with projections) only

    pretrained = load_model("dlip_pretrain", "test", checkpoint=str(best))
    assert torch.equal(pretrained.text_decoder.cls.predictions.decoder.weight,
                       state["text_decoder.cls.predictions.decoder.weight"])
    # a pre-trained student starts a retrieval model: its decoder is dropped, its queues are new
    retrieval = load_model("dlip_retrieval", "test", checkpoint=str(best))
    assert torch.equal(retrieval.visual_encoder.blocks[1].mlp.fc1.weight,
                       state["visual_encoder.blocks.1.mlp.fc1.weight"])


@pytest.mark.parametrize("option, message", [
    ("distill.terms.0.name=itc_dk", r"distill.terms\[0\].name: 'itc_dk' is not a loss term"),
    ("distill.teacher.arch=blip_retreival", r"distill.teacher.arch: 'blip_retreival' is not a registered"),
    ("distill.teacher.model_type=huge", r"distill.teacher.model_type: 'huge' is not a type of 'dlip_pretrain'"),
    ("distill.teacher.checkpont=x", r"distill.teacher.*checkpont.*checkpoint"),
    ("distill.terms.3.temperature=-1", r"distill.terms\[3\].temperature: must be > 0"),
])
def test_distill_config_errors_name_the_key(tmp_path, demo_test_data, option, message):
    proc = run_main("lavis_dlip.train", CONFIGS / "distill_pretrain.yaml", option, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert pytest.importorskip("re").search(message, proc.stderr), proc.stderr[-2000:]
