"""What ``lavis_dlip.train`` and ``lavis_dlip.evaluate`` share: LAVIS's train.py and
evaluate.py (which are not in the wheel), with the plugin registered first,
config errors reported early, gloo on CPU and the runner taken from ``run.runner``."""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import signal
import sys
from typing import Any, Optional, Sequence

import numpy as np
import torch

from lavis_dlip.errors import ConfigError, RunStopped
from lavis_dlip import compat
from lavis_dlip.blip.tokenizer import TokenizerNotFoundError, tokenizer_source
from lavis_dlip.config import load_config
from lavis_dlip.datasets.validate import DataError
from lavis_dlip.models.importance import calibration_data
from lavis_dlip.models.init import calibration_batches
from lavis_dlip.runs import make_job_id


def parse_args(description: str, argv: Optional[Sequence[str]] = None, checkpoint: bool = False):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cfg-path", required=True, help="path to the run yaml")
    parser.add_argument(
        "--options", nargs="+",
        help="override settings of the yaml, as key=value pairs (e.g. run.max_epoch=2 run.device=cpu)",
    )
    if checkpoint:
        parser.add_argument(
            "--checkpoint",
            help="weights to evaluate (a runner checkpoint or a state dict); "
            "same as --options model.finetuned=PATH model.load_finetuned=True",
        )
    return parser.parse_args(argv)


def setup_seeds(run_cfg) -> None:
    from lavis.common.dist_utils import get_rank

    seed = int(run_cfg.get("seed", 42)) + get_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def run(cfg_path: str, options: Optional[Sequence[str]] = None, evaluate: bool = False) -> dict[str, Any]:
    """Build task, datasets, model and runner from a run yaml; train (or evaluate).

    Returns the runner's test metrics ``{split: {metric: value}}``.
    """

    cfg = load_config(cfg_path, options, evaluate=evaluate)
    try:
        return run_config(cfg, evaluate=evaluate)
    except (ConfigError, DataError) as err:  # found while building (data files, layer maps): name the yaml too
        if str(err).startswith(cfg_path):
            raise
        raise type(err)(f"{cfg_path}: {err}") from None


def build_runner(cfg, evaluate: bool = False):
    """LAVIS's train.py up to the runner: process group, seeds, logger, task, data,
    model (with calibration batches when ``model.init`` ranks by activation), runner."""
    import lavis.tasks as tasks
    from lavis.common.logger import setup_logger
    from lavis.common.registry import registry

    if evaluate:
        cfg.run_cfg.evaluate = True
    compat.init_distributed_mode(cfg.run_cfg)
    setup_seeds(cfg.run_cfg)
    setup_logger()
    job_id = make_job_id()
    cfg.pretty_print()

    task = tasks.setup_task(cfg)
    datasets = task.build_datasets(cfg)
    batches = calibration_batches(cfg.model_cfg.get("init"), datasets, cfg.run_cfg.get("seed", 42))
    with tokenizer_source(cfg.model_cfg.get("tokenizer")), calibration_data(batches):
        model = task.build_model(cfg)

    runner_cls = registry.get_runner_class(cfg.run_cfg.get("runner", "runner_base"))
    return runner_cls(cfg=cfg, job_id=job_id, task=task, model=model, datasets=datasets)


def run_config(cfg, evaluate: bool = False) -> dict[str, Any]:
    runner = build_runner(cfg, evaluate)
    with _stopped_by_signals(runner):
        if evaluate:  # runner_dlip's test() also logs the metrics and writes metrics.json
            test = getattr(runner, "test", None) or runner.evaluate
            result = test(skip_reload=True) or {}
        else:
            result = runner.train() or {}
    logging.info("output directory: %s", runner.output_dir)
    return result


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or ``kill``'s stop), raised where the run is, like SIGINT."""


@contextlib.contextmanager
def _stopped_by_signals(runner):
    """SIGINT and SIGTERM end the run with one line: where its last checkpoint is and
    how to resume (SIGTERM otherwise kills silently, SIGINT prints a traceback)."""
    def on_term(signum, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
    try:
        yield
    except KeyboardInterrupt as err:
        name, code = ("SIGTERM", 143) if isinstance(err, _Terminated) else ("SIGINT", 130)
        last = getattr(runner, "last_checkpoint", None)
        if last is None:
            kept = "no epoch had finished, so there is no checkpoint to resume from"
        else:
            kept = (f"the last checkpoint is {last[0]} ({last[1]}); resume with "
                    f"--options run.resume_ckpt_path={last[0]}")
        raise RunStopped(f"stopped by {name}; {kept}", exit_code=code) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def main_guard(fn) -> int:
    """Print configuration and data errors, and runs stopped for a reason the user can
    act on, as one clear line without a traceback; exit code 2 (an interrupted run: 130
    for SIGINT, 143 for SIGTERM, as a shell reports them)."""

    try:
        fn()
    except (ConfigError, DataError, TokenizerNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunStopped as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0
