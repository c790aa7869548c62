"""Export a trained student (or LAVIS's own BLIP model) out of LAVIS:
    python -m lavis_dlip.export --cfg-path RUN_YAML --checkpoint CKPT --format onnx --out DIR
    python -m lavis_dlip.export --cfg-path RUN_YAML --checkpoint CKPT --format hf --out DIR

``onnx``: graphs for ONNX Runtime plus tokenizer and preprocessing settings, served
by ``lavis_dlip.serve`` (``export/onnx.py``); ``hf``: transformers' BLIP classes and
a ``BlipProcessor`` (``export/hf.py``). Both are checked against the PyTorch model on
the export's own example inputs before the command succeeds (``--no-check`` skips it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from lavis_dlip.errors import ConfigError
from lavis_dlip import serve
from lavis_dlip.blip.build import trained_model
from lavis_dlip.cli import main_guard
from lavis_dlip.export import hf, onnx
from lavis_dlip.export.check import compare

FORMATS = ("onnx", "hf")


def export(cfg_path: str, checkpoint: str, fmt: str, out: str, options: Sequence[str] = (),
           check: bool = True) -> dict[str, Any]:
    """Export and (``check``) compare with the PyTorch model; what was written and measured."""

    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    target = Path(out)
    check_target(target)
    start = time.time()
    model, _ = trained_model(cfg_path, checkpoint, options)
    task = hf.task_of(model)
    tmp = target.with_name(target.name + ".tmp")  # a failed export leaves no half-written directory
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if fmt == "hf":
            info = hf.export_hf(model, tmp)
        else:
            from omegaconf import OmegaConf

            run_cfg = OmegaConf.load(cfg_path).get("run") or {}
            files = onnx.export_onnx(model, task, tmp)
            model.tokenizer.save_pretrained(str(tmp / "tokenizer"))
            serve_cfg = onnx.serving_config(model, task, hf.image_settings(model), run_cfg)
            (tmp / "serve.json").write_text(json.dumps(serve_cfg, indent=2))
            shutil.copy2(serve.__file__, tmp / "serve.py")  # the loader travels with the model: no LAVIS needed
            info = {"format": "onnx", "task": task, "files": files}
        info["export_s"] = round(time.time() - start, 1)
        if check:
            info["max_abs_diff"] = compare(model, tmp, fmt)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # an export that failed its check leaves nothing
        raise
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    (target / RECORD).write_text(json.dumps(info, indent=2))
    return info

RECORD = "dlip_export.json"  # written last into every export: what makes a directory one of ours to replace


def check_target(target: Path) -> None:
    """``--out`` before any work: a directory to create, or an earlier export to replace;
    never a file or a directory of something else (replacing it would delete it)."""
    if target.is_file() or (target.exists() and not target.is_dir()):
        raise ConfigError(f"--out {target} is a file; give a directory to write the export into")
    if target.is_dir() and any(target.iterdir()) and not (target / RECORD).is_file():
        raise ConfigError(f"--out {target} is a directory that holds something other than an export (no {RECORD}); "
                          f"give a new or empty directory, or an earlier export's to replace it")
    parent = target.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ConfigError(f"--out {target}: cannot write in {parent}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Export a BLIP/DLIP model to ONNX or Hugging Face transformers.")
    parser.add_argument("--cfg-path", required=True, help="the run yaml the model was trained with")
    parser.add_argument("--checkpoint", required=True, help="its weights (a runner checkpoint or a state dict)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="directory to write (an earlier export there is replaced)")
    parser.add_argument("--options", nargs="+", default=[], help="key=value overrides of the yaml")
    parser.add_argument("--no-check", action="store_true", help="skip the comparison with the PyTorch model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def run() -> None:
        info = export(args.cfg_path, args.checkpoint, args.format, args.out, args.options, not args.no_check)
        print(json.dumps(info, indent=2))

    return main_guard(run)

if __name__ == "__main__":
    sys.exit(main())
