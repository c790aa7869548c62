"""The main job (`make demo`) end to end on the small test data: teacher trained
then reused from its cache, distilled and not-distilled students, one table."""

from __future__ import annotations

import pytest


def test_demo_runs_all_stages_and_reuses_the_teacher(tmp_path, monkeypatch, capsys, demo_test_data):
    from lavis_dlip import demo

    monkeypatch.setenv(demo.ENV_CACHE, str(tmp_path / "teachers"))
    monkeypatch.chdir(tmp_path)
    options = ["run.max_epoch=1", "run.device=cpu", "run.progress=False", "run.batch_size_train=16",
               "model.queue_size=256", "run.warmup_steps=5"]
    first = demo.run_demo(str(tmp_path / "out"), options, repeats=1, data_preset="test")
    rows = {r["model"]: r for r in first["rows"]}
    assert list(rows) == ["teacher", "distilled", "not distilled"]
    assert not rows["teacher"]["cached"] and rows["teacher"]["seconds"] > 0
    for name in ("distilled", "not distilled"):
        assert rows[name]["params"] < 0.6 * rows["teacher"]["params"]
        assert rows[name]["speedup"] > 1.0  # measured side by side, not assumed
        assert rows[name]["retained"] == pytest.approx(100 * rows[name]["mean_recall"] / rows["teacher"]["mean_recall"])
    assert rows["teacher"]["retained"] == pytest.approx(100.0) and rows["teacher"]["speedup"] == pytest.approx(1.0)
    assert all(0 <= rows[n][k] <= 100 for n in rows for k in demo.RECALLS)
    assert len(list((tmp_path / "teachers").glob("*/checkpoint_best.pth"))) == 1

    demo.print_table(first)
    table = capsys.readouterr().out
    assert "| distilled |" in table and "| not distilled |" in table and "% of teacher" in table

    # the second run reuses the cached teacher (same yaml, data and options)
    second = demo.run_demo(str(tmp_path / "out2"), options, repeats=1, data_preset="test")
    teacher = second["rows"][0]
    assert teacher["cached"] and teacher["seconds"] == 0.0
    assert teacher["mean_recall"] == pytest.approx(rows["teacher"]["mean_recall"])
