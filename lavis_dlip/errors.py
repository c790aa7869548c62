"""The one error type for bad configuration, and the key check every section uses.

A leaf module: configs, models, distillation and tasks all import it, and it
imports none of them.
"""

from __future__ import annotations

import difflib
from typing import Iterable, Mapping


class ConfigError(ValueError):
    """A run config or model config is invalid; the message names the key."""


def check_keys(given: Mapping, allowed: Iterable[str], where: str) -> None:
    """Reject keys not in ``allowed``, suggesting the closest valid one."""
    allowed = list(allowed)
    for key in given:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean '{where}.{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown key '{where}.{key}'{hint}; allowed: {', '.join(sorted(allowed))}"
            )
