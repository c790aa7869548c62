"""Runs that depend on each other, a few at a time: the scheduler behind ``make demo``
and ``lavis_dlip.study``.

A stage is keyed ``(group, name)`` and starts once the stages of its group it reads
(``after``) are done; ``parallel`` run at once in pool processes, each with an equal
share of the CPU threads and its console output in its own log. ``Progress`` prints the
plan with an estimate per stage before anything runs, then a status line while stages
run (time so far, the position of each one's progress bar, time to go).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, NamedTuple, Optional

logger = logging.getLogger(__name__)

Key = tuple[str, str]


class Stage(NamedTuple):
    """``fn(*args)`` once the stages of its group named in ``after`` are done;
    ``reused``: what it makes exists already (a trained teacher, a built cache, a finished run)."""
    fn: Callable[..., dict]
    args: tuple
    after: tuple[str, ...] = ()
    reused: bool = False


def stage_threads(parallel: int) -> int:
    """The CPU threads each of ``parallel`` stages at once gets: an equal share of this process's."""
    import torch

    return max(1, torch.get_num_threads() // parallel)


def _in_worker(stage: Stage, log: Path, threads: int) -> dict:
    """A stage in a pool process: its own share of the CPU threads, its console output
    in ``log`` (two runs' progress bars would interleave): the process's stdout and
    stderr, at the file descriptors (C code) and in Python (``sys.stdout``,
    ``sys.stderr`` and the logging handlers that write to them)."""
    import torch

    torch.set_num_threads(threads)
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds, saved_streams = (os.dup(1), os.dup(2)), (sys.stdout, sys.stderr)
    root = logging.getLogger()
    console = {h: h.stream for h in root.handlers if type(h) is logging.StreamHandler and h.stream in saved_streams}
    with open(log, "w", buffering=1) as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        sys.stdout = sys.stderr = f
        for handler in console:
            handler.setStream(f)
        try:
            return {**stage.fn(*stage.args), "log": str(log)}
        except BaseException:
            traceback.print_exc()  # into the log, where the stage's own output ends
            raise
        finally:  # every handler on the log back to the console, also those the stage made (LAVIS's
            for handler in root.handlers:  # setup_logger): the next stage here redirects them again
                if type(handler) is logging.StreamHandler and handler.stream is f:
                    handler.setStream(console.get(handler, saved_streams[1]))
            sys.stdout, sys.stderr = saved_streams
            for fd, saved in zip((1, 2), saved_fds):
                os.dup2(saved, fd)
                os.close(saved)


def run_stages(stages: dict[Key, Stage], logs: dict[Key, Path], parallel: int,
               progress: Optional[Progress] = None,
               describe: Callable[[Key, dict], str] = lambda key, result: " ".join(key),
               isolate: bool = False) -> dict[Key, dict]:
    """Every stage, each as soon as the stages of its group that it reads are done; among
    those ready, the first in ``stages``' order. ``parallel`` run at once in pool processes
    with an equal share of the CPU threads each, their console output in ``logs``; 1: one
    after the other in this process. On 2 cores two single-threaded runs finish sooner than
    one two-threaded run after the other (measured: the demo's retrieval teacher's step took
    2.23-2.36 s beside another run, 1.35 s alone with 2 threads; the two captioning students
    108 s against 139 s). ``describe`` gives the line printed as a stage ends; ``isolate``:
    pool processes (their output in ``logs``) even one at a time."""
    import concurrent.futures
    import multiprocessing

    for (group, name), stage in stages.items():
        missing = [a for a in stage.after if (group, a) not in stages]
        if missing:
            raise ValueError(f"stage '{group} {name}' reads {missing}, which no stage makes")
    waiting, running, done = dict(stages), {}, {}

    def ready() -> list[Key]:
        return [key for key, stage in waiting.items() if all((key[0], a) in done for a in stage.after)]

    def finished(key: Key, result: dict) -> None:
        done[key] = result
        if progress is not None:
            progress.clear()
            progress.done(key, float(result.get("seconds", 0.0)))
        print(describe(key, result), flush=True)

    if parallel <= 1 and not isolate:
        while waiting:
            key = ready()[0]
            stage = waiting.pop(key)
            if progress is not None:
                progress.started(key)
            finished(key, stage.fn(*stage.args))
        return done
    threads = stage_threads(parallel)
    logger.info("running %d stages, %d at a time with %d thread(s) each; their output goes to <stage>.log",
                len(stages), parallel, threads)
    # fork: the workers start with lavis_dlip imported (a fresh interpreter takes seconds to import it)
    pool = concurrent.futures.ProcessPoolExecutor(parallel, mp_context=multiprocessing.get_context("fork"))
    try:
        while waiting or running:
            for key in ready()[:parallel - len(running)]:
                running[pool.submit(_in_worker, waiting.pop(key), logs[key], threads)] = key
                if progress is not None:
                    progress.started(key)
            if not running:
                raise ValueError(f"stages that wait on each other: {sorted(waiting)}")
            ended, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED,
                                               timeout=None if progress is None else progress.interval)
            if not ended:
                progress.report({key: logs[key] for key in running.values()}, list(waiting))
            for future in ended:
                key = running.pop(future)
                try:
                    result = future.result()
                except Exception as exc:
                    raise RuntimeError(f"stage '{' '.join(key)}' failed; its output: {logs[key]}") from exc
                finished(key, result)
    finally:  # on a failure, start nothing more; the stage still running finishes its own run
        pool.shutdown(wait=not waiting and not running, cancel_futures=True)
    return done


