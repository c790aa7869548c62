"""Every bad input a new user is likely to try gets exit code 2, one line on stderr
naming the key (and the file), and leaves nothing written: no job directory, no
change to an earlier run's files.

The cases run the real command (``lavis_dlip.train`` / ``evaluate`` main) in this
process; most stop at validation, the checkpoint cases after the data is built.
``docs/bad_inputs.md`` lists the same cases (``python tests/test_bad_inputs.py``
prints the table from this file and what each case prints).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from conftest import CONFIGS, REPO

RETRIEVAL = CONFIGS / "retrieval.yaml"
DISTILL = CONFIGS / "distill_retrieval.yaml"
DS = "datasets.dlip_local_retrieval"


# ----------------------------------------------------------------------------- files the cases use
def student_ckpt(path: Path, **overrides) -> Path:
    """A runner-style checkpoint of the `test` retrieval student (random values)."""
    import torch

    from lavis_dlip.testing.stand_ins import blip_checkpoint

    blip_checkpoint("dlip_retrieval", "test", str(path), **overrides)
    state = torch.load(path, weights_only=False)
    torch.save({"model": state["model"], "optimizer": {"state": {}, "param_groups": []}, "epoch": 0}, path)
    return path


def mid_epoch_of_two(path: Path) -> Path:
    """A checkpoint written mid-epoch by two processes (``run.save_every_n_steps``)."""
    import torch

    student_ckpt(path)
    state = torch.load(path, weights_only=False)
    torch.save({**state, "positions": [{"batches": 3}, {"batches": 3}]}, path)
    return path


def garbage(path: Path) -> Path:
    path.write_bytes(b"not a checkpoint\x00" * 64)
    return path


def truncated(path: Path) -> Path:
    student_ckpt(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def no_optimizer(path: Path) -> Path:
    import torch

    torch.save({"model": {}}, path)
    return path


def wider(path: Path) -> Path:
    return student_ckpt(path, vision={"width": 96, "heads": 3})


def a_file(path: Path) -> Path:
    path.write_text("a file where a directory should be")
    return path


def records(split: str, change: Callable[[list], None]) -> Callable[[Path], Path]:
    """The test data's retrieval ``split`` file, changed by ``change``, written to the case's path."""
    def make(path: Path) -> Path:
        import json

        from lavis_dlip.datasets.demo_data import ensure

        recs = json.loads((ensure("test") / f"retrieval_{split}.json").read_text())
        change(recs)
        path.write_text(json.dumps(recs))
        return path
    return make


def one_id(recs: list) -> None:  # ten different images under image_id 0
    for rec in recs[:20]:
        rec["image_id"] = 0


def old_run(tmp: Path, make: Callable[[Path], Path]) -> Path:
    """An earlier run's directory holding ``log.txt`` and the checkpoint ``make`` writes."""
    job = tmp / "old_run"
    job.mkdir()
    (job / "log.txt").write_text('{"train_loss": "1.0"}\n')
    return make(job / "checkpoint_latest.pth")


# ----------------------------------------------------------------------------- the cases
@dataclass
class Case:
    id: str
    what: str  # the bad input, as the docs table shows it
    options: list[str]
    words: list[str]  # must all be in the error line
    cfg: Path = RETRIEVAL
    command: str = "train"
    files: dict[str, Callable[[Path], Path]] = field(default_factory=dict)  # {name}: made in tmp


