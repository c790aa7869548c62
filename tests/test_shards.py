"""`python -m lavis_dlip.shards`: a run's training split as webdataset shards, read back by
webdataset itself; a killed or repeated run rewrites only what is missing."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import CONFIGS, SMOKE_RETRIEVAL


def test_shards_hold_every_record_and_resume(tmp_path, demo_smoke_data):
    import webdataset as wds

    from lavis_dlip.shards import MANIFEST, main, read_records

    cfg, out = str(CONFIGS / "retrieval.yaml"), tmp_path / "shards"
    argv = ["--cfg-path", cfg, "--out", str(out), "--samples-per-shard", "50", "--options", SMOKE_RETRIEVAL]
    assert main(argv) == 0
    records = read_records(cfg, [SMOKE_RETRIEVAL])
    manifest = json.loads((out / MANIFEST).read_text())
    n_shards = -(-len(records) // 50)
    assert manifest["samples"] == len(records) and len(manifest["shards"]) == n_shards
    assert [s["samples"] for s in manifest["shards"]] == [50] * (n_shards - 1) + [len(records) - 50 * (n_shards - 1)]

    urls = [str(out / s["name"]) for s in manifest["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == len(records)
    for sample, (record, image) in zip(samples, records):  # in order, each image's bytes as on disk
        assert json.loads(sample["json"]) == record
        assert sample["jpg"] == Path(image).read_bytes()
    assert len({s["__key__"] for s in samples}) == len(records)

    # a shard lost (killed mid-write: its sidecar never written) is the only one written again
    stamps = {s["name"]: (out / s["name"]).stat().st_mtime_ns for s in manifest["shards"]}
    lost = manifest["shards"][1]["name"]
    (out / f"{lost}.json").unlink()
    (out / lost).write_bytes(b"truncated")
    assert main(argv) == 0
    again = json.loads((out / MANIFEST).read_text())
    assert again["shards"] == manifest["shards"]  # the same bytes (sha256) as the first time
    assert {n: (out / n).stat().st_mtime_ns == t for n, t in stamps.items()} == \
        {n: n != lost for n in stamps}


def test_shards_refuse_bad_arguments(tmp_path, capsys):
    from lavis_dlip.shards import main

    cfg = str(CONFIGS / "retrieval.yaml")
    assert main(["--cfg-path", cfg, "--out", str(tmp_path), "--samples-per-shard", "0"]) == 2
    assert "--samples-per-shard must be at least 1" in capsys.readouterr().err
    assert main(["--cfg-path", cfg, "--out", str(tmp_path), "--split", "nope", "--options", SMOKE_RETRIEVAL]) == 2
    assert "has no 'nope' split" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.tar"))
