"""A run killed after a checkpoint resumes and ends exactly where an uninterrupted
run ends; checkpoints are written atomically."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import CONFIGS, check, output_dirs, read_metrics, run_cli

EPOCHS = "run.max_epoch=3"


def test_killed_run_resumes_to_identical_metrics(tmp_path, demo_test_data):
    cfg = CONFIGS / "retrieval.yaml"
    full = run_cli("lavis_dlip.train", cfg, EPOCHS, f"run.output_dir={tmp_path}/full", cwd=tmp_path)
    check(full)
    expected = read_metrics(output_dirs(tmp_path / "full")[0])

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "lavis_dlip.train", "--cfg-path", str(cfg), "--options", EPOCHS,
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
    assert killed_at < 2 and not (latest.parent / "metrics.json").exists()

    resumed = run_cli("lavis_dlip.train", cfg, EPOCHS, f"run.output_dir={out}",
                      f"run.resume_ckpt_path={latest}", cwd=tmp_path)
    check(resumed)
    got = read_metrics(latest.parent)  # a resumed run continues in its checkpoint's directory
    assert got == expected  # bitwise: every recall and the best epoch


def test_atomic_save_keeps_the_last_good_file(tmp_path, monkeypatch):
    from lavis_dlip.runners import checkpoint as ckpt

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


def test_resume_errors_name_the_problem(tmp_path, demo_test_data):
    bad = tmp_path / "bad.pth"
    torch.save({"model": {}}, bad)
    proc = run_cli("lavis_dlip.train", CONFIGS / "retrieval.yaml", f"run.resume_ckpt_path={bad}",
                   f"run.output_dir={tmp_path}/out", cwd=tmp_path)
    assert proc.returncode != 0
    assert "has no 'optimizer' entry" in proc.stderr