CASES = [
    # top level and run
    Case("top_level_typo", "an unknown top-level section `optim:`", ["optim.lr=0.1"],
         ["unknown top-level section 'optim'", "optimiser settings go under run"]),
    Case("run_key_typo", "`run.max_epochs=1` (for `max_epoch`)", ["run.max_epochs=1"],
         ["unknown key 'run.max_epochs'", "did you mean 'run.max_epoch'"]),
    Case("run_int_not_number", "`run.max_epoch=abc`", ["run.max_epoch=abc"],
         ["run.max_epoch must be an integer >= 1", "'abc'"]),
    Case("run_negative_lr", "`run.init_lr=-1`", ["run.init_lr=-1"], ["run.init_lr must be a number > 0"]),
    Case("run_zero_batch", "`run.batch_size_train=0`", ["run.batch_size_train=0"],
         ["run.batch_size_train must be an integer >= 1", "got 0"]),
    Case("run_float_batch", "`run.batch_size_eval=2.5`", ["run.batch_size_eval=2.5"],
         ["run.batch_size_eval must be an integer >= 1"]),
    Case("run_flag_not_bool", "`run.amp=maybe`", ["run.amp=maybe"], ["run.amp must be True or False", "'maybe'"]),
    Case("run_split_not_list", "`run.train_splits=train`", ["run.train_splits=train"],
         ["run.train_splits must be a list of names"]),
    Case("run_min_above_init", "`run.min_lr=0.1` above `run.init_lr` 0.001", ["run.min_lr=0.1"],
         ["run.min_lr (0.1) is above run.init_lr (0.001)"]),
    Case("run_lr_mult_negative", "`run.lr_mult.visual_encoder=-1`", ["run.lr_mult.visual_encoder=-1"],
         ["run.lr_mult.visual_encoder must be a number >= 0"]),
    Case("run_choice", "`run.inference_method=beam`", ["run.inference_method=beam"],
         ["run.inference_method must be one of rank, generate"]),
    Case("run_missing_key", "no `run.init_lr`", ["run.init_lr=null"], ["missing key(s) run.init_lr"]),
    Case("run_task", "`run.task=retreival`", ["run.task=retreival"], ["run.task 'retreival' is not a registered task"]),
    Case("run_device", "`run.device=tpu`", ["run.device=tpu"], ["run.device 'tpu' must be one of"]),
    Case("options_not_yaml", "`--options run.max_epoch=[1` (not valid yaml)", ["run.max_epoch=[1"],
         ["--options run.max_epoch=[1: the value is not valid yaml"]),
    Case("cfg_path_directory", "`--cfg-path tests/configs` (a directory)", [], ["is a directory", "give a run yaml"],
         cfg=CONFIGS),
    Case("seed_from_env", "`run.seed: ${oc.env:SEED,42}` (oc.env gives a string)",
         ["run.seed=${{oc.env:DLIP_UNSET_SEED,42}}"], ["run.seed must be an integer >= 0", "'42'", "oc.decode"]),
    Case("output_dir_file", "`run.output_dir` a file", ["run.output_dir={f}"],
         ["run.output_dir:", "is a file, not a directory"], files={"f": a_file}),
    Case("output_dir_read_only", "`run.output_dir` where nothing can be written (`/sys/dlip`)",
         ["run.output_dir=/sys/dlip"], ["run.output_dir: cannot write in /sys"]),
    Case("batch_above_split", "`run.batch_size_train` larger than the train split (768 records)",
         ["run.batch_size_train=1024", "model.queue_size=1024"],
         ["fewer records", "run.batch_size_train"]),
    # datasets
    Case("dataset_key_typo", f"`{DS}.buildinfo`", [f"{DS}.buildinfo.images.storage=x"],
         [f"unknown key '{DS}.buildinfo'", "did you mean"]),
    Case("dataset_verify_choice", f"`{DS}.verify_images=fulll`", [f"{DS}.verify_images=fulll"],
         [f"{DS}.verify_images must be one of none, exists, header, full", "'fulll'"]),
    Case("dataset_processor", f"`{DS}.vis_processor.train.name=blip_image_evl`",
         [f"{DS}.vis_processor.train.name=blip_image_evl"],
         [f"{DS}.vis_processor.train.name 'blip_image_evl' is not a registered processor"]),
    Case("dataset_processor_split", f"`{DS}.text_processor.test` (LAVIS reads train and eval)",
         [f"{DS}.text_processor.test.name=blip_caption"], [f"unknown key '{DS}.text_processor.test'"]),
    Case("dataset_builder", "`datasets.dlip_local_retreival`",
         ["datasets.dlip_local_retreival.build_info.images.storage=x"],
         ["datasets.dlip_local_retreival is not a registered dataset builder"]),
    Case("image_id_conflict", "ten images under one `image_id` in a train file",
         [f"{DS}.build_info.annotations.train.storage={{ann}}"],
         ["give image_id 0 to two images", "give each image its own id"],
         files={"ann": records("train", one_id)}),
    Case("eval_image_twice", "an eval file that lists one image twice",
         [f"{DS}.build_info.annotations.test.storage={{ann}}"],
         ["both list image", "merge them into one record"],
         files={"ann": records("test", lambda recs: recs.append(dict(recs[0])))}),
    Case("data_file_missing", f"`{DS}.build_info.annotations.train.storage=nope.json`",
         [f"{DS}.build_info.annotations.train.storage=nope.json"], ["nope.json"]),
    # model
    Case("model_key_typo", "`model.vison.depth=2`", ["model.vison.depth=2"],
         ["unknown key 'model.vison'", "did you mean 'model.vision'"]),
    Case("model_size_not_int", "`model.vision.depth=abc`", ["model.vision.depth=abc"],
         ["model.vision.depth must be an integer >= 1", "'abc'"]),
    Case("model_init_strategy", "`model.init.vision.strategy=teacher_reducd`",
         ["model.init.vision.strategy=teacher_reducd"], ["model.init.vision.strategy 'teacher_reducd' is unknown"]),
    Case("model_tokenizer", "`model.tokenizer=/nonexistent/vocab`", ["model.tokenizer=/nonexistent/vocab"],
         ["model.tokenizer: Cannot load the BLIP tokenizer", "/nonexistent/vocab"]),
    Case("init_teacher_missing", "`model.init.teacher=missing.pth`",
         ["model.init.teacher=missing.pth", "model.init.vision.strategy=teacher"],
         ["model.init.teacher: missing.pth: no such file"]),
    Case("init_teacher_garbage", "`model.init.teacher` a file that is not a checkpoint",
         ["model.init.teacher={bad}", "model.init.vision.strategy=teacher"],
         ["model.init.teacher:", "is not a readable PyTorch checkpoint"], files={"bad": garbage}),
    Case("init_source_missing", "`model.init.text.source=/nonexistent/bert` (strategy pretrained)",
         ["model.init.text.strategy=pretrained", "model.init.text.source=/nonexistent/bert"],
         ["model.init.text.source: /nonexistent/bert: no such file or directory"]),
    # distillation
    Case("teacher_ckpt_missing", "`distill.teacher.checkpoint=missing.pth`", ["distill.teacher.checkpoint=missing.pth"],
         ["distill.teacher.checkpoint: missing.pth: no such file"], cfg=DISTILL),
    Case("teacher_ckpt_before_data", "a missing teacher checkpoint and a missing data file: the teacher is named "
         "first, before any image is opened", ["distill.teacher.checkpoint=missing.pth",
                                                f"{DS}.build_info.annotations.train.storage=nope.json"],
         ["distill.teacher.checkpoint: missing.pth: no such file"], cfg=DISTILL),
    Case("teacher_ckpt_garbage", "`distill.teacher.checkpoint` a file that is not a checkpoint",
         ["distill.teacher.checkpoint={bad}"], ["distill.teacher.checkpoint:", "bad.pth",
                                               "is not a readable PyTorch checkpoint"],
         cfg=DISTILL, files={"bad": garbage}),
    Case("teacher_ckpt_shape", "`distill.teacher.checkpoint` of another model's shape",
         ["distill.teacher.checkpoint={ckpt}"], ["distill.teacher.checkpoint:", "does not fit DlipRetrieval",
                                                 "shape mismatches"],
         cfg=DISTILL, files={"ckpt": student_ckpt}),
    Case("teacher_key_typo", "`distill.teacher.chekpoint`", ["distill.teacher.chekpoint=x"],
         ["unknown key 'distill.teacher.chekpoint'"], cfg=DISTILL),
    Case("terms_all_zero", "every `distill.terms` weight 0",
         ["distill.terms=[{{name: itc, weight: 0}}, {{name: itc_kd, weight: 0.0}}]"],
         ["every term has weight 0", "nothing trains"], cfg=DISTILL),
    Case("layer_map_range", "a term's layer map outside the student (`layer_map: {7: 0}`)",
         ["distill.terms.4.layer_map={{7: 0}}"], ["distill.terms", "7"], cfg=DISTILL),
    Case("old_and_new_key", "a term's old key name beside its new one (`layers` and `layer_map`)",
         ["distill.terms.4.layers=last"], ["distill.terms[4]", "both 'layers'", "keep 'layer_map'"], cfg=DISTILL),
    Case("hf_teacher_missing", "`distill.teacher.checkpoint=hf:<a path that holds no BLIP>`",
         ["distill.teacher.cfg_path=null", "distill.teacher.checkpoint=hf:{f}"],
         ["distill.teacher.checkpoint", "could not read a BLIP config"], cfg=DISTILL, files={"f": a_file}),
    Case("timm_source_unknown", "`model.init.vision.source=timm:no_such_vit`",
         ["model.init={{vision: {{strategy: pretrained, source: 'timm:no_such_vit'}}}}"],
         ["model.init.vision.source", "timm could not load 'no_such_vit'"]),
    # evaluation
    Case("eval_ckpt_missing", "`evaluate --checkpoint missing.pth`", [], ["model.finetuned: missing.pth: no such file"],
         command="evaluate:missing.pth"),
    Case("eval_ckpt_garbage", "`evaluate --checkpoint` a file that is not a checkpoint", [],
         ["model.finetuned:", "is not a readable PyTorch checkpoint"], command="evaluate:{bad}",
         files={"bad": garbage}),
    Case("eval_ckpt_shape", "`evaluate --checkpoint` of another preset", [],
         ["model.finetuned:", "does not fit DlipRetrieval", "e.g. visual_encoder"],
         command="evaluate:{ckpt}", files={"ckpt": wider}),
    # resume
    Case("resume_missing", "`run.resume_ckpt_path=missing.pth`", ["run.resume_ckpt_path=missing.pth"],
         ["run.resume_ckpt_path: missing.pth: no such file"]),
    Case("resume_directory", "`run.resume_ckpt_path` a directory", ["run.resume_ckpt_path={dir}"],
         ["run.resume_ckpt_path:", "a directory, not a checkpoint file"], files={"dir": lambda p: p.mkdir() or p}),
    Case("resume_truncated", "`run.resume_ckpt_path` truncated (killed copy)", ["run.resume_ckpt_path={ckpt}"],
         ["run.resume_ckpt_path:", "is not a readable PyTorch checkpoint"], files={"ckpt": truncated}),
    Case("resume_not_runner", "`run.resume_ckpt_path` a bare state dict", ["run.resume_ckpt_path={ckpt}"],
         ["has no 'optimizer' entry", "checkpoint_latest.pth"], files={"ckpt": no_optimizer}),
    Case("resume_other_world", "`run.resume_ckpt_path` written mid-epoch by 2 processes, resumed in 1",
         ["run.resume_ckpt_path={ckpt}"],
         ["run.resume_ckpt_path:", "stopped mid-epoch with 2 processes, this run has 1"],
         files={"ckpt": mid_epoch_of_two}),
    Case("resume_other_model", "`run.resume_ckpt_path` of another model's shape", ["run.resume_ckpt_path={ckpt}"],
         ["run.resume_ckpt_path:", "does not fit DlipRetrieval"], files={"ckpt": wider}),
]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def prepare(case: Case, tmp: Path) -> list[str]:
    """Make the case's files in ``tmp``; the command line that runs it there."""
    names = {}
    for name, make in case.files.items():
        suffix = "json" if name == "ann" else "pth"
        made = old_run(tmp, make) if case.id.startswith("resume") else make(tmp / f"{name}.{suffix}")
        names[name] = str(made)
    argv = [case.command.partition(":")[0], "--cfg-path", str(case.cfg)]
    checkpoint = case.command.partition(":")[2]
    if checkpoint:
        argv += ["--checkpoint", checkpoint.format(**names)]
    options = ["run.output_dir=out", "run.progress=False"] + [o.format(**names) for o in case.options]
    if case.cfg == DISTILL and not any(o.startswith("distill.teacher.checkpoint") for o in options):
        options.append("distill.teacher.load_weights=False")  # no trained teacher needed to reach the error
    return argv + ["--options", *options]


