"""A run's data as webdataset shards: ``python -m lavis_dlip.shards --cfg-path RUN.yaml --out DIR``.

Every dataset of the run yaml (the plugin's local builders, LAVIS's COCO, VG, SBU, CC3M
builders: whatever LAVIS builds with an ``annotation`` list and a ``vis_root``) is read
for one split, and each record becomes one sample: its image file as it is on disk
(member ``jpg``, ``png``, ... by the file's extension) and the record itself (``json``),
keyed by its position. ``--samples-per-shard`` records go to ``<split>-NNNNNN.tar``; shards
are written in parallel, each complete or absent (written beside, then renamed), with a
``.json`` beside it that records what it holds. Run again, a shard whose record says it
holds the same records is kept: a killed run resumes where it stopped. ``manifest.json``
lists every shard with its samples and bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import multiprocessing
import os
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from lavis.common.registry import registry
from tqdm.auto import tqdm

from lavis_dlip.cli import main_guard
from lavis_dlip.config import load_config
from lavis_dlip.errors import ConfigError

logger = logging.getLogger(__name__)

VERSION = 1
MANIFEST = "manifest.json"


def read_records(cfg_path: str, options: Sequence[str] = (), split: str = "train") -> list[tuple[dict, str]]:
    """``(record, image path)`` of every dataset's ``split`` in the run yaml, in order."""
    cfg = load_config(cfg_path, options)
    out = []
    for name, ds_cfg in cfg.datasets_cfg.items():
        datasets = registry.get_builder_class(name)(ds_cfg).build_datasets()
        if split not in datasets:
            raise ConfigError(f"{cfg_path}: datasets.{name} has no '{split}' split (it has {', '.join(datasets)})")
        dataset = datasets[split]
        for n, record in enumerate(dataset.annotation):
            image = record.get("image")
            if not image:
                raise ConfigError(f"{cfg_path}: datasets.{name} {split} record {n} has no 'image'")
            out.append((dict(record), os.path.join(dataset.vis_root, image)))
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # the same records give the same bytes
    tar.addfile(info, io.BytesIO(data))


def _records_sha(records: list[tuple[dict, str]], first: int) -> str:
    text = json.dumps([first, [(r, os.path.basename(p)) for r, p in records]], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def write_shard(job: tuple[Path, str, int, int, list[tuple[dict, str]]]) -> dict[str, Any]:
    """One shard: ``(out dir, split, shard index, index of its first sample, records)``."""
    out, split, index, first, records = job
    name = f"{split}-{index:06d}.tar"
    path, side = out / name, out / f"{name}.json"
    want = _records_sha(records, first)
    if side.is_file() and path.is_file():
        done = json.loads(side.read_text())
        if done.get("records_sha256") == want and path.stat().st_size == done.get("bytes"):
            return {**done, "kept": True}
    tmp = out / f".{name}.part"
    with open(tmp, "wb") as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for n, (record, image) in enumerate(records):
                key = f"{first + n:09d}"
                ext = os.path.splitext(image)[1].lower().lstrip(".") or "jpg"
                try:
                    data = Path(image).read_bytes()
                except OSError as err:
                    raise ConfigError(f"sample {first + n} ({record.get('image')}): cannot read {image} "
                                      f"({err.strerror})") from None
                _add(tar, f"{key}.{ext}", data)
                _add(tar, f"{key}.json", json.dumps(record, sort_keys=True, default=str).encode())
    sha = hashlib.sha256(tmp.read_bytes()).hexdigest()
    os.replace(tmp, path)
    done = {"name": name, "samples": len(records), "first": first, "bytes": path.stat().st_size,
            "sha256": sha, "records_sha256": want}
    side.write_text(json.dumps(done, indent=1))
    return {**done, "kept": False}


def write_shards(cfg_path: str, out: str, samples_per_shard: int = 1000, split: str = "train", workers: int = 2,
                 options: Sequence[str] = ()) -> dict[str, Any]:
    """Write (or complete) the shards of ``cfg_path``'s ``split`` in ``out``; the manifest."""
    if samples_per_shard < 1:
        raise ConfigError(f"--samples-per-shard must be at least 1, got {samples_per_shard}")
    records = read_records(cfg_path, options, split)
    if not records:
        raise ConfigError(f"{cfg_path}: the {split} split has no records")
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    jobs = [(target, split, i, start, records[start:start + samples_per_shard])
            for i, start in enumerate(range(0, len(records), samples_per_shard))]
    start, shards = time.time(), []
    with multiprocessing.get_context("fork").Pool(max(1, min(workers, len(jobs)))) as pool:
        for shard in tqdm(pool.imap(write_shard, jobs), total=len(jobs), desc=f"shards of {split} in {out}",
                          disable=None):
            shards.append(shard)
    seconds = time.time() - start
    written = [s for s in shards if not s["kept"]]
    manifest = {"version": VERSION, "cfg_path": os.path.abspath(cfg_path), "options": list(options),
                "split": split, "samples_per_shard": samples_per_shard, "samples": len(records),
                "bytes": sum(s["bytes"] for s in shards),
                "shards": [{k: s[k] for k in ("name", "samples", "first", "bytes", "sha256")} for s in shards]}
    (target / MANIFEST).write_text(json.dumps(manifest, indent=1))
    logger.info("%d shards (%d written, %d kept), %d samples, %.1f MiB, %.1f s", len(shards), len(written),
                len(shards) - len(written), len(records), manifest["bytes"] / 2**20, seconds)
    return {**manifest, "written": len(written), "seconds": seconds}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg-path", required=True, help="a run yaml whose datasets are written")
    parser.add_argument("--out", required=True, help="the directory of the shards")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--split", default="train")
    parser.add_argument("--workers", type=int, default=2, help="shards written at once")
    parser.add_argument("--options", nargs="+", default=[], help="key=value overrides of the run yaml")
    args = parser.parse_args(argv)

    def run() -> None:
        info = write_shards(args.cfg_path, args.out, args.samples_per_shard, args.split, args.workers, args.options)
        print(f"{len(info['shards'])} shards ({info['written']} written), {info['samples']} samples, "
              f"{info['bytes'] / 2**20:.1f} MiB ({info['bytes'] / info['samples'] / 1024:.1f} KiB a sample), "
              f"{info['seconds']:.1f} s: {Path(args.out) / MANIFEST}")

    return main_guard(run)


if __name__ == "__main__":
    sys.exit(main())
