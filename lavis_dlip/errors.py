"""The one error type for bad configuration, and the key check every section uses.

A leaf module: configs, models, distillation and tasks all import it, and it
imports none of them.
"""

from __future__ import annotations

import difflib
from typing import Iterable, Mapping


class ConfigError(ValueError):
    """A run config or model config is invalid; the message names the key."""


class CheckpointError(ConfigError):
    """A checkpoint a config names is missing, unreadable or does not fit the model;
    the message names the file and the key that named it."""


class RunStopped(RuntimeError):
    """A run stopped for a reason the user can act on (it diverged, the disk is full,
    it was interrupted); the message says what happened, what was kept and what to do.
    The command prints it as one line and exits with ``exit_code``."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


LISTED = 16  # longer key lists are not printed in full: one line stays readable


def check_keys(given: Mapping, allowed: Iterable[str], where: str, reference: str = "") -> None:
    """Reject keys not in ``allowed``, suggesting the closest valid one; ``reference``
    says where a long list of allowed keys is documented."""
    allowed = list(allowed)
    for key in given:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean '{where}.{close[0]}'?)" if close else ""
            listing = (f"allowed: {', '.join(sorted(allowed))}" if len(allowed) <= LISTED or not reference
                       else f"the {len(allowed)} allowed keys are listed in {reference}")
            raise ConfigError(f"unknown key '{where}.{key}'{hint}; {listing}")
