"""Loss terms, declared in yaml (``distill.terms``), each a small registered module.

    distill:
      terms:
        - {name: itc, weight: 1.0}                        # the student's own losses
        - {name: itm, weight: 1.0}
        - {name: itc_kd, weight: 1.0, temperature: 1.0}
        - {name: hidden, module: vision, layer_map: uniform, loss: mse, weight: 1.0}
        - {name: attention, module: fusion, maps: cross, head_map: mean, weight: 1.0}

A term sees the student's and the teacher's :class:`BlipOutputs` and returns a
scalar; the step loss is the weighted sum and every term is logged as
``loss_<key>``. Terms that compare features of different widths own a learned
linear projection (student width -> teacher width), trained with the student.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import nn

from lavis_dlip.distill.divergence import FEATURE_LOSSES, feature_loss, lse_kl, prob_kl, soft_kl, topk_kl
from lavis_dlip.errors import ConfigError, check_keys
from lavis_dlip.blip.layout import select_layers, module_layers, module_width
from lavis_dlip.distill.capture import KINDS, LAYERED, Point
from lavis_dlip.distill.outputs import BlipOutputs, DistillError
from lavis_dlip.renamed import upgrade_term

TERMS: dict[str, type[LossTerm]] = {}
COMMON = ("name", "weight", "key")


def register_term(name: str) -> Callable[[type], type]:
    def wrap(cls):
        cls.NAME = name
        TERMS[name] = cls
        return cls
    return wrap


class LossTerm(nn.Module):
    """One weighted term. Subclasses declare their yaml keys, the passes they need
    (``needs``) and the per-layer points they read (``points``)."""

    NAME = ""
    KEYS: tuple[str, ...] = ()
    needs: frozenset = frozenset()
    teacher_free = False  # True: computed from the student alone

    def __init__(self, cfg: Mapping[str, Any], student: nn.Module, teacher: nn.Module, where: str):
        super().__init__()
        check_keys(cfg, COMMON + self.KEYS, where)
        self.where = where
        self.weight = _number(cfg.get("weight", 1.0), f"{where}.weight")
        self.key = str(cfg.get("key") or self.default_key(cfg))

    def default_key(self, cfg: Mapping[str, Any]) -> str:
        return self.NAME

    def student_points(self) -> set[Point]:
        return set()

    def teacher_points(self) -> set[Point]:
        return set()

    def cache_fields(self) -> set[str]:
        """What the teacher-output cache must hold for this term (distill/cache/fields.py);
        ``online_fusion``: the teacher's fused passes must run each step."""
        return set()

    def forward(self, s: BlipOutputs, t: Optional[BlipOutputs]) -> torch.Tensor:
        raise NotImplementedError


