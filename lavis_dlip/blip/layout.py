"""BLIP's module layout, written once: where each module lives in a model and in
its state dict, which layers belong to it, its widths and heads, and the one
vocabulary that selects layers (``first``, ``last``, ``uniform``, lists, maps).

Initialisation (``model.init``), hook capture and loss terms (``distill``) and the
cost report all read this module. Widths, heads and layer counts come from the
model's own configs (the ViT's blocks, the BERTs' ``BertConfig``), never from
tensor shapes.

Modules:

* ``vision``: ``visual_encoder`` (ViT blocks);
* ``text``: ``text_encoder``'s unimodal layers (in BLIP's layout every layer, its
  self-attention and FFN; ALBEF-style split: the layers below ``fusion_layer``);
* ``fusion``: the text encoder's cross-attention (BLIP: ``crossattention.*`` of
  every layer; split: the layers from ``fusion_layer`` on);
* ``decoder``: ``text_decoder`` (BERT LM head model);
* ``heads``: ``vision_proj``, ``text_proj``, ``itm_head``, ``temp``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from torch import nn

from lavis_dlip.errors import ConfigError

MODULES = ("vision", "text", "fusion", "decoder", "task_heads")
LAYERED = ("vision", "text", "fusion", "decoder")  # modules with layers
HEAD_NAMES = ("vision_proj", "text_proj", "itm_head", "temp")
LAYER_WORDS = ("first", "last", "uniform")


@dataclass(frozen=True)
class ModuleLayout:
    """One module of one model."""

    name: str
    prefix: str  # state-dict prefix of the submodule that holds it
    layer_prefix: str  # relative to ``prefix``, with ``{i}``
    layer_ids: tuple[int, ...]  # indices (in that submodule) of this module's layers
    part: str  # which keys of a layer belong here: all, self (not cross-attention), cross
    stream: Optional[str]  # residual stream of its hidden channels: vision, text or decoder
    width: int = 0
    heads: int = 0
    ffn: int = 0
    cross_stream: Optional[str] = None  # what its cross-attention keys and values read

    @property
    def head_dim(self) -> int:
        return self.width // self.heads if self.heads else 0

    def owns(self, rel: str) -> bool:
        """Whether a key relative to a layer prefix belongs to this module."""
        cross = rel.startswith("crossattention.")
        return self.part == "all" or (self.part == "cross") == cross

    def layer_module(self, model: nn.Module, index: int) -> nn.Module:
        return model.get_submodule((self.prefix + self.layer_prefix.format(i=index)).rstrip("."))


def _bert(model: nn.Module, name: str) -> Optional[nn.Module]:
    module = getattr(model, name, None)
    return None if module is None else getattr(module, "bert", module)


def _decoder_reads_questions(model: nn.Module) -> bool:
    """BLIP's VQA answer decoder cross-attends to the fused question states."""
    from lavis.models.blip_models.blip_vqa import BlipVQA

    return isinstance(model, BlipVQA)


def _decoder_tied(model: nn.Module) -> bool:
    """BLIP pre-training ties the decoder to the text encoder (all but self-attention)."""
    enc, dec = _bert(model, "text_encoder"), _bert(model, "text_decoder")
    if enc is None or dec is None or not len(enc.encoder.layer) or not len(dec.encoder.layer):
        return False
    return enc.encoder.layer[0].intermediate.dense.weight is dec.encoder.layer[0].intermediate.dense.weight


def module_layout(model: nn.Module, module: str) -> Optional[ModuleLayout]:
    """Where ``module`` lives in ``model``; None if the model has no such module."""
    if module == "vision":
        ve = getattr(model, "visual_encoder", None)
        if ve is None:
            return None
        block = ve.blocks[0]
        return ModuleLayout("vision", "visual_encoder.", "blocks.{i}.", tuple(range(len(ve.blocks))), "all",
                            "vision", int(ve.embed_dim), int(block.attn.num_heads), int(block.mlp.fc1.out_features))
    if module in ("text", "fusion"):
        bert = _bert(model, "text_encoder")
        if bert is None:
            return None
        cfg = bert.config
        total, split = cfg.num_hidden_layers, getattr(cfg, "fusion_layer", None)
        if module == "text":
            ids, part = range(total if split is None else split), "self" if split is None else "all"
        else:
            ids, part = range(0 if split is None else split, total), "cross" if split is None else "all"
        return ModuleLayout(module, "text_encoder.", "encoder.layer.{i}.", tuple(ids), part, "text",
                            cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size,
                            cross_stream="vision" if module == "fusion" else None)
    if module == "decoder":
        bert = _bert(model, "text_decoder")
        if bert is None:
            return None
        cfg = bert.config
        return ModuleLayout("decoder", "text_decoder.", "bert.encoder.layer.{i}.", tuple(range(cfg.num_hidden_layers)),
                            "all", "text" if _decoder_tied(model) else "decoder",
                            cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size,
                            cross_stream="text" if _decoder_reads_questions(model) else "vision")
    if module == "task_heads":
        if not any(hasattr(model, name) for name in HEAD_NAMES):
            return None
        return ModuleLayout("task_heads", "", "", (), "all", None)
    raise ConfigError(f"unknown module '{module}' (known: {', '.join(MODULES)})")


def layouts(model: nn.Module) -> dict[str, ModuleLayout]:
    """Every module the model has."""
    return {m: lay for m in MODULES if (lay := module_layout(model, m)) is not None}


def module_layers(model: nn.Module, module: str) -> list[nn.Module]:
    """The layer modules of one module, in order (empty if the model has none)."""
    lay = module_layout(model, module)
    return [] if lay is None else [lay.layer_module(model, i) for i in lay.layer_ids]


