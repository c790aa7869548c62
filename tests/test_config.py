"""Bad configs fail early, with errors that name the file and the key."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from conftest import CONFIGS, REPO, run_main


def _write(tmp_path, edit) -> str:
    cfg = OmegaConf.load(CONFIGS / "retrieval.yaml")
    edit(cfg)
    path = tmp_path / "run.yaml"
    path.write_text(OmegaConf.to_yaml(cfg))
    return str(path)


def _load(path, *options):
    from lavis_dlip.config import load_config

    return load_config(path, list(options))


def test_invalid_yaml_names_the_file(tmp_path):
    from lavis_dlip.errors import ConfigError

    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  arch: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid yaml"):
        _load(str(path))
    with pytest.raises(ConfigError, match="config file not found"):
        _load(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.model.update(arch="dlip_retrival"), "Did you mean: dlip_retrieval"),
        (lambda c: c.model.update(model_type="huge"), "model.model_type 'huge' is not a type of 'dlip_retrieval'"),
        (lambda c: c.run.update(task="retreival"), "run.task 'retreival' is not a registered task"),
        (lambda c: c.run.update(runner="runner_dlp"), "Did you mean: runner_dlip"),
        (lambda c: c.run.update(lr_sched="cosine"), "run.lr_sched 'cosine'"),
        (lambda c: c.run.pop("init_lr"), "missing key(s) run.init_lr"),
        (lambda c: c.run.update(device="tpu"), "run.device 'tpu'"),
        (lambda c: c.pop("datasets"), "missing top-level section 'datasets'"),
        (lambda c: c.run.update(caption_scorers=["CIDEr", "Meteor"]),
         "run.caption_scorers: ['CIDEr', 'Meteor']: choose from Bleu, METEOR, ROUGE_L, CIDEr, SPICE, including "
         "Bleu and CIDEr (agg_metrics is CIDEr + Bleu_4); unknown: Meteor"),
    ],
)
def test_bad_names_and_keys(tmp_path, edit, message):
    from lavis_dlip.errors import ConfigError

    path = _write(tmp_path, edit)
    with pytest.raises(ConfigError) as err:
        _load(path)
    assert message in str(err.value)
    assert "run.yaml" in str(err.value)


def test_unknown_dataset_builder(tmp_path):
    from lavis_dlip.errors import ConfigError

    def edit(c):
        c.datasets["dlip_local_retreival"] = c.datasets.pop("dlip_local_retrieval")

    with pytest.raises(ConfigError, match="datasets.dlip_local_retreival is not a registered dataset builder"):
        _load(_write(tmp_path, edit))


def test_unknown_model_keys_are_named():
    import lavis_dlip  # noqa: F401
    from lavis.common.registry import registry

    from lavis_dlip.errors import ConfigError

    cls = registry.get_model_class("dlip_retrieval")
    base = OmegaConf.load(cls.default_config_path("test")).model
    with pytest.raises(ConfigError, match=r"unknown key 'model.vison' \(did you mean 'model.vision'\?\)"):
        cls.from_config(OmegaConf.merge(base, {"vison": {"depth": 2}}))
    with pytest.raises(ConfigError, match="unknown key 'model.vision.dept'"):
        cls.from_config(OmegaConf.merge(base, {"vision": {"dept": 2}}))
    with pytest.raises(ConfigError, match="model.vision.width .* divisible by model.vision.heads"):
        cls.from_config(OmegaConf.merge(base, {"vision": {"width": 65}}))


def test_cli_prints_one_clear_line(tmp_path):
    path = _write(tmp_path, lambda c: c.model.update(arch="nope_model"))
    proc = run_main("lavis_dlip.train", path, cwd=tmp_path)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "model.arch 'nope_model' is not a registered LAVIS model" in last
    assert "Traceback" not in proc.stderr


def test_queue_size_must_fit_batch(tmp_path, demo_test_data):
    proc = run_main("lavis_dlip.train", CONFIGS / "retrieval.yaml", "model.queue_size=60",
                   f"run.output_dir={tmp_path}/out", cwd=tmp_path)
    assert proc.returncode == 2
    assert "model.queue_size (60) must be a multiple of run.batch_size_train" in proc.stderr


def test_cuda_device_without_gpu_is_a_clear_error(tmp_path, demo_test_data):
    import torch

    if torch.cuda.is_available():  # this check is about CPU-only machines
        return
    proc = run_main("lavis_dlip.train", CONFIGS / "retrieval.yaml", "run.device=cuda",
                   f"run.output_dir={tmp_path}/out", cwd=tmp_path)
    assert proc.returncode == 2 and "run.device is 'cuda' but no CUDA device is visible" in proc.stderr


def test_project_configs_all_validate():
    """Every run yaml loads; every study yaml's base, teacher and arms are known."""
    from lavis_dlip.study.spec import load_study

    studies = sorted((REPO / "projects" / "dlip" / "study").glob("*.yaml"))
    for path in sorted((REPO / "projects").rglob("*.yaml")):
        if path in studies:
            spec = load_study(str(path))
            assert spec.base.is_file() and len(spec.seeds) >= 3 and spec.arms, path
            continue
        cfg = _load(str(path))
        assert cfg.run_cfg.runner == "runner_dlip", path


@pytest.mark.parametrize("runner", ["runner_base", "runner_iter"])
def test_distillation_tasks_refuse_lavis_runners_at_load(runner):
    """LAVIS's runners expect a bare loss from train_step and know no teacher: refused
    when the config is loaded, before anything is built."""
    from lavis_dlip.errors import ConfigError

    path = str(CONFIGS / "distill_retrieval.yaml")
    with pytest.raises(ConfigError) as err:
        _load(path, f"run.runner={runner}")
    assert f"run.runner '{runner}' cannot run run.task 'dlip_distill_retrieval'" in str(err.value)
    assert "run.runner: runner_dlip" in str(err.value) and "distill_retrieval.yaml" in str(err.value)


def test_distill_section_needs_a_distillation_task(tmp_path):
    from lavis_dlip.errors import ConfigError

    def edit(c):
        c.distill = {"teacher": {"arch": "blip_retrieval", "model_type": "coco"}, "terms": [{"name": "itc_kd"}]}

    with pytest.raises(ConfigError, match="a 'distill' section is given but run.task 'retrieval' does not distill"):
        _load(_write(tmp_path, edit))