def _number(value: Any, where: str, positive: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if number < 0 or (positive and number == 0):
        raise ConfigError(f"{where}: must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return number


def _choice(cfg: Mapping[str, Any], key: str, choices: tuple[str, ...], default: str, where: str) -> str:
    value = str(cfg.get(key, default))
    if value not in choices:
        raise ConfigError(f"{where}.{key}: '{value}' is not one of {', '.join(choices)}")
    return value


class _ModelLoss(LossTerm):
    """The student's own loss, as its LAVIS forward computes it."""

    teacher_free = True
    OUTPUT = ""

    def forward(self, s, t=None):
        return s.model_loss(self.OUTPUT)


@register_term("task")
class TaskLoss(_ModelLoss):
    """The model's total LAVIS loss (e.g. BLIP VQA's weighted answer loss)."""

    OUTPUT = "loss"


@register_term("itc")
class ITCLoss(_ModelLoss):
    OUTPUT = "loss_itc"


@register_term("itm")
class ITMLoss(_ModelLoss):
    OUTPUT = "loss_itm"


@register_term("lm")
class LMLoss(_ModelLoss):
    OUTPUT = "loss_lm"


@register_term("itc_kd")
class ITCDistill(LossTerm):
    """KL between the teacher's and the student's in-batch image-to-text and
    text-to-image similarity distributions (each model's own logit scale)."""

    KEYS = ("temperature",)
    needs = frozenset({"text"})

    def __init__(self, cfg, student, teacher, where):
        super().__init__(cfg, student, teacher, where)
        self.temperature = _number(cfg.get("temperature", 1.0), f"{where}.temperature", positive=True)

    def cache_fields(self):
        return {"image_feat", "text_feat"}

    def forward(self, s, t):
        ls, lt = s.itc_logits, t.itc_logits
        return 0.5 * (soft_kl(ls, lt, self.temperature) + soft_kl(ls.t(), lt.t(), self.temperature))


@register_term("itm_kd")
class ITMDistill(LossTerm):
    """KL on the 2-way ITM logits of the positive pairs and, with ``pairs``:

    * ``all``: the student's own hard negatives (LAVIS's), which the teacher scores too;
    * ``mined``: per image, the caption of another image that the teacher ranks
      highest (``BlipOutputs.mine_negatives``), which the student then scores; a
      teacher-output cache stores these pairs and their logits, so no teacher runs;
    * ``positives``: none."""

    KEYS = ("temperature", "pairs")
    NEEDS = {"all": {"fusion", "fusion_neg"}, "mined": {"text", "fusion", "fusion_mined"}, "positives": {"fusion"}}

    def __init__(self, cfg, student, teacher, where):
        super().__init__(cfg, student, teacher, where)
        self.temperature = _number(cfg.get("temperature", 1.0), f"{where}.temperature", positive=True)
        self.pairs = _choice(cfg, "pairs", tuple(self.NEEDS), "all", where)
        self.needs = frozenset(self.NEEDS[self.pairs])

    def cache_fields(self):
        return {"all": {"online_fusion"}, "mined": {"itm_pos", "itm_mined"}, "positives": {"itm_pos"}}[self.pairs]

    def forward(self, s, t):
        if self.pairs != "mined":
            return soft_kl(s.itm_logits(self.pairs), t.itm_logits(self.pairs), self.temperature)
        mined = t.mined
        if mined is None:
            raise DistillError("itm_kd with pairs: mined: the teacher's outputs hold no mined pairs")
        student = torch.cat([s.itm_logits("positives"), s.itm_logits_on(mined.input_ids, mined.attention_mask)])
        return soft_kl(student, torch.cat([t.itm_logits("positives"), mined.logits]), self.temperature)


@register_term("lm_kd")
class LMDistill(LossTerm):
    """Token-level KL on the decoder's next-token logits; padding (and prompt)
    positions, which the student's labels mark -100, are ignored."""

    KEYS = ("temperature",)
    needs = frozenset({"decoder"})

    def __init__(self, cfg, student, teacher, where):
        super().__init__(cfg, student, teacher, where)
        self.temperature = _number(cfg.get("temperature", 1.0), f"{where}.temperature", positive=True)

    def cache_fields(self):
        return {f"lm_t{self.temperature:g}"}

    def forward(self, s, t):
        # logits only where a token is scored: not at padding or the prompt
        ls, keep = s.lm_rows()
        if not keep.any():
            return ls.sum() * 0.0
        lse = s.lm_lse()  # the student's log-partition, when its loss computed it
        if hasattr(t, "lm_topk"):  # read from the teacher-output cache
            return topk_kl(ls, *t.lm_topk(self.temperature), self.temperature, student_lse=lse)
        if lse is not None and self.temperature == 1:
            return lse_kl(ls, lse, t.lm_rows(keep)[0], t.lm_lse(), t.lm_probs())
        return soft_kl(ls, t.lm_rows(keep)[0], self.temperature)


def _projection(s_width: int, t_width: int, always: bool) -> nn.Module:
    return nn.Linear(s_width, t_width) if always or s_width != t_width else nn.Identity()


EMBED_FIELDS = {"image_feat": "image_feat", "text_feat": "text_feat", "itm_cls": "fusion_cls",
                "decoder_cls": "decoder_cls"}
EMBED_TARGETS = {
    # target: (needs, student width, teacher width, features)
    "image_feat": ({"text"}, lambda m: m.vision_proj.out_features, lambda o: o.image_feat),
    "text_feat": ({"text"}, lambda m: m.text_proj.out_features, lambda o: o.text_feat),
    "itm_cls": ({"fusion"}, lambda m: module_width(m, "fusion"), lambda o: o.fusion_cls),
    "decoder_cls": ({"decoder"}, lambda m: module_width(m, "decoder"), lambda o: o.decoder_cls),
}


@register_term("embed")
class EmbeddingDistill(LossTerm):
    """Aligns single vectors per sample: projected ITC features (``image_feat``,
    ``text_feat``), the ITM [CLS] (``itm_cls``) and the decoder [CLS] (``decoder_cls``)."""

    KEYS = ("targets", "loss", "project")

    def __init__(self, cfg, student, teacher, where):
        super().__init__(cfg, student, teacher, where)
        targets = list(cfg.get("targets") or ["image_feat", "text_feat"])
        for target in targets:
            if target not in EMBED_TARGETS:
                raise ConfigError(f"{where}.targets: '{target}' is not one of {', '.join(EMBED_TARGETS)}")
        self.targets = targets
        self.loss = _choice(cfg, "loss", FEATURE_LOSSES, "mse", where)
        self.needs = frozenset().union(*(EMBED_TARGETS[x][0] for x in targets))
        self.proj = nn.ModuleDict({
            x: _projection(EMBED_TARGETS[x][1](student), EMBED_TARGETS[x][1](teacher), bool(cfg.get("project")))
            for x in targets
        })

    def cache_fields(self):
        return {EMBED_FIELDS[x] for x in self.targets}

    def forward(self, s, t):
        losses = [feature_loss(self.proj[x](EMBED_TARGETS[x][2](s)), EMBED_TARGETS[x][2](t), self.loss)
                  for x in self.targets]
        return torch.stack(losses).mean()


def layer_map(spec: Union[str, Mapping, list, None], student: nn.Module, teacher: nn.Module, module: str,
              where: str) -> dict[int, int]:
    """Student layer -> teacher layer of one module: the words, lists and mappings of
    ``layout.select_layers`` (the same meaning as in ``model.init``; a mapping may name
    only some student layers, e.g. ``{-1: -1}``), or ``from_init``: the layers the
    student's ``model.init`` copied into this module."""
    n_student, n_teacher = len(module_layers(student, module)), len(module_layers(teacher, module))
    if n_student == 0 or n_teacher == 0:
        raise ConfigError(f"{where}: the student ({n_student}) or teacher ({n_teacher}) has no layers in this module")
    if spec == "from_init":
        report = getattr(student, "init_report", None)
        chosen = report.layers.get(module) if report is not None else None
        if not chosen:
            raise ConfigError(f"{where}.layer_map: from_init, but model.init did not fill the {module} module from a "
                              f"source; give first, last, uniform, a list or a mapping")
        if report.source_depth[module] != n_teacher:
            raise ConfigError(f"{where}.layer_map: from_init, but model.init's {module} source has "
                              f"{report.source_depth[module]} layers and the teacher {n_teacher}; give the layer_map")
        return dict(enumerate(chosen))
    return select_layers(spec, n_student, n_teacher, where, complete=False)


class _LayerTerm(LossTerm):
    """A term on per-layer tensors of one ``module``, student layer -> teacher layer by ``layer_map``."""

    def __init__(self, cfg, student, teacher, where):
        super().__init__(cfg, student, teacher, where)
        if "module" not in cfg:
            raise ConfigError(f"{where}: missing key 'module' ({', '.join(LAYERED)})")
        self.module = _choice(cfg, "module", LAYERED, "", where)
        self.kind = self.point_kind(cfg, where)
        self.layers_spec = cfg.get("layer_map")
        self.mapping = layer_map(self.layers_spec, student, teacher, self.module, where)
        self.needs = frozenset() if self.module == "vision" else frozenset({self.module})

    def point_kind(self, cfg, where) -> str:
        """What the capture records at each layer (``capture.KINDS``)."""
        return "hidden"

    def default_key(self, cfg):
        return f"{self.NAME}_{cfg.get('module')}"

    def student_points(self):
        return {(self.module, self.kind, s) for s in self.mapping}

    def teacher_points(self):
        return {(self.module, self.kind, t) for t in self.mapping.values()}

    def cache_fields(self):
        return {f"{s}.{k}.{j}" for s, k, j in self.teacher_points()}

    def pairs(self, s, t):
        for i, j in self.mapping.items():
            (xs, mask), (xt, _) = s.layer(self.module, self.kind, i), t.layer(self.module, self.kind, j)
            aligned = xs.shape[:-1] == xt.shape[:-1] if self.kind == "hidden" else \
                xs.shape[0] == xt.shape[0] and xs.shape[2:] == xt.shape[2:]
            if not aligned:
                raise ConfigError(f"{self.where}: student {self.module} layer {i} {tuple(xs.shape)} and teacher "
                                  f"layer {j} {tuple(xt.shape)} do not align (same image size and patch size?)")
            yield i, xs, xt, mask


@register_term("hidden")
class HiddenDistill(_LayerTerm):
    """Per-layer hidden states, MSE, MSE of LayerNorm-ed features (``mse_ln``: scale-free)
    or cosine, through a learned projection when the widths differ (TinyBERT); padding
    tokens are ignored."""

    KEYS = ("module", "layer_map", "loss", "project")

    def __init__(self, cfg, student, teacher, where):
        super().__init__(cfg, student, teacher, where)
        self.loss = _choice(cfg, "loss", FEATURE_LOSSES, "mse", where)
        sw, tw = module_width(student, self.module), module_width(teacher, self.module)
        self.proj = nn.ModuleDict({str(i): _projection(sw, tw, bool(cfg.get("project"))) for i in self.mapping})

    def forward(self, s, t):
        return torch.stack([feature_loss(self.proj[str(i)](xs), xt, self.loss, mask)
                            for i, xs, xt, mask in self.pairs(s, t)]).mean()


@register_term("attention")
class AttentionDistill(_LayerTerm):
    """KL on attention maps (MiniLM/TinyBERT): ``maps: self`` or ``cross`` (cross-attention,
    in fusion and decoder); ``head_map: mean`` compares head-averaged maps, ``matched`` head
    by head (same head count). Padded query rows are ignored; padded keys carry ~0 mass in both."""

    KEYS = ("module", "maps", "layer_map", "head_map")
    MAPS = {"self": "attn", "cross": "cross"}  # yaml word -> what the capture records

    def __init__(self, cfg, student, teacher, where):
        super().__init__(cfg, student, teacher, where)
        self.head_map = _choice(cfg, "head_map", ("mean", "matched"), "mean", where)

    def point_kind(self, cfg, where) -> str:
        maps = tuple(m for m, kind in self.MAPS.items() if kind in KINDS[self.module])
        return self.MAPS[_choice(cfg, "maps", maps, maps[0], where)]

    def default_key(self, cfg):
        return super().default_key(cfg) + ("_cross" if cfg.get("maps") == "cross" else "")

    def forward(self, s, t):
        losses = []
        for _i, xs, xt, mask in self.pairs(s, t):  # [B, H, Lq, Lk]
            if self.head_map == "mean":
                xs, xt = xs.mean(1, keepdim=True), xt.mean(1, keepdim=True)
            elif xs.shape[1] != xt.shape[1]:
                raise ConfigError(f"{self.where}.head_map: matched needs equal head counts (student {xs.shape[1]}, "
                                  f"teacher {xt.shape[1]}); use head_map: mean")
            rows = None if mask is None else mask[:, None, :]  # query rows of real tokens
            losses.append(prob_kl(xs, xt, rows))
        return torch.stack(losses).mean()


def validate_terms(specs: Any) -> None:
    """Names and keys of ``distill.terms``, checked before any model is built."""
    if not specs:
        raise ConfigError("distill.terms: list at least one loss term, e.g. - {name: itc_kd, weight: 1.0}")
    for n, spec in enumerate(specs):
        where = f"distill.terms[{n}]"
        if not isinstance(spec, Mapping) or "name" not in spec:
            raise ConfigError(f"{where}: expected a mapping with a 'name' ({', '.join(TERMS)})")
        if spec["name"] not in TERMS:
            raise ConfigError(f"{where}.name: '{spec['name']}' is not a loss term; known: {', '.join(TERMS)}")
        upgrade_term(spec, where)
        check_keys(spec, COMMON + TERMS[spec["name"]].KEYS, where)
    weights = [_number(spec.get("weight", 1.0), f"distill.terms[{n}].weight") for n, spec in enumerate(specs)]
    if not any(weights):
        raise ConfigError("distill.terms: every term has weight 0, so the loss is 0 and nothing trains; "
                          "give at least one term a weight > 0")


def teacher_free_terms(specs: Any) -> list[dict]:
    """The terms of ``distill.terms`` that need no teacher (the student's own losses: itc,
    itm, lm, task), as plain mappings with their weights."""
    from omegaconf import OmegaConf

    own = [dict(OmegaConf.to_container(t) if OmegaConf.is_config(t) else t) for t in specs or []
           if t.get("name") in TERMS and TERMS[t["name"]].teacher_free]
    if not own:
        raise ConfigError("distill.terms hold none of the student's own losses (itc, itm, lm, task), which "
                          "a student trained without a teacher trains on")
    return own


def build_terms(specs: Any, student: nn.Module, teacher: nn.Module) -> list[LossTerm]:
    """Instantiate ``distill.terms`` for this student and teacher."""
    validate_terms(specs)
    terms, keys = [], set()
    for n, spec in enumerate(specs):
        where = f"distill.terms[{n}]"
        term = TERMS[spec["name"]](spec, student, teacher, where)
        if term.key in keys:
            raise ConfigError(f"{where}: a second term logs as loss_{term.key}; give one a distinct 'key'")
        keys.add(term.key)
        terms.append(term)
    return terms
