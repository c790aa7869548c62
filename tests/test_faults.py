"""Faults during a run that must not lose work or mislead: a run that diverges, a
full disk during a save, two runs started in the same second, old checkpoints
piling up. Each stops with one line that says what was kept and how to go on."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, SMOKE_RETRIEVAL, output_dirs

RETRIEVAL = CONFIGS / "retrieval.yaml"
QUIET = ["run.progress=False", "run.valid_splits=[]", SMOKE_RETRIEVAL]  # runs and checkpoints, not learning


def train(capsys, *options: str) -> tuple[int, str]:
    """``python -m lavis_dlip.train`` in this process: (exit code, the error lines)."""
    from lavis_dlip.train import main

    capsys.readouterr()
    code = main(["--cfg-path", str(RETRIEVAL), "--options", *QUIET, *options])
    return code, "\n".join(line for line in capsys.readouterr().err.splitlines() if line.startswith("error: "))


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory, demo_test_data):
    """A run of one epoch (no validation: a checkpoint per epoch), to resume from."""
    import lavis_dlip.cli as cli

    out = tmp_path_factory.mktemp("one_epoch")
    cli.run(str(RETRIEVAL), [*QUIET, f"run.output_dir={out}", "run.max_epoch=1", "run.test_splits=[]"])
    return output_dirs(out)[0]


def test_a_diverging_run_stops_naming_step_and_lr_and_keeps_the_last_good_checkpoint(one_epoch, tmp_path,
                                                                                      capsys):
    latest = one_epoch / "checkpoint_latest.pth"
    before = latest.read_bytes()
    code, line = train(capsys, f"run.resume_ckpt_path={latest}", "run.max_epoch=2", "run.init_lr=1e6",
                       "run.warmup_lr=1e6", "run.test_splits=[]")
    assert code == 2, line
    assert "training diverged at epoch 1, step" in line and "run.init_lr (now 1000000.0)" in line, line
    assert f"the last good checkpoint is {latest} (epoch 0)" in line, line
    assert latest.read_bytes() == before and not (one_epoch / "checkpoint_1.pth").exists()
    assert len(line.splitlines()) == 1


def test_a_full_disk_during_a_save_names_the_file_and_keeps_the_previous_one(one_epoch, tmp_path, capsys,
                                                                            monkeypatch):
    """torch's zip writer on a full disk says "unexpected pos ...": the run says which file
    and why, the previous checkpoint stays whole, and it says how to resume."""
    import shutil

    from lavis_dlip import checkpoint

    job = tmp_path / "job"
    shutil.copytree(one_epoch, job)
    latest = job / "checkpoint_latest.pth"
    before = latest.read_bytes()
    real_save = torch.save

    def full_disk_save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "optimizer" in obj:  # a runner checkpoint
            f.write(b"a few bytes")
            raise RuntimeError("[enforce fail at inline_container.cc:783] . unexpected pos 3456 vs 3400")
        return real_save(obj, f, *args, **kwargs)

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(torch, "save", full_disk_save)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage._replace(free=4096))
    code, line = train(capsys, f"run.resume_ckpt_path={latest}", "run.max_epoch=2", "run.test_splits=[]")
    assert code == 2, line
    assert f"cannot write {latest}: no space left on the device" in line, line
    assert "the previous file is kept" in line and f"resume with --options run.resume_ckpt_path={latest}" in line
    assert latest.read_bytes() == before and not [p for p in os.listdir(job) if p.startswith(".tmp-")]


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    from lavis_dlip.runs import claim_job_dir, is_job_id

    claimed: list[Path] = []
    start = threading.Barrier(8)

    def claim():
        start.wait()
        claimed.append(claim_job_dir(tmp_path / "out", "20261201120000"))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    names = sorted(p.name for p in claimed)
    assert len(set(names)) == 8 and names[0] == "20261201120000"
    assert set(names[1:]) == {f"20261201120000-{n}" for n in range(2, 9)}
    assert all(is_job_id(n) for n in names) and not is_job_id("20261201120000-1") and not is_job_id("2026120112000")


def test_two_runners_with_one_job_id_write_apart(one_epoch, tmp_path, capsys, monkeypatch):
    """The runner claims its directory when it starts writing: the second run of the same
    second trains into ``<id>-2``, and the first run's files are untouched."""
    import lavis_dlip.cli as cli

    monkeypatch.setattr(cli, "make_job_id", lambda: "20261201120000")
    first = one_epoch.parent / "20261201120000"
    first.mkdir()
    (first / "log.txt").write_text("the first run's log\n")
    cli.run(str(RETRIEVAL), [*QUIET, f"run.output_dir={one_epoch.parent}", "run.max_epoch=1",
                             "run.test_splits=[]"])
    assert (first / "log.txt").read_text() == "the first run's log\n"
    assert (one_epoch.parent / "20261201120000-2" / "checkpoint_latest.pth").is_file()


def test_keep_checkpoints_keeps_the_newest_epochs_and_the_latest(one_epoch, tmp_path):
    """``run.keep_checkpoints: 2``, resumed after epoch 0 to three epochs: the checkpoints of
    epochs 1 and 2 and the latest (epoch 2, the same file) stay; epoch 0's goes."""
    import lavis_dlip.cli as cli

    cli.run(str(RETRIEVAL), [*QUIET, f"run.output_dir={tmp_path}", "run.max_epoch=3", "run.test_splits=[]",
                             "run.keep_checkpoints=2", f"run.resume_ckpt_path={_copy(one_epoch, tmp_path)}"])
    job = tmp_path / "resumed"
    kept = sorted(p.name for p in job.glob("checkpoint_*.pth"))
    assert kept == ["checkpoint_1.pth", "checkpoint_2.pth", "checkpoint_latest.pth"]
    assert os.path.samefile(job / "checkpoint_2.pth", job / "checkpoint_latest.pth")
    assert torch.load(job / "checkpoint_latest.pth", weights_only=False)["epoch"] == 2


def _copy(job: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(job, tmp_path / "resumed")
    return tmp_path / "resumed" / "checkpoint_latest.pth"
