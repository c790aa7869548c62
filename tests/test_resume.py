"""A run killed after a checkpoint resumes and ends exactly where an uninterrupted
run ends; checkpoints are written atomically."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import CONFIGS, SMOKE_RETRIEVAL, check, output_dirs, read_metrics, run_main

EPOCHS = "run.max_epoch=2"


def test_killed_run_resumes_to_identical_metrics(tmp_path, demo_test_data):
    cfg = CONFIGS / "retrieval.yaml"
    full = run_main("lavis_dlip.train", cfg, EPOCHS, SMOKE_RETRIEVAL, f"run.output_dir={tmp_path}/full", cwd=tmp_path)
    check(full)
    expected = read_metrics(output_dirs(tmp_path / "full")[0])

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "lavis_dlip.train", "--cfg-path", str(cfg), "--options", EPOCHS, SMOKE_RETRIEVAL,
           f"run.output_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    latest = None
    while time.time() < deadline and proc.poll() is None:
        found = list(out.rglob("checkpoint_latest.pth"))
        if found:
            latest = found[0]
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest is not None and proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = torch.load(latest, map_location="cpu", weights_only=False)["epoch"]
    assert killed_at < 1 and not (latest.parent / "metrics.json").exists()

    # A kill between an evaluation and the next checkpoint leaves a line the resumed run writes again.
    records = latest.parent / "evaluate.txt"
    with open(records, "a") as f:
        f.write('{"written": "after the checkpoint, by the killed run"}\n')
    resumed = run_main("lavis_dlip.train", cfg, EPOCHS, SMOKE_RETRIEVAL, f"run.output_dir={out}",
                      f"run.resume_ckpt_path={latest}", cwd=tmp_path)
    check(resumed)
    got = read_metrics(latest.parent)  # a resumed run continues in its checkpoint's directory
    assert got == expected  # bitwise: every recall and the best epoch
    full_job = output_dirs(tmp_path / "full")[0]
    assert records.read_text() == (full_job / "evaluate.txt").read_text()  # each epoch's line once
    log = (latest.parent / "log.txt").read_text()
    assert f'"resume_start_epoch": {killed_at + 1}' in log


def test_atomic_save_keeps_the_last_good_file(tmp_path, monkeypatch):
    from lavis_dlip import checkpoint as ckpt

    path = tmp_path / "checkpoint_latest.pth"
    ckpt.atomic_save({"epoch": 1}, str(path))

    def torn_save(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_save({"epoch": 2}, str(path))
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["checkpoint_latest.pth"]


@pytest.mark.parametrize("links", [True, False])
def test_a_second_checkpoint_name_shares_the_bytes_and_saving_over_one_keeps_the_other(tmp_path, monkeypatch,
                                                                                       links):
    """checkpoint_0.pth and checkpoint_latest.pth of an epoch are one file on disk (a copy
    where hard links fail); the next epoch's save replaces the latest name only."""
    from lavis_dlip import checkpoint as ckpt

    if not links:
        monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(OSError("no hard links")))
    latest, epoch0 = tmp_path / "checkpoint_latest.pth", tmp_path / "checkpoint_0.pth"
    ckpt.atomic_save({"epoch": 0}, str(latest))
    ckpt.atomic_link(str(latest), str(epoch0))
    assert os.path.samefile(latest, epoch0) == links
    assert torch.load(epoch0, weights_only=False) == {"epoch": 0}

    ckpt.atomic_save({"epoch": 1}, str(latest))
    assert torch.load(epoch0, weights_only=False) == {"epoch": 0}
    assert torch.load(latest, weights_only=False) == {"epoch": 1}
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_0.pth", "checkpoint_latest.pth"]


def test_a_killed_save_is_cleaned_and_checkpoints_are_group_readable(tmp_path):
    """A kill mid-save (no exception handler runs) leaves a temporary file: the next
    save removes it. Checkpoints get the umask's permissions, like logs, not 0600."""
    from lavis_dlip import checkpoint as ckpt

    (tmp_path / ".tmp-checkpoint_latest.pthx1y2z3").write_bytes(b"half a checkpoint")
    (tmp_path / ".tmp-checkpoint_best.pthabc").write_bytes(b"another file's")
    old = os.umask(0o022)
    try:
        ckpt.atomic_save({"epoch": 3}, str(tmp_path / "checkpoint_latest.pth"))
        (tmp_path / "log.txt").write_text("a log")
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path)) == [".tmp-checkpoint_best.pthabc", "checkpoint_latest.pth", "log.txt"]
    mode = os.stat(tmp_path / "checkpoint_latest.pth").st_mode & 0o777
    assert mode == os.stat(tmp_path / "log.txt").st_mode & 0o777 == 0o644