def invoke(argv: list[str], tmp: Path) -> tuple[int, str]:
    """``python -m lavis_dlip.<argv[0]> argv[1:]`` in this process, in ``tmp``; (exit code, stderr)."""
    import contextlib
    import io

    from lavis_dlip import evaluate, train

    err = io.StringIO()
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        with contextlib.redirect_stderr(err):
            code = (evaluate if argv[0] == "evaluate" else train).main(argv[1:])
    finally:
        os.chdir(cwd)
    return code, err.getvalue()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(case, tmp_path, demo_test_data):
    argv = prepare(case, tmp_path)
    before = snapshot(tmp_path)
    code, stderr = invoke(argv, tmp_path)
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    line = lines[0]
    for word in case.words:
        assert word in line, f"{word!r} not in: {line}"
    assert case.cfg.name in line, line  # names the yaml
    assert snapshot(tmp_path) == before  # no job directory, no change to an earlier run's files


def test_every_case_is_in_the_docs_table():
    table = (REPO / "docs" / "bad_inputs.md").read_text()
    missing = [c.id for c in CASES if f"`{c.id}`" not in table]
    assert not missing, f"docs/bad_inputs.md lacks rows for {missing}"


if __name__ == "__main__":  # the docs table: python tests/test_bad_inputs.py > rows.md
    import tempfile

    print("| case | bad input | exit | what it prints (`error: ` line) |\n|---|---|---|---|")
    for case in CASES:
        with tempfile.TemporaryDirectory() as d:
            code, stderr = invoke(prepare(case, Path(d)), Path(d))
        line = next((x for x in stderr.splitlines() if x.startswith("error: ")), stderr.strip()[-200:])
        line = line.replace(d, "<tmp>").replace(str(REPO) + "/", "").replace("|", "\\|")
        print(f"| `{case.id}` | {case.what} | {code} | {line[len('error: '):]} |")


