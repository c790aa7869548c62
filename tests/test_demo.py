"""The main job (`make demo`) end to end on the small test data: per task a
teacher trained then reused from its cache, distilled and not-distilled
students, one table."""

from __future__ import annotations

import math

import pytest


def test_demo_runs_all_stages_and_reuses_the_teacher(tmp_path, monkeypatch, capsys):
    from lavis_dlip import demo
    from lavis_dlip.datasets.demo_data import ensure

    data = ensure("smoke")  # the demo's stages on the least data: what is tested is the job, not learning

    monkeypatch.setenv(demo.ENV_CACHE, str(tmp_path / "teachers"))
    monkeypatch.chdir(tmp_path)
    options = ["run.max_epoch=1", "run.device=cpu", "run.progress=False", "run.warmup_steps=5"]
    first = demo.run_demo(str(tmp_path / "out"), options, repeats=1, data_preset="smoke")
    assert [(r["task"], r["model"]) for r in first["rows"]] == [
        (t, m) for t in demo.TASKS for m in ("teacher", "distilled", "not distilled")]
    for task in demo.TASKS:
        rows = {r["model"]: r for r in first["rows"] if r["task"] == task}
        assert not rows["teacher"]["cached"] and rows["teacher"]["seconds"] > 0
        assert rows["teacher"]["retained"] == pytest.approx(100.0) and rows["teacher"]["speedup"] == pytest.approx(1.0)
        for name in ("distilled", "not distilled"):
            assert rows[name]["params"] < 0.6 * rows["teacher"]["params"], task
            # latency is measured side by side, but its ratio is no test of correctness on a busy
            # machine (benchmarks/ and docs/results.md hold the timings): only that it was measured
            assert math.isfinite(rows[name]["speedup"]) and rows[name]["speedup"] != 0, task
            assert rows[name]["retained"] == pytest.approx(100 * rows[name]["score"] / rows["teacher"]["score"])
            assert rows[name]["score"] == pytest.approx(demo.score(task, rows[name]["test"]))
    assert len(list((tmp_path / "teachers").glob("*/checkpoint_best.pth"))) == len(demo.TASKS)

    demo.print_table(first)
    table = capsys.readouterr().out
    for text in ("| retrieval | distilled |", "| caption | not distilled |", "| vqa | teacher |", "CIDEr",
                 "% of teacher"):
        assert text in table

    # a second run reuses the cached teacher (same yaml, data and options): nothing is trained
    opts = [f"datasets.dlip_local_vqa.base_dir={data}", *options]
    again = demo.train_or_reuse_teacher(demo.DEMO_DIR / "teacher_vqa.yaml", data, tmp_path / "out2", opts)
    vqa_teacher = next(r for r in first["rows"] if r["task"] == "vqa" and r["model"] == "teacher")
    assert again["cached"] and again["seconds"] == 0.0 and not (tmp_path / "out2").exists()
    assert demo.score("vqa", again["test"]) == pytest.approx(vqa_teacher["score"])
    assert again["trained_s"] == pytest.approx(vqa_teacher["seconds"])
