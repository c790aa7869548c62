"""The main job (`make demo`) end to end on the small test data: per task a
teacher trained then reused from its cache, distilled and not-distilled
students, one table; the distilled students then export to ONNX and transformers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest


def test_demo_runs_all_stages_and_reuses_the_teacher(tmp_path, monkeypatch, capsys):
    from lavis_dlip import demo, kept
    from lavis_dlip.datasets.demo_data import ensure

    data = ensure("smoke")  # the demo's stages on the least data: what is tested is the job, not learning

    monkeypatch.setenv(kept.ENV, str(tmp_path / "teachers"))
    monkeypatch.chdir(tmp_path)
    # short evaluations: 4 retrieval candidates re-ranked, greedy captions of 8 tokens at most
    options = ["run.max_epoch=1", "run.device=cpu", "run.progress=False", "run.warmup_steps=5",
               "run.k_test=4", "run.num_beams=1", "run.max_len=8"]
    # two of the three tasks (VQA's stages are the captioner's with another task: its teacher,
    # cache and distillation are tests/test_distill.py's and test_cache.py's)
    tasks = ("retrieval", "caption")
    # with the optional stage (--not-distilled): every stage the demo knows
    first = demo.run_demo(str(tmp_path / "out"), options, repeats=1, data_preset="smoke", tasks=tasks,
                          not_distilled=True)
    assert [(r["task"], r["model"]) for r in first["rows"]] == [(t, m) for t in tasks for m in demo.MODELS]
    for task in tasks:
        rows = {r["model"]: r for r in first["rows"] if r["task"] == task}
        assert not rows["teacher"]["cached"] and rows["teacher"]["seconds"] > 0
        # a teacher that scores 0 on the smoke data (a few steps) has no "% of teacher": None, shown n/a
        teacher_score = rows["teacher"]["score"]
        assert teacher_score == pytest.approx(demo.score(task, rows["teacher"]["test"]))
        assert rows["teacher"]["retained"] == (pytest.approx(100.0) if teacher_score else None)
        assert rows["teacher"]["speedup"] == pytest.approx(1.0)
        for name in demo.MODELS[1:]:
            assert rows[name]["params"] < 0.6 * rows["teacher"]["params"], task
            # latency is measured side by side, but its ratio is no test of correctness on a busy
            # machine (benchmarks/ and docs/results.md hold the timings): only that it was measured
            assert math.isfinite(rows[name]["speedup"]) and rows[name]["speedup"] != 0, task
            expected = 100 * rows[name]["score"] / teacher_score if teacher_score else None
            assert rows[name]["retained"] == (None if expected is None else pytest.approx(expected))
            assert rows[name]["score"] == pytest.approx(demo.score(task, rows[name]["test"]))
    assert first["parallel"] == 2  # stages ran two at a time, each one's console output in its own log
    for task in tasks:
        for run in ("teacher", "distilled", "init_only", "not_distilled"):
            # LAVIS prints its evaluation's progress (logging records go to pytest's handler here)
            assert "Evaluation" in (tmp_path / "out" / task / f"{run}.log").read_text(), (task, run)
        assert "teacher cache" in (tmp_path / "out" / task / "cache.log").read_text(), task
    kept_runs = tmp_path / "teachers"  # the teachers and the students trained without one
    assert len(list(kept_runs.glob("teacher_*/checkpoint.pth"))) == len(tasks)
    assert len(list(kept_runs.glob("student_*/checkpoint.pth"))) == len(tasks)
    for task in tasks:  # the distilled student trained from a cache built beside its teacher
        cache = next(r for r in first["rows"] if r["task"] == task and r["model"] == "distilled")["teacher_cache"]
        manifest = json.loads((Path(cache["dir"]) / "manifest.json").read_text())
        assert manifest["complete"] and not cache["cached"] and cache["built_s"] is not None, task
        assert cache["entries"] == manifest["samples"] > 0 and cache["bytes"] > 0, task
        assert Path(cache["dir"]).parent.parent == tmp_path / "teachers", task
    png = Path(first["plot"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    demo.print_table(first)
    table = capsys.readouterr().out
    for text in ("| retrieval | distilled |", "| caption | not distilled |", "| caption | teacher |",
                 "| retrieval | init only |", "CIDEr",
                 "% of teacher", "Teacher-output caches", "KiB", str(png)):
        assert text in table

    # the demo-trained distilled students leave LAVIS (issue 12): each exports to ONNX and to
    # transformers, and the export's own check reproduces LAVIS's outputs within tolerance
    # (features, ITM probabilities; captions and answers token for token) or the export fails
    from lavis_dlip.export import export
    from lavis_dlip.export.check import TOLERANCE

    # (one format a task here: tests/test_export.py takes every task through both)
    formats = {"retrieval": "onnx", "caption": "hf"}
    for row in (r for r in first["rows"] if r["model"] == "distilled"):
        for fmt in (formats[row["task"]],):
            out = tmp_path / "export" / f"{row['task']}-{fmt}"
            info = export(row["cfg_path"], row["checkpoint"], fmt, str(out))
            assert info["task"] == row["task"] and max(info["max_abs_diff"].values()) <= TOLERANCE[fmt]
            assert json.loads((out / "dlip_export.json").read_text())["max_abs_diff"] == info["max_abs_diff"]
    assert "Export a student: python -m lavis_dlip.export" in table

    # a second run reuses every stage (same yaml, data and options): nothing is trained or built
    opts = [f"datasets.dlip_local_caption.base_dir={data}", *options]
    second = demo.task_stages("caption", data, tmp_path / "out2" / "caption", opts)
    assert all(stage.reused for stage in second.values()), {k: s.reused for k, s in second.items()}
    first_caption = {r["model"]: r for r in first["rows"] if r["task"] == "caption"}
    for name in ("teacher", "init only"):
        stage = second[name]
        again = stage.fn(*stage.args)
        assert again["cached"] and again["seconds"] == 0.0 and not (tmp_path / "out2").exists()
        assert demo.score("caption", again["test"]) == pytest.approx(first_caption[name]["score"])
        assert again["trained_s"] == pytest.approx(first_caption[name]["seconds"])
    stage = second["cache"]
    cache = stage.fn(*stage.args)
    first_cache = first_caption["distilled"]["teacher_cache"]
    assert cache["cached"] and str(cache["dir"]) == first_cache["dir"] and cache["bytes"] == first_cache["bytes"]
    # a student distilled from a kept teacher is kept in the teacher's directory: retraining
    # the teacher (its directory deleted) retrains its students
    assert Path(first_caption["distilled"]["checkpoint"]).exists()
    assert kept.kept_dir(*second["distilled"].args[:2], second["distilled"].args[3], second["distilled"].args[4]
                         ).parent == Path(first_cache["dir"]).parent


def test_a_demo_stage_keeps_only_its_latest_run(tmp_path):
    """Each demo run of a stage leaves a job directory with every epoch's checkpoint:
    the next run of that stage removes the earlier ones (runner job ids only), and a
    teacher checkpoint stored by hard link from one of them stays readable."""
    from lavis_dlip.checkpoint import atomic_link
    from lavis_dlip.kept import drop_earlier_runs

    stage = tmp_path / "vqa" / "teacher"
    for job in ("20261126173642", "20261126180000"):
        (stage / job).mkdir(parents=True)
        (stage / job / "checkpoint_latest.pth").write_bytes(job.encode())
    (stage / "notes").mkdir()
    (stage / "2026112617364").mkdir()  # not job ids: 13 digits, a 13th month
    (stage / "20261326173642").mkdir()
    (stage / "20261126173643").write_text("a file, not a job directory")
    kept = tmp_path / "teachers" / "checkpoint.pth"
    kept.parent.mkdir()
    atomic_link(str(stage / "20261126180000" / "checkpoint_latest.pth"), str(kept))

    drop_earlier_runs(stage)
    assert sorted(p.name for p in stage.iterdir()) == ["2026112617364", "20261126173643", "20261326173642", "notes"]
    assert kept.read_bytes() == b"20261126180000"
    drop_earlier_runs(tmp_path / "absent")  # a stage never run: nothing to do


def _stage(events: str, name: str, wait_for: str = "", fail: bool = False) -> dict:
    """A stand-in demo stage (module level: pool processes unpickle it by name): notes
    its start and end in ``events``; ``wait_for``: returns only once that stage started."""
    import os
    import time

    def note(what: str) -> None:
        with open(events, "a") as f:  # one short append: whole lines from both processes
            f.write(f"{what} {name}\n")

    note("start")
    if fail:
        raise OSError(f"{name} failed")
    deadline = time.time() + 120
    while wait_for and f"start {wait_for}\n" not in Path(events).read_text():
        assert time.time() < deadline, f"{name}: '{wait_for}' never ran beside it"
        time.sleep(0.05)
    note("end")
    return {"seconds": 0.0, "test": {"agg_metrics": 1.0}, "cached": False, "entries": 1, "bytes": 1, "pid": os.getpid()}


@pytest.mark.parametrize("parallel", [1, 2])
def test_demo_stages_start_once_what_they_read_is_done(tmp_path, parallel, capsys):
    """``run_stages``: a stage starts only after the stages of its task that it reads
    have ended, whatever their order; with 2 at a time, two ready stages run side by
    side (``a teacher`` returns only once ``b not distilled`` has started)."""
    from lavis_dlip.stages import Stage, run_stages

    events = str(tmp_path / "events")
    stages = {
        ("a", "distilled"): Stage(_stage, (events, "a distilled"), ("cache",)),
        ("a", "teacher"): Stage(_stage, (events, "a teacher", "b not distilled" if parallel == 2 else "")),
        ("b", "teacher"): Stage(_stage, (events, "b teacher")),
        ("a", "cache"): Stage(_stage, (events, "a cache"), ("teacher",)),
        ("b", "not distilled"): Stage(_stage, (events, "b not distilled")),
    }
    logs = {key: tmp_path / f"{' '.join(key)}.log" for key in stages}
    from lavis_dlip.demo import _done_line

    done = run_stages(stages, logs, parallel, describe=_done_line)
    assert set(done) == set(stages)
    lines = Path(events).read_text().splitlines()
    assert sorted(lines) == sorted(f"{e} {' '.join(k)}" for k in stages for e in ("start", "end"))
    for first, then in (("a teacher", "a cache"), ("a cache", "a distilled")):
        assert lines.index(f"end {first}") < lines.index(f"start {then}"), lines
    printed = capsys.readouterr().out
    assert "a cache: 1 entries, 0.0 MiB (0.0 min" in printed and "b teacher: accuracy 1.0" in printed
    if parallel == 2:  # pool processes, each one's output in its log
        assert all(logs[key].is_file() and done[key]["log"] == str(logs[key]) for key in stages)
        assert {r["pid"] for r in done.values()}.isdisjoint({__import__("os").getpid()})
    else:
        assert not any(log.exists() for log in logs.values())


def test_a_failed_demo_stage_stops_what_reads_it_and_names_its_log(tmp_path):
    from lavis_dlip.stages import Stage, run_stages

    events = str(tmp_path / "events")
    stages = {("a", "teacher"): Stage(_stage, (events, "a teacher", "", True)),
              ("a", "cache"): Stage(_stage, (events, "a cache"), ("teacher",))}
    logs = {key: tmp_path / f"{' '.join(key)}.log" for key in stages}
    with pytest.raises(RuntimeError, match="stage 'a teacher' failed; its output: .*a teacher.log"):
        run_stages(stages, logs, 2)
    assert "a cache" not in Path(events).read_text()
    assert "OSError: a teacher failed" in logs[("a", "teacher")].read_text()
    with pytest.raises(ValueError, match="'a distilled' reads \\['cache'\\], which no stage makes"):
        run_stages({("a", "distilled"): Stage(_stage, (events, "x"), ("cache",))}, logs, 1)


def _logging_stage(name: str) -> dict:
    """A stage that logs as LAVIS's runs do: ``setup_logger`` (``logging.basicConfig``)
    adds a console handler once per process, on the stream of that moment."""
    import logging

    root = logging.getLogger()
    if not any(type(h) is logging.StreamHandler for h in root.handlers):
        root.addHandler(logging.StreamHandler())
    root.warning("logged by %s", name)
    return {"seconds": 0.0, "test": {"agg_metrics": 1.0}, "entries": 1, "bytes": 1}


def test_each_demo_stage_logs_into_its_own_log(tmp_path):
    """Three stages in one chain on two pool processes: one process runs two of them,
    and the handler the first made (on its log, closed since) writes the second's
    records into the second's log."""
    from lavis_dlip.stages import Stage, run_stages

    stages = {("a", "teacher"): Stage(_logging_stage, ("a teacher",)),
              ("a", "cache"): Stage(_logging_stage, ("a cache",), ("teacher",)),
              ("a", "distilled"): Stage(_logging_stage, ("a distilled",), ("cache",))}
    logs = {key: tmp_path / f"{' '.join(key)}.log" for key in stages}
    run_stages(stages, logs, 2)
    for key, log in logs.items():
        text = log.read_text()
        assert f"logged by {' '.join(key)}" in text and "Logging error" not in text, (key, text)