def test_old_key_names_still_load_with_one_deprecation_line(caplog):
    """A yaml with the terms' and model.init's old key names builds the same config as one with
    the new names, naming each old key once; both names of one key at once are refused."""
    import logging

    from omegaconf import OmegaConf

    from lavis_dlip.errors import ConfigError
    from lavis_dlip.renamed import upgrade

    old = OmegaConf.create({
        "model": {"init": {"heads": {"strategy": "teacher_reduced"},
                           "vision": {"strategy": "teacher", "layers": "last"}}},
        "distill": {"terms": [{"name": "attention", "stream": "fusion", "kind": "attn", "heads": "matched",
                               "layers": {0: 1}}, {"name": "hidden", "stream": "text"}]}})
    new = {"model": {"init": {"task_heads": {"strategy": "teacher_reduced"},
                              "vision": {"strategy": "teacher", "layer_map": "last"}}},
           "distill": {"terms": [{"name": "attention", "module": "fusion", "maps": "self", "head_map": "matched",
                                  "layer_map": {0: 1}}, {"name": "hidden", "module": "text"}]}}
    with caplog.at_level(logging.WARNING, logger="lavis_dlip.renamed"):
        upgrade(old)
    assert OmegaConf.to_container(old) == new
    said = [r.getMessage() for r in caplog.records]
    for where in ("model.init.heads", "model.init.vision.layers", "distill.terms[0].stream", "distill.terms[0].kind",
                  "distill.terms[0].heads", "distill.terms[0].layers", "distill.terms[1].stream"):
        assert sum(m.startswith(f"{where} is deprecated") for m in said) == 1, (where, said)
    with pytest.raises(ConfigError, match=r"distill.terms\[0\]: both 'layers' \(its old name\) and 'layer_map'"):
        upgrade({"distill": {"terms": [{"name": "hidden", "module": "text", "layers": "last", "layer_map": "first"}]}})
