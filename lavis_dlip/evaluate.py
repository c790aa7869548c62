"""Evaluate with LAVIS and the plugin.

``python -m lavis_dlip.evaluate --cfg-path CFG [--checkpoint PATH] [--options ...]``

Mirrors LAVIS's evaluate.py, except that it honours ``run.runner`` (LAVIS always
uses RunnerBase) and takes ``--checkpoint`` as a shortcut for
``model.finetuned=PATH model.load_finetuned=True``.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from lavis_dlip.cli import main_guard, parse_args, run


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args("Evaluate a LAVIS model (lavis-dlip).", argv, checkpoint=True)
    options = list(args.options or [])
    if args.checkpoint:
        options += [f"model.finetuned={args.checkpoint}", "model.load_finetuned=True"]
    return main_guard(lambda: run(args.cfg_path, options, evaluate=True))


if __name__ == "__main__":
    sys.exit(main())