def _busy_stage(seconds: float) -> dict:
    """A stand-in stage that shows a progress bar, as a training epoch does, then waits."""
    import time

    from tqdm import tqdm

    bar = tqdm(total=4, desc="train epoch 1", mininterval=0)
    bar.update(3)
    bar.refresh()
    time.sleep(seconds)
    bar.close()
    return {"seconds": seconds, "test": {"agg_metrics": 1.0}, "entries": 1, "bytes": 1}


def test_the_demo_prints_its_plan_then_where_each_running_stage_is(tmp_path):
    """Before anything runs: every stage with its estimate (``reused`` for what exists);
    while stages run: each one's time so far and its progress bar's position; the times
    of stages that ran are kept for the next plan on this machine."""
    import io

    from lavis_dlip.stages import Progress, Stage, run_stages

    stages = {("a", "teacher"): Stage(_busy_stage, (1.5,)), ("a", "cache"): Stage(_busy_stage, (0.1,), reused=True)}
    logs = {key: tmp_path / f"{' '.join(key)}.log" for key in stages}
    out, times = io.StringIO(), tmp_path / "times.json"
    progress = Progress.plan("demo", stages, 2, times, {("b", "teacher"): 9.1}, interval=0.3, stream=out)
    plan = out.getvalue()
    assert "2 stages, 2 at a time" in plan and "a cache" in plan and "reused" in plan
    assert "a teacher" in plan and "?" in plan  # no estimate: the mean of those done, once one is
    run_stages(stages, logs, 2, progress)
    status = [line for line in out.getvalue().splitlines() if line.startswith("[")]
    assert any("a teacher 0." in line and "train epoch 1 75% (3/4)" in line and "min to go" in line
               for line in status), out.getvalue()
    assert json.loads(times.read_text()) == {"a teacher": 0.03}  # 1.5 s; the reused stage is not timed
    again = io.StringIO()
    Progress.plan("demo", stages, 2, times, stream=again)
    assert "from this machine's last run" in again.getvalue()


