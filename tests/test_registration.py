"""import lavis_dlip registers the plugin with LAVIS, idempotently; models load like LAVIS's."""

from __future__ import annotations

import importlib

import pytest
import torch
from PIL import Image


def test_import_registers_every_class():
    import lavis_dlip
    from lavis.common.registry import registry

    from lavis_dlip.models import DlipCaption, DlipPretrain, DlipRetrieval, DlipVQA
    from lavis_dlip.runners import RunnerDlip
    from lavis_dlip.tasks import DlipCaptionTask

    assert registry.get_model_class("dlip_retrieval") is DlipRetrieval
    assert registry.get_model_class("dlip_caption") is DlipCaption
    assert registry.get_model_class("dlip_vqa") is DlipVQA
    assert registry.get_model_class("dlip_pretrain") is DlipPretrain
    assert registry.get_runner_class("runner_dlip") is RunnerDlip
    assert registry.get_task_class("dlip_captioning") is DlipCaptionTask
    for name in ("dlip_local_pairs", "dlip_local_retrieval", "dlip_local_caption", "dlip_local_vqa"):
        assert registry.get_builder_class(name) is not None, name
    # plugin names are prefixed; LAVIS's own stay in place
    assert registry.get_model_class("blip_retrieval").__module__.startswith("lavis.")
    assert lavis_dlip.__version__


def test_model_zoo_lists_plugin_models():
    import lavis_dlip  # noqa: F401
    from lavis.models import model_zoo

    assert model_zoo.model_zoo["dlip_retrieval"] == ["base", "small", "tiny", "test"]
    assert model_zoo.model_zoo["dlip_pretrain"] == ["base", "small", "tiny", "test"]
    assert "dlip_caption" in str(model_zoo)
    assert "blip_retrieval" in model_zoo.model_zoo


def test_importing_twice_is_harmless():
    import lavis_dlip
    from lavis.common.registry import registry

    before = dict(registry.mapping["model_name_mapping"])
    importlib.reload(lavis_dlip)
    lavis_dlip.compat.apply()
    assert registry.mapping["model_name_mapping"] == before


def test_load_model_and_preprocess_on_pil_image():
    import lavis_dlip  # noqa: F401
    from lavis.models import load_model_and_preprocess

    model, vis, txt = load_model_and_preprocess("dlip_caption", "test", is_eval=True, device="cpu")
    image = vis["eval"](Image.new("RGB", (100, 80), (200, 30, 30))).unsqueeze(0)
    assert image.shape == (1, 3, 64, 64)
    captions = model.generate({"image": image}, num_beams=1, max_length=8, min_length=2)
    assert len(captions) == 1 and isinstance(captions[0], str)
    assert txt["eval"]("A Red  Circle!") == "a red circle"
    assert not model.training


def test_strict_checkpoint_loading_names_the_bad_key(tmp_path):
    import lavis_dlip  # noqa: F401
    from lavis.models import load_model

    model = load_model("dlip_retrieval", "test", device="cpu")
    state = model.state_dict()
    state["vision_proj.weight"] = torch.zeros(3, 3)
    del state["itm_head.bias"]
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    from lavis_dlip.errors import CheckpointError

    with pytest.raises(CheckpointError) as err:
        load_model("dlip_retrieval", "test", checkpoint=str(path), device="cpu")
    assert "vision_proj.weight (3, 3) vs" in str(err.value) and "missing keys: 1, e.g. itm_head.bias" in str(err.value)
    assert str(path) in str(err.value) and "\n" not in str(err.value)

    good = tmp_path / "good.pth"
    torch.save({"model": model.state_dict()}, good)
    loaded = load_model("dlip_retrieval", "test", checkpoint=str(good), device="cpu")
    assert torch.equal(loaded.vision_proj.weight, model.vision_proj.weight)
