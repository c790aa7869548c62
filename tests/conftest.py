"""Shared fixtures: offline environment, the small demo data preset, CLI runners."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per worker (as `make test`): OpenMP threads of two
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # workers on two cores spin against each other, 5-10x slower

TESTS = Path(__file__).resolve().parent
CONFIGS = TESTS / "configs"
REPO = TESTS.parent


SMOKE_RETRIEVAL = "datasets.dlip_local_retrieval.base_dir=${dlip_demo_data:smoke}"  # 128 training pairs: where
# a test needs runs, checkpoints and resumes but no learning


@pytest.fixture(scope="session")
def demo_smoke_data() -> Path:
    import lavis_dlip  # noqa: F401
    from lavis_dlip.datasets.demo_data import ensure

    return ensure("smoke")


@pytest.fixture(scope="session")
def demo_test_data() -> Path:
    """The `test` preset of the embedded demo data (generated once, cached)."""
    import lavis_dlip  # noqa: F401
    from lavis_dlip.datasets.demo_data import ensure

    return ensure("test")


def run_cli(module: str, cfg: Path, *options: str, cwd: Path, timeout: int = 600,
            extra: list[str] | None = None) -> subprocess.CompletedProcess:
    """``python -m MODULE --cfg-path CFG [extra] --options ...`` in a subprocess."""
    cmd = [sys.executable, "-m", module, "--cfg-path", str(cfg), *(extra or [])]
    if options:
        cmd += ["--options", *options]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def run_main(module: str, cfg: Path, *options: str, cwd: Path, extra: list[str] | None = None
             ) -> subprocess.CompletedProcess:
    """The same command as ``run_cli``, run in this process (its ``main``): no new interpreter
    and no second ``import lavis_dlip``. For what needs a process of its own (a kill, torchrun,
    a process without LAVIS) use ``run_cli``."""
    import contextlib
    import importlib
    import io

    argv = ["--cfg-path", str(cfg), *(extra or [])] + (["--options", *options] if options else [])
    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = importlib.import_module(module).main(argv)
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess([module, *argv], code, out.getvalue(), err.getvalue())


def output_dirs(root: Path) -> list[Path]:
    """Job directories (one per run) under a run.output_dir."""
    return sorted(p.parent for p in root.rglob("log.txt"))


def read_metrics(job_dir: Path) -> dict:
    return json.loads((job_dir / "metrics.json").read_text())


def check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )


# The files with the longest tests first, whole (their module fixtures are built once), so
# that under `make test`'s two workers (--dist worksteal) neither is left with a long test
# while the other has finished. The order comes from `pytest --durations`.
LONG_FIRST = ("test_demo.py", "test_distill.py", "test_cache.py", "test_train_eval.py", "test_distributed.py",
              "test_resume.py", "test_inheritance.py", "test_paper_configs.py", "test_export.py", "test_students.py",
              "test_study.py", "test_faults.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.nodeid.split("::")[0].rsplit("/", 1)[-1]
        return LONG_FIRST.index(name) if name in LONG_FIRST else len(LONG_FIRST)

    items.sort(key=rank)  # stable: each file's own order is kept
