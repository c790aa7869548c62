"""Two processes under torchrun on CPU (gloo) train and evaluate."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import CONFIGS, output_dirs, read_metrics


def test_torchrun_two_processes_on_cpu(tmp_path, demo_test_data):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "lavis_dlip.train", "--cfg-path", str(CONFIGS / "retrieval.yaml"),
           "--options", f"run.output_dir={tmp_path}/out", "run.max_epoch=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-6000:]
    jobs = output_dirs(tmp_path / "out")
    assert len(jobs) == 1  # both ranks agreed on one job directory
    metrics = read_metrics(jobs[0])
    assert {"txt_r1", "img_r10", "agg_metrics"} <= set(metrics["test"])
    log = (jobs[0] / "log.txt").read_text()
    assert '"train_loss_itc"' in log and '"test_agg_metrics"' in log
    assert "gloo" in proc.stdout + proc.stderr or "distributed" in log
