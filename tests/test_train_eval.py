"""End to end through `python -m lavis_dlip.train` / `.evaluate` on CPU: LAVIS's
BlipRetrieval, BlipCaption and BlipVQA code at small sizes learn on the demo data,
scored with LAVIS's own metrics, and beat the untrained model."""

from __future__ import annotations

import json

import pytest

from conftest import CONFIGS, check, output_dirs, read_metrics, run_main

CASES = {
    # config, metric compared with the untrained model, metrics that must be reported
    "retrieval": ("txt_r_mean", {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10"}),
    "caption": ("CIDEr", {"Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}),
    "vqa": ("agg_metrics", {"agg_metrics", "yes/no", "number", "other"}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_train_beats_untrained_and_evaluate_reloads(tmp_path, demo_test_data, name):
    metric, reported = CASES[name]
    cfg = CONFIGS / f"{name}.yaml"
    # retrieval: validation picks the best epoch (run.best_metric); captioning: generation-heavy
    # validation would only repeat what the test split scores, so it is left out (latest checkpoint)
    extra = {"retrieval": ["run.max_epoch=3", "run.best_metric=r_mean"],
             "caption": ["run.valid_splits=[]"]}.get(name, [])
    # VQA learns its answers from the smoke data's 192 questions; the others need the test data
    data = ["datasets.dlip_local_vqa.base_dir=${dlip_demo_data:smoke}"] if name == "vqa" else []

    # the before/after comparisons read one metric: captioning scores the rest (METEOR's Java) only once
    quick = ["run.caption_scorers=[Bleu,CIDEr]"] if name == "caption" else []
    quick, extra = quick + data, extra + data
    untrained = run_main("lavis_dlip.evaluate", cfg, f"run.output_dir={tmp_path}/untrained", *quick, cwd=tmp_path)
    check(untrained)
    before = read_metrics(output_dirs(tmp_path / "untrained")[0])["test"]

    trained = run_main("lavis_dlip.train", cfg, f"run.output_dir={tmp_path}/trained", *extra, cwd=tmp_path)
    check(trained)
    job = output_dirs(tmp_path / "trained")[0]
    after = read_metrics(job)["test"]

    assert reported <= set(after), after
    assert after[metric] > before[metric], (before, after)

    # the runner logged every loss term per epoch, and kept its checkpoints
    logs = [json.loads(line) for line in (job / "log.txt").read_text().splitlines() if line.startswith('{"train_')]
    assert logs and all(float(entry["train_loss"]) > 0 for entry in logs)
    if name == "retrieval":
        assert {"train_loss_itc", "train_loss_itm"} <= set(logs[0])
        # run.best_metric picked checkpoint_best.pth: the epoch with the best mean of all recalls
        val = [json.loads(line) for line in (job / "log.txt").read_text().splitlines() if line.startswith('{"val_')]
        best = max(range(len(val)), key=lambda e: (float(val[e]["val_r_mean"]), -e))
        assert read_metrics(job)["best_metric"] == "r_mean" and read_metrics(job)["best_epoch"] == best
    assert (job / "checkpoint_latest.pth").is_file()

    # evaluate a checkpoint of that run: LAVIS's evaluation code, the same numbers
    best = job / ("checkpoint_best.pth" if (job / "checkpoint_best.pth").exists() else "checkpoint_latest.pth")
    again = run_main("lavis_dlip.evaluate", cfg, f"run.output_dir={tmp_path}/again", *quick, cwd=tmp_path,
                    extra=["--checkpoint", str(best)])
    check(again)
    assert read_metrics(output_dirs(tmp_path / "again")[0])["test"][metric] == pytest.approx(after[metric])
