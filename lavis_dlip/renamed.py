"""Yaml keys that were renamed, and the one place that reads the old names.

Each word means one thing: ``module`` is one of BLIP's modules (``blip/layout.py``),
``layer_map`` chooses which source layer feeds each student layer, ``maps`` names the
attention maps a term compares, ``head_map`` how heads are paired, and ``task_heads`` is
the module of projections and the ITM head (a bare ``heads`` is a count). A run yaml
written with the old names still loads; each old key is rewritten once, with one
deprecation line naming where it is and what to write instead.
"""

from __future__ import annotations

import logging
from typing import Any, MutableMapping

from lavis_dlip.errors import ConfigError

logger = logging.getLogger(__name__)

# old key -> new key, in each ``distill.terms`` entry
TERM_KEYS = {"stream": "module", "layers": "layer_map", "kind": "maps", "heads": "head_map"}
# old value -> new value, per new key
TERM_VALUES = {"maps": {"attn": "self"}}
# in each ``model.init.<module>`` entry
INIT_KEYS = {"layers": "layer_map"}
# ``model.init.<old>`` -> ``model.init.<new>``
INIT_MODULES = {"heads": "task_heads"}


_warned: set[str] = set()  # one line per old key and place, however often a config is read


def _rename(entry: MutableMapping, old: str, new: str, where: str) -> None:
    if new in entry:
        raise ConfigError(f"{where}: both '{old}' (its old name) and '{new}' are given; keep '{new}'")
    if f"{where}.{old}" not in _warned:
        _warned.add(f"{where}.{old}")
        logger.warning("%s.%s is deprecated: write %s.%s (same meaning)", where, old, where, new)
    entry[new] = entry.pop(old)


def upgrade(raw: Any) -> Any:
    """Rewrite the old key names of a run yaml (an OmegaConf or plain mapping) in place."""
    model = raw.get("model") if hasattr(raw, "get") else None
    init = model.get("init") if model is not None and hasattr(model, "get") else None
    if init is not None and hasattr(init, "keys"):
        upgrade_init(init)
    distill = raw.get("distill") if hasattr(raw, "get") else None
    terms = distill.get("terms") if distill is not None and hasattr(distill, "get") else None
    for n, term in enumerate(terms or []):
        if hasattr(term, "keys"):
            upgrade_term(term, f"distill.terms[{n}]")
    return raw


def upgrade_init(init: MutableMapping) -> MutableMapping:
    """A ``model.init`` section with the current key names."""
    for old, new in INIT_MODULES.items():
        if old in init:
            _rename(init, old, new, "model.init")
    for name in list(init.keys()):
        entry = init[name]
        if hasattr(entry, "keys") and any(old in entry for old in INIT_KEYS):
            entry = dict(entry)  # a copy: the caller's config stays as it was read
            for old, new in INIT_KEYS.items():
                if old in entry:
                    _rename(entry, old, new, f"model.init.{name}")
            init[name] = entry
    return init


def upgrade_term(term: MutableMapping, where: str) -> MutableMapping:
    """One ``distill.terms`` entry with the current key names and values."""
    for old, new in TERM_KEYS.items():
        if old in term:
            _rename(term, old, new, where)
    for key, values in TERM_VALUES.items():
        if key in term and str(term[key]) in values:
            term[key] = values[str(term[key])]
    return term
