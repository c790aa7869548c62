"""LAVIS's own train.py sees the plugin: the import hook that ``lavis_dlip_autoload.pth``
installs loads ``lavis_dlip`` on the first ``import lavis``; ``LAVIS_DLIP_AUTOLOAD=0``
switches it off. Each case runs in a fresh interpreter that never imports the plugin itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import CONFIGS, SMOKE_RETRIEVAL

# What LAVIS v1.0.2's train.py (a source checkout's, not in the wheel) imports and calls, in its order
LAVIS_TRAIN_PY = r"""
import argparse, json, sys
import lavis.tasks as tasks
from lavis.common.config import Config
from lavis.common.dist_utils import get_rank, init_distributed_mode
from lavis.common.logger import setup_logger
from lavis.common.optims import LinearWarmupCosineLRScheduler, LinearWarmupStepLRScheduler
from lavis.common.registry import registry
from lavis.common.utils import now
from lavis.datasets.builders import *
from lavis.models import *
from lavis.processors import *
from lavis.runners import *
from lavis.tasks import *

cfg = Config(argparse.Namespace(cfg_path=sys.argv[1], options=sys.argv[2:]))
init_distributed_mode(cfg.run_cfg)
setup_logger()
task = tasks.setup_task(cfg)
datasets = task.build_datasets(cfg)
model = task.build_model(cfg)
runner = registry.get_runner_class(cfg.run_cfg.get("runner", "runner_base"))(
    cfg=cfg, job_id=now(), task=task, model=model, datasets=datasets)
runner.train()
import lavis
print(json.dumps({"runner": type(runner).__name__, "model": type(model).__name__, "output_dir": str(runner.output_dir),
                  "plugin": sorted(m for m in sys.modules if m.split(".")[0] == "lavis_dlip")[:3],
                  "spec_loader": type(lavis.__spec__.loader).__name__}))
"""

SWITCHED_OFF = r"""
import json, sys
try:
    import lavis  # fails on a CPU torch without the plugin's fixes; either way the plugin stays out
    imported = True
except Exception:
    imported = False
print(json.dumps({"lavis": imported, "plugin": [m for m in sys.modules if m.startswith("lavis_dlip.")
                                                or m == "lavis_dlip"],
                  "hooks": [type(f).__name__ for f in sys.meta_path if type(f).__name__ == "LavisFinder"]}))
"""


def _run(script: str, args: list[str], cwd: Path, **env: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_install_puts_the_hook_in_site_packages():
    pth = Path(sysconfig.get_paths()["purelib"]) / "lavis_dlip_autoload.pth"
    assert pth.read_text() == (Path(__file__).resolve().parent.parent / "lavis_dlip_autoload.pth").read_text()


def test_lavis_train_py_trains_and_distils_through_runner_dlip(tmp_path):
    """A dlip_* model trained one epoch; then, from that run as the teacher, a student distilled
    one epoch: LAVIS's Config keeps no distill section, the task reads it from the yaml."""
    options = [SMOKE_RETRIEVAL, "run.max_epoch=1", "run.valid_splits=[]"]
    out = _run(LAVIS_TRAIN_PY, [str(CONFIGS / "retrieval.yaml"), *options, f"run.output_dir={tmp_path / 'a'}"],
               tmp_path)
    assert out["runner"] == "RunnerDlip" and out["model"] == "DlipRetrieval"
    assert out["plugin"] and out["spec_loader"] == "SourceFileLoader"  # LAVIS's own spec, given back
    teacher = Path(out["output_dir"]) / "checkpoint_0.pth"  # one epoch, saved by runner_dlip
    metrics = json.loads((teacher.parent / "metrics.json").read_text())
    assert 0 <= metrics["test"]["r_mean"] <= 100 and "txt_r1" in metrics["test"]  # LAVIS's retrieval metrics

    distill = [f"distill.teacher.cfg_path={CONFIGS / 'retrieval.yaml'}", f"distill.teacher.checkpoint={teacher}",
               "distill.terms=[{name: itc}, {name: itm}, {name: itc_kd, temperature: 2.0}]"]
    out = _run(LAVIS_TRAIN_PY, [str(CONFIGS / "distill_retrieval.yaml"), *options, *distill,
                                f"run.output_dir={tmp_path / 'b'}"], tmp_path)
    assert out["runner"] == "RunnerDlip"
    log = (Path(out["output_dir"]) / "log.txt").read_text()
    assert "loss_itc_kd" in log and "loss_itm_kd" not in log  # the terms the options gave, not the yaml's


def test_the_switch_turns_the_hook_off(tmp_path):
    out = _run(SWITCHED_OFF, [], tmp_path, LAVIS_DLIP_AUTOLOAD="0")
    assert out["plugin"] == [] and out["hooks"] == []
