"""Seeds that are functions of a sample's name, and blocks that run under them: an
augmentation that depends on which sample it is (and which epoch), not on how many
samples a process or DataLoader worker drew before it, can be replayed (the teacher
cache) and resumed mid-epoch (a stream skips what it had read without decoding it)."""

from __future__ import annotations

import contextlib
import hashlib
import random
from typing import Any, Iterator

import numpy as np
import torch


def seed_of(*parts: Any) -> int:
    """A 32-bit seed from ``parts`` (their ``str``), the same on every machine and Python."""
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:8], 16)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Every RNG a LAVIS processor draws from (torchvision: torch's CPU generator;
    RandAugment: numpy; python's random) seeded for the block, and restored after it.
    Only the CPU generator: ``torch.manual_seed`` also queues the CUDA generators'
    seeding with a stack trace, a cost on every sample."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