TQDM = re.compile(r"([A-Za-z][\w ]*?):\s+(\d+)%\|[^|]*\|\s*(\d+)/(\d+)")


def stage_progress(log: Path) -> str:
    """Where a running stage is, from the last progress bar in its log: ``train epoch 1 45% (28/62)``."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    found = TQDM.findall(tail)
    if not found:
        return ""
    desc, pct, n, total = found[-1]
    return f"{desc} {pct}% ({n}/{total})"


class Progress:
    """A plan and its progress. ``estimates``: seconds per stage (0: reused; None: unknown,
    then the mean of the stages done so far); once stages end, the estimates of the rest are
    scaled by what the finished ones took against their estimates (a plan made on a busy or
    idle machine corrects itself); ``times_file`` keeps what stages took, for the next plan
    on this machine."""

    def __init__(self, estimates: dict[Key, Optional[float]], parallel: int, times_file: Optional[Path] = None,
                 interval: float = 30.0, stream=None):
        self.estimates, self.parallel, self.times_file, self.interval = dict(estimates), parallel, times_file, interval
        self.stream = stream or sys.stdout
        self.start, self.starts, self.took = time.time(), {}, {}
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._shown = False

    @staticmethod
    def load(times_file: Optional[Path]) -> dict[str, float]:
        try:
            return json.loads(times_file.read_text()) if times_file is not None else {}
        except (OSError, ValueError):
            return {}

    @classmethod
    def plan(cls, title: str, stages: dict[Key, Stage], parallel: int, times_file: Optional[Path] = None,
             reference_minutes: Optional[dict[Key, float]] = None, **kwargs) -> Progress:
        """Print ``title`` and every stage with its estimate (this machine's last measured time,
        else ``reference_minutes``), and return the progress to report as they run."""
        measured, reference = cls.load(times_file), reference_minutes or {}

        def estimate(key: Key) -> Optional[float]:
            if stages[key].reused:
                return 0.0
            minutes = measured.get(" ".join(key), reference.get(key))
            return None if minutes is None else 60.0 * minutes

        progress = cls({key: estimate(key) for key in stages}, parallel, times_file, **kwargs)
        source = "this machine's last run" if measured else "reference timings"
        known = [e for e in progress.estimates.values() if e is not None]
        total = f"about {progress.remaining(list(stages)) / 60:.0f} min" if known else "time unknown until a stage ends"
        lines = [f"{title}: {len(stages)} stages, {parallel} at a time; {total} (estimates from {source}):"]
        for key, value in progress.estimates.items():
            what = "reused" if value == 0.0 else ("?" if value is None else f"~{value / 60:.1f} min")
            lines.append(f"  {' '.join(key):<32} {what}")
        print("\n".join(lines), file=progress.stream, flush=True)
        return progress

    def scale(self) -> float:
        """What the finished stages took over what they were estimated to take (1 before any)."""
        pairs = [(took, self.estimates[k]) for k, took in self.took.items() if self.estimates.get(k)]
        return sum(t for t, _ in pairs) / sum(e for _, e in pairs) if pairs else 1.0

    def _estimate(self, key: Key) -> float:
        value = self.estimates.get(key)
        if value is None:
            return sum(self.took.values()) / len(self.took) if self.took else 0.0
        return value * self.scale()

    def remaining(self, keys) -> float:
        """Seconds to go for ``keys`` (waiting or running), shared by the parallel slots."""
        now = time.time()
        left = [max(self._estimate(k) - (now - self.starts[k] if k in self.starts else 0.0), 0.0) for k in keys]
        return max(sum(left) / self.parallel, max(left, default=0.0))

    def started(self, key: Key) -> None:
        self.starts[key] = time.time()

    def done(self, key: Key, seconds: float) -> None:
        """Keep what a stage that really ran took, for the estimates of the rest and the next plan."""
        self.starts.pop(key, None)
        if self.estimates.get(key) == 0.0 or seconds <= 0:
            return
        self.took[key] = seconds
        if self.times_file is None:
            return
        times = self.load(self.times_file)
        times[" ".join(key)] = round(seconds / 60, 2)
        self.times_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.times_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(times, indent=1, sort_keys=True))
        os.replace(tmp, self.times_file)

    def report(self, running: dict[Key, Path], waiting: list[Key]) -> None:
        now = time.time()
        parts = []
        for key, log in running.items():
            where = stage_progress(log)
            parts.append(f"{' '.join(key)} {(now - self.starts[key]) / 60:.1f}/{self._estimate(key) / 60:.1f} min"
                         + (f", {where}" if where else ""))
        line = (f"[{(now - self.start) / 60:.1f} min] " + "; ".join(parts)
                + f"; {len(waiting)} waiting; about {self.remaining([*running, *waiting]) / 60:.0f} min to go")
        if self.tty:  # one line, rewritten
            print("\r" + line[:200].ljust(200), end="", file=self.stream, flush=True)
            self._shown = True
        else:
            print(line, file=self.stream, flush=True)

    def clear(self) -> None:
        if self._shown:
            print("\r" + " " * 200 + "\r", end="", file=self.stream, flush=True)
            self._shown = False
