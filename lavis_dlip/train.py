"""Train with LAVIS and the plugin: ``python -m lavis_dlip.train --cfg-path CFG [--options k=v ...]``.

Mirrors LAVIS's train.py (same yaml format); ``run.runner: runner_dlip`` selects the
plugin's runner. Under ``torchrun --nproc_per_node=N -m lavis_dlip.train`` it uses
NCCL with CUDA and gloo without.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from lavis_dlip.cli import main_guard, parse_args, run


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args("Train a LAVIS model (lavis-dlip).", argv)
    return main_guard(lambda: run(args.cfg_path, args.options))


if __name__ == "__main__":
    sys.exit(main())