def test_estimates_of_waiting_stages_scale_by_what_finished_stages_took():
    """A plan made on a busy machine (estimates 30x too long) corrects itself once a stage
    ends: the rest are scaled by took / estimated of the finished ones; unknown stores none."""
    import io

    from lavis_dlip.stages import Progress

    minute = 60.0
    progress = Progress({("s", "a"): 30 * minute, ("s", "b"): 30 * minute, ("s", "c"): 0.0,
                         ("s", "d"): None}, parallel=1, stream=io.StringIO())
    assert progress.remaining([("s", "b")]) == 30 * minute
    progress.done(("s", "a"), 1 * minute)
    assert progress.scale() == 1 / 30
    assert abs(progress.remaining([("s", "b")]) - 1 * minute) < 1e-6
    assert abs(progress.remaining([("s", "b"), ("s", "d")]) - 2 * minute) < 1e-6  # d: the mean of those done
    assert progress.remaining([("s", "c")]) == 0.0  # reused


def test_the_random_init_student_runs_only_when_asked():
    """`make demo` trains teacher, cache, distilled and init-only stages; --not-distilled adds the
    student from random weights (a study's no_teacher) as its last stage."""
    from lavis_dlip import demo

    assert demo.demo_stages() == ("teacher", "cache", "distilled", "init only")
    assert demo.demo_stages(not_distilled=True) == demo.STAGES
    assert demo.STAGES[-1] == "not distilled"