def module_width(model: nn.Module, module: str) -> int:
    lay = module_layout(model, module)
    if lay is None:
        raise ConfigError(f"{type(model).__name__} has no {module} module")
    return lay.width


QUEUES = ("image_queue", "text_queue", "idx_queue", "queue_ptr")  # ITC queues (BlipRetrieval, BlipPretrain)


def momentum_source(key: str) -> Optional[str]:
    """The key a momentum copy follows (``visual_encoder_m.x`` -> ``visual_encoder.x``), else None."""
    top, _, rest = key.partition(".")
    return f"{top[:-2]}.{rest}" if top.endswith("_m") else None


def is_training_state(key: str) -> bool:
    """Momentum copies and ITC queues: what BLIP trains with and infers without."""
    return momentum_source(key) is not None or key.split(".")[0] in QUEUES


def module_of(key: str, model: nn.Module, found: Optional[Mapping[str, ModuleLayout]] = None) -> Optional[str]:
    """The module a state-dict key belongs to; None for momentum copies, queues and
    what is not BLIP's (the distillation projections)."""
    top = key.split(".")[0]
    if is_training_state(key):
        return None
    if top in HEAD_NAMES:
        return "task_heads"
    found = layouts(model) if found is None else found
    owners = [lay for lay in found.values() if lay.prefix and key.startswith(lay.prefix)]
    for lay in owners:
        start = lay.prefix + lay.layer_prefix.split("{i}")[0]
        if key.startswith(start):
            index, _, rel = key[len(start):].partition(".")
            if index.isdigit() and int(index) in lay.layer_ids and lay.owns(rel):
                return lay.name
    shared = [lay for lay in owners if lay.name in ("vision", "text", "decoder")]
    return shared[0].name if shared else None


def module_keys(state_keys: Any, lay: ModuleLayout, model: nn.Module) -> tuple[list[str], list[list[str]]]:
    """(shared keys, keys per layer), relative to ``lay.prefix`` and its layer prefix."""
    keys = list(state_keys)
    found = layouts(model)
    mine = [k for k in keys if module_of(k, model, found) == lay.name and not k.endswith("position_ids")]
    per_layer = []
    in_layers = set()
    for i in lay.layer_ids:
        p = lay.prefix + lay.layer_prefix.format(i=i)
        rel = [k[len(p):] for k in mine if k.startswith(p)]
        in_layers.update(p + r for r in rel)
        per_layer.append(rel)
    shared = [k[len(lay.prefix):] for k in mine if k not in in_layers]
    return shared, per_layer


# ----------------------------------------------------------------------------- layer selection
def select_layers(spec: Any, n_student: int, n_source: int, where: str, complete: bool = True) -> dict[int, int]:
    """Student layer -> source layer: the one meaning of each word, for ``model.init``
    and ``distill.terms`` alike (S student layers, T source layers):

    * ``first``: [0, 1, ..., S-1];
    * ``last``: [T-S, ..., T-1];
    * ``uniform``: evenly spread, first and last included: round(i (T-1) / (S-1)),
      halves rounded up (S = 1: the last layer); 12 -> 6: [0, 2, 4, 7, 9, 11];
    * a list with one source layer per student layer;
    * a ``{student: source}`` mapping (negative indices count from the end); with
      ``complete=False`` (loss terms) it may name only some student layers.
    """
    if n_student == 0:
        return {}
    if n_source == 0:
        raise ConfigError(f"{where}: the source has no layers in this module")
    if isinstance(spec, str) or spec is None:
        word = spec or "uniform"
        if word not in LAYER_WORDS:
            raise ConfigError(f"{where}.layer_map must be {', '.join(LAYER_WORDS)}, a list or a mapping, got '{word}'")
        if n_student > n_source:
            raise ConfigError(f"{where}.layer_map: '{word}' needs a source at least as deep as the student "
                              f"(student {n_student} layers, source {n_source}); give a list")
        if word == "first":
            chosen = list(range(n_student))
        elif word == "last":
            chosen = list(range(n_source - n_student, n_source))
        elif n_student == 1:
            chosen = [n_source - 1]
        else:
            chosen = [math.floor(i * (n_source - 1) / (n_student - 1) + 0.5) for i in range(n_student)]
        return dict(enumerate(chosen))
    if isinstance(spec, Mapping):
        pairs = [(int(s), int(t)) for s, t in spec.items()]
    elif hasattr(spec, "__iter__"):
        chosen = [int(i) for i in spec]
        if len(chosen) != n_student:
            raise ConfigError(f"{where}.layer_map lists {len(chosen)} layers, the student has {n_student}")
        pairs = list(enumerate(chosen))
    else:
        raise ConfigError(f"{where}.layer_map must be {', '.join(LAYER_WORDS)}, a list or a mapping, got {spec!r}")
    mapping = {}
    for s, t in pairs:
        s, t = s + n_student if s < 0 else s, t + n_source if t < 0 else t
        if not (0 <= s < n_student and 0 <= t < n_source):
            raise ConfigError(f"{where}.layer_map: index {t if 0 <= s < n_student else s} out of range: the source has "
                              f"{n_source} layers (0..{n_source - 1}), the student {n_student}")
        mapping[s] = t
    if complete and len(mapping) != n_student:
        missing = sorted(set(range(n_student)) - set(mapping))
        raise ConfigError(f"{where}.layer_map: student layers {missing} have no source layer")
    return dict(sorted(mapping.items()))
