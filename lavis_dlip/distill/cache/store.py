"""The files: one ``chunk-NNNNNN.pt`` per ``chunk`` samples (all their augmentations), each
packed into one buffer per dtype plus a JSON index (tens of thousands of small tensors would
take seconds to unpickle), written atomically, recorded in the manifest by size and sha256."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from lavis_dlip import checkpoint
from lavis_dlip.distill.cache.config import MANIFEST, write_json


def chunk_name(c: int) -> str:
    return f"chunk-{c:06d}.pt"


def save_chunk(entries: list[dict[str, Any]], path: str) -> None:
    """Write one chunk's entries: every tensor becomes a slice of one flat buffer per
    dtype, referenced from a JSON index as ``{"t": [dtype, offset, shape]}``."""

    parts: dict[str, list[torch.Tensor]] = {}
    sizes: dict[str, int] = {}

    def pack(value: Any) -> Any:
        if torch.is_tensor(value):
            dtype = str(value.dtype).removeprefix("torch.")
            offset = sizes.get(dtype, 0)
            parts.setdefault(dtype, []).append(value.detach().reshape(-1).cpu())
            sizes[dtype] = offset + value.numel()
            return {"t": [dtype, offset, list(value.shape)]}
        if isinstance(value, dict):
            return {k: pack(v) for k, v in value.items()}
        if isinstance(value, list):
            return [pack(v) for v in value]
        return value

    index = json.dumps(pack(entries))
    checkpoint.atomic_save({"buffers": {k: torch.cat(v) for k, v in parts.items()}, "index": index}, path)


def load_chunk(path: str) -> list[dict[str, Any]]:
    """``save_chunk``'s entries back, as views of the (memory-mapped) buffers."""
    obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    buffers = obj["buffers"]

    def unpack(value: Any) -> Any:
        if isinstance(value, dict):
            if value.keys() == {"t"}:
                dtype, offset, shape = value["t"]
                return buffers[dtype][offset:offset + math.prod(shape)].view(shape)
            return {k: unpack(v) for k, v in value.items()}
        if isinstance(value, list):
            return [unpack(v) for v in value]
        return value

    return unpack(json.loads(obj["index"]))


def chunk_record(path: Path) -> dict[str, Any]:
    """What the manifest keeps of a written chunk, to find it damaged later, and its entries."""
    return {"bytes": path.stat().st_size, "sha256": checkpoint.file_sha256(str(path)),
            "entries": len(load_chunk(str(path)))}


def chunk_problem(path: Path, record: Optional[Mapping[str, Any]], full: bool = True) -> Optional[str]:
    """Why a chunk cannot be used (missing, another size, another checksum, unreadable), or None.
    ``record``: the manifest's (a finished cache); without one the chunk must load.
    ``full``: compare checksums too (reading every byte), not only sizes."""
    if not path.is_file():
        return "missing"
    if record is not None:
        if path.stat().st_size != record["bytes"]:
            return f"{path.stat().st_size} bytes, the manifest says {record['bytes']}"
        if full and checkpoint.file_sha256(str(path)) != record["sha256"]:
            return "its checksum differs from the manifest's"
        return None
    try:
        load_chunk(str(path))
    except Exception as err:
        return f"unreadable ({type(err).__name__})"
    return None


def drop_broken_chunks(directory: Path, manifest: dict[str, Any], names: list[str]) -> None:
    """Before a build over an existing cache: every chunk it holds is checked (against the
    manifest's sizes and checksums when finished, by loading it when not); a broken one is
    deleted, and the cache marked unfinished, so this build writes it again."""
    records = manifest.get("chunks") if manifest.get("complete") else None
    broken = {}
    for name in names:
        path = directory / name
        if records is None and not path.is_file():
            continue  # not built yet
        problem = chunk_problem(path, None if records is None else records.get(path.name))
        if problem:
            broken[path.name] = problem
    if not broken:
        return
    print(f"teacher cache {directory}: rebuilding {len(broken)} broken chunk(s): "
          + "; ".join(f"{k} ({v})" for k, v in sorted(broken.items())[:5]), flush=True)
    for name in broken:
        (directory / name).unlink(missing_ok=True)
    manifest["complete"] = False
    write_json(directory / MANIFEST, manifest)