def test_cpu_runs_keep_freed_memory_for_reuse():
    """After keep_freed_memory, a freed 64 MiB block is reused: allocating it again
    touches no new pages (glibc would otherwise map it fresh every time: 16,384 page faults)."""
    import resource

    from lavis_dlip.process import keep_freed_memory

    assert not keep_freed_memory({"keep_freed_memory": False}, torch.device("cpu"))
    assert not keep_freed_memory({}, torch.device("cuda"))
    assert keep_freed_memory({}, torch.device("cpu"))  # this machine's C library is glibc

    def faults() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.empty(16 * 2**20).fill_(1.0)  # 64 MiB
        del block
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    assert min(faults() for _ in range(4)) < 1000  # glibc's heap settles after a first round or two


def _interrupt_at(monkeypatch, sig: int, epoch: int, step: int) -> None:
    """Send this process ``sig`` from inside the training step at ``(epoch, step)``: a
    real signal, delivered mid-epoch where it would arrive from a scheduler or Ctrl-C."""
    from lavis_dlip.tasks.distill import DistillTaskMixin

    real = DistillTaskMixin.train_step

    def step_then_signal(self, model, samples):
        if (samples["epoch"], samples["iters"]) == (epoch, step):
            os.kill(os.getpid(), sig)
        return real(self, model, samples)

    monkeypatch.setattr(DistillTaskMixin, "train_step", step_then_signal)


@pytest.mark.parametrize("how", ["online", "cached", "mid-epoch"])
def test_interrupted_distillation_resumes_to_identical_metrics(how, tmp_path, monkeypatch, capsys):
    """A distillation run stopped mid-epoch (online: SIGINT; from a cache: SIGTERM; online
    with run.save_every_n_steps: SIGTERM after a mid-epoch checkpoint, resumed at its next
    batch) prints where its checkpoint is and how to resume, in one line; resumed so, it
    ends with the metrics.json of a run that was never stopped, bit for bit."""
    from lavis_dlip import cli
    from lavis_dlip.cache_teacher import build_cache
    from lavis_dlip.datasets.demo_data import ensure
    from lavis_dlip.train import main

    cfg = str(CONFIGS / "distill_retrieval.yaml")
    options = ["distill.teacher.load_weights=False", f"datasets.dlip_local_retrieval.base_dir={ensure('smoke')}",
               EPOCHS, "run.valid_splits=[]"]
    if how == "cached":
        options.append(f"distill.cache={{dir: {tmp_path / 'cache'}, augmentations: 2, dtype: float32}}")
        build_cache(cfg, options)
    if how == "mid-epoch":
        options.append("run.save_every_n_steps=2")
    cli.run(cfg, [*options, f"run.output_dir={tmp_path / 'full'}"])
    expected = read_metrics(output_dirs(tmp_path / "full")[0])
    assert expected["test"]["r_mean"] > 0

    sig, code, name = (signal.SIGINT, 130, "SIGINT") if how == "online" else (signal.SIGTERM, 143, "SIGTERM")
    where = "epoch 1, batch 2" if how == "mid-epoch" else "epoch 0"
    _interrupt_at(monkeypatch, sig, epoch=1, step=3)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # pytest-xdist's workers ignore SIGINT
    capsys.readouterr()
    try:
        assert main(["--cfg-path", cfg, "--options", *options, f"run.output_dir={tmp_path / 'stopped'}"]) == code
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    job = output_dirs(tmp_path / "stopped")[0]
    latest = job / "checkpoint_latest.pth"
    assert lines[0] == (f"error: stopped by {name}; the last checkpoint is {latest} ({where}); "
                        f"resume with --options run.resume_ckpt_path={latest}")
    assert not (job / "metrics.json").exists()
    monkeypatch.undo()

    assert main(["--cfg-path", cfg, "--options", *options, f"run.output_dir={tmp_path / 'stopped'}",
                 f"run.resume_ckpt_path={latest}"]) == 0
    assert read_metrics(job) == expected  # bitwise: every recall
    if how == "mid-epoch":  # and the epochs' losses
        logs = [[line for line in (j / "log.txt").read_text().splitlines() if "train_loss" in line]
                for j in (job, output_dirs(tmp_path / "full")[0])]
        assert [re.sub(r'"train_samples_per_s": "[^"]*"', "", line) for line in logs[0]] == \
            [re.sub(r'"train_samples_per_s": "[^"]*"', "", line) for line in logs[1]]
