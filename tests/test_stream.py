"""Training from webdataset shards (datasets/stream.py, the dlip_wds_pairs builder): an epoch of
run.train_num_samples, processes reading disjoint shards, reproducible, corrupt data skipped and counted."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter

import pytest

from conftest import CONFIGS, SMOKE_RETRIEVAL, check, output_dirs, read_metrics, run_main


@pytest.fixture(scope="module")
def shards(tmp_path_factory, demo_smoke_data):
    """The smoke data's 128 retrieval training pairs in 7 shards (6 of 20, one of 8)."""
    from lavis_dlip.shards import write_shards

    out = tmp_path_factory.mktemp("shards")
    write_shards(str(CONFIGS / "retrieval.yaml"), str(out), samples_per_shard=20, options=[SMOKE_RETRIEVAL])
    return out


def _stream(shard_dir):
    from omegaconf import OmegaConf

    from lavis.common.registry import registry

    builder = registry.get_builder_class("dlip_wds_pairs")
    cfg = OmegaConf.merge(OmegaConf.load(builder.default_config_path()).datasets.dlip_wds_pairs,
                          OmegaConf.load(CONFIGS / "stream_retrieval.yaml").datasets.dlip_wds_pairs)
    cfg.build_info.sources[0].shards = str(shard_dir)
    return builder(cfg).build_datasets()["train"]


def _items(stream, seed: int, samples: int, rank: int, world: int, epoch: int = 0) -> list[tuple[int, str]]:
    stream.configure(seed, samples, rank, world)
    stream.set_epoch(epoch)
    return [(item["image_id"], item["text_input"]) for item in stream]


def test_processes_read_disjoint_shards_each_its_full_share(shards):
    stream = _stream(shards)
    ranks = [_items(stream, 42, 100, r, 2) for r in range(2)]  # 100 each: more than a rank's shards hold
    assert [len(r) for r in ranks] == [100, 100]  # uneven shards: each cycles its own, none waits
    firsts = [set(r[:60]) for r in ranks]
    assert not firsts[0] & firsts[1]  # disjoint shards, so disjoint samples
    assert _items(stream, 42, 100, 0, 2) == ranks[0]  # a function of (seed, epoch, rank)
    assert _items(stream, 42, 100, 0, 2, epoch=1) != ranks[0]
    assert _items(stream, 43, 100, 0, 2) != ranks[0]
    whole = _items(stream, 42, 128, 0, 1)  # one process, one epoch of all 128: every pair once
    assert len(whole) == 128 and set(whole) == set(ranks[0]) | set(ranks[1])


def test_dataloader_workers_split_a_process_share(shards):
    from torch.utils.data import DataLoader

    stream = _stream(shards)
    stream.configure(42, 128, 0, 1)
    batches = list(DataLoader(stream, batch_size=16, num_workers=2, drop_last=True))
    assert len(batches) == 8  # 64 samples a worker
    by_worker = [{(int(i), t) for b in batches[w::2] for i, t in zip(b["image_id"], b["text_input"])}
                 for w in range(2)]  # the loader takes batches from its workers in turn
    assert not by_worker[0] & by_worker[1]  # each reads shards of its own

    # this process holds 3 of the 7 shards, for 4 workers: they split its samples by position, so
    # together they read what one process alone reads (a multiset: the data repeats some pairs)
    stream.configure(42, 48, 1, 2)
    batches = list(DataLoader(stream, batch_size=4, num_workers=4, drop_last=True))
    together = Counter((int(i), t) for b in batches for i, t in zip(b["image_id"], b["text_input"]))
    assert len(batches) == 12 and together == Counter(_items(stream, 42, 48, 1, 2))


def test_a_corrupt_shard_is_skipped_and_counted(shards, tmp_path, caplog):
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    victim = broken / manifest["shards"][2]["name"]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # cut off mid-sample
    stream = _stream(broken)
    stream.configure(42, 128, 0, 1)
    with caplog.at_level(logging.WARNING, logger="lavis_dlip.datasets.stream"):
        items = list(stream)
    assert len(items) == 128 and sum(item["n_skipped"] for item in items) >= 1
    assert any(victim.name in r.getMessage() for r in caplog.records)


def test_fewer_shards_than_processes_is_refused(shards):
    from lavis_dlip.errors import ConfigError

    with pytest.raises(ConfigError, match="7 shards for 8 processes"):
        _stream(shards).configure(42, 16, 0, 8)


def test_runner_dlip_trains_from_shards(shards, tmp_path):
    sources = f"datasets.dlip_wds_pairs.build_info.sources=[{{shards: '{shards}'}}]"
    proc = run_main("lavis_dlip.train", CONFIGS / "stream_retrieval.yaml", sources, f"run.output_dir={tmp_path}",
                    cwd=tmp_path)
    check(proc)
    (job,) = output_dirs(tmp_path)
    assert read_metrics(job)["test"]["r_mean"] >= 0
    epochs = [json.loads(line) for line in (job / "log.txt").read_text().splitlines() if '"train_lr"' in line]
    assert len(epochs) == 2 and all(float(e["train_skipped_samples"]) == 0 for e in epochs)
    missing = run_main("lavis_dlip.train", CONFIGS / "stream_retrieval.yaml", sources, "run.train_num_samples=null",
                       f"run.output_dir={tmp_path / 'b'}", cwd=tmp_path)
    assert missing.returncode == 2 and "run.train_num_samples" in missing.stderr

    # distillation from the stream, the run above as the teacher (online); a map-style cache is refused
    teacher = f"{{cfg_path: '{CONFIGS / 'retrieval.yaml'}', checkpoint: '{job / 'checkpoint_1.pth'}'}}"
    distill = ["run.task=dlip_distill_retrieval", f"run.output_dir={tmp_path / 'c'}", "run.max_epoch=1",
               f"distill={{teacher: {teacher}, terms: [{{name: itc}}, {{name: itm}}, {{name: itc_kd}}, "
               "{name: hidden, module: vision}]}"]
    proc = run_main("lavis_dlip.train", CONFIGS / "stream_retrieval.yaml", sources, *distill, cwd=tmp_path)
    check(proc)
    (student,) = output_dirs(tmp_path / "c")
    assert "train_loss_itc_kd" in (student / "log.txt").read_text()
    cached = run_main("lavis_dlip.train", CONFIGS / "stream_retrieval.yaml", sources, *distill,
                      f"distill.cache={tmp_path / 'cache'}", cwd=tmp_path)
    assert cached.returncode == 2 and "a streamed train split" in cached.stderr
