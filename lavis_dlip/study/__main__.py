"""``python -m lavis_dlip.study --cfg-path STUDY.yaml [--parallel N] [--dry-run] [--emit FILE]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from lavis_dlip.cli import main_guard
from lavis_dlip.errors import ConfigError
from lavis_dlip.study.run import run_study
from lavis_dlip.study.spec import load_study


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Run a DLIP study: arms x seeds on one teacher and one cache.")
    parser.add_argument("--cfg-path", required=True, help="the study yaml")
    parser.add_argument("--parallel", type=int, help="runs at once, sharing the CPU threads (default: study.parallel)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and a time estimate; run nothing")
    parser.add_argument("--emit", help="write one command per step (torchrun per run) to this file; run nothing")
    parser.add_argument("--only", choices=("teacher", "cache", "report"), help="run one step of the study")
    parser.add_argument("--options", nargs="+", default=[], help="study.key=value overrides of the study yaml")
    args = parser.parse_args(argv)

    def go() -> None:
        spec = load_study(args.cfg_path, args.options)
        if args.parallel is not None:
            if args.parallel < 1:
                raise ConfigError(f"--parallel must be >= 1, got {args.parallel}")
            spec.parallel = args.parallel
        run_study(spec, dry_run=args.dry_run, emit_path=Path(args.emit) if args.emit else None, only=args.only)

    return main_guard(go)

if __name__ == "__main__":
    sys.exit(main())
