"""Training from webdataset shards (datasets/stream.py, the dlip_wds_pairs builder): an epoch of
run.train_num_samples, processes reading disjoint shards, reproducible, corrupt data skipped and counted."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter

import pytest
import torch

from conftest import CONFIGS, SMOKE_RETRIEVAL, check, output_dirs, read_metrics, run_main


@pytest.fixture(scope="module")
def shards(tmp_path_factory, demo_smoke_data):
    """The smoke data's 128 retrieval training pairs in 7 shards (6 of 20, one of 8)."""
    from lavis_dlip.shards import write_shards

    out = tmp_path_factory.mktemp("shards")
    write_shards(str(CONFIGS / "retrieval.yaml"), str(out), samples_per_shard=20, options=[SMOKE_RETRIEVAL])
    return out


def _stream(shard_dir, *sources, augment: bool = False):
    """The stream of ``shard_dir`` (and further ``(dir, weight)`` sources); ``augment``: LAVIS's
    random train transform, so that a sample's crop depends on the seed it is made under."""
    from omegaconf import OmegaConf

    from lavis.common.registry import registry

    builder = registry.get_builder_class("dlip_wds_pairs")
    cfg = OmegaConf.merge(OmegaConf.load(builder.default_config_path()).datasets.dlip_wds_pairs,
                          OmegaConf.load(CONFIGS / "stream_retrieval.yaml").datasets.dlip_wds_pairs)
    cfg.build_info.sources = [{"shards": str(shard_dir), "weight": 1.0}] + [
        {"shards": str(d), "weight": w} for d, w in sources]
    if augment:
        cfg.vis_processor.train = {"name": "blip_image_train", "image_size": 64, "min_scale": 0.5}
    return builder(cfg).build_datasets()["train"]


def _pattern(shard_dir) -> str:
    """The shards as a brace pattern, as LAVIS's LAION builders name them (build_info.storage)."""
    count = len(json.loads((shard_dir / "manifest.json").read_text())["shards"])
    return f"{shard_dir}/train-{{000000..{count - 1:06d}}}.tar"


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


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_resumed_mid_epoch_goes_on_with_the_same_batches(shards, workers):
    """Resumed from the positions its batches carried (two sources mixed 3:1, shuffle buffers,
    random crops), a stream yields the very batches, images included, that it would have
    yielded next."""
    from torch.utils.data import DataLoader

    from lavis_dlip.tasks.loop import EpochPosition

    stream = _stream(shards, (shards, 3.0), augment=True)
    stream.shuffle = 30
    stream.configure(42, 96, 1, 2)
    stream.set_epoch(1)

    def batches():
        return list(DataLoader(stream, batch_size=4, num_workers=workers, drop_last=True,
                               collate_fn=stream.collater))

    whole = batches()
    assert len(whole) == 24 and whole[0]["stream_pos"].shape == (4, 4)  # role, yielded, taken per source
    assert {int(r) for r in whole[1]["stream_pos"][:, 0]} == {1 if workers else 0}
    assert torch.equal(batches()[0]["image"], whole[0]["image"])  # a function of (seed, epoch)
    for done in (5, 10):
        at = EpochPosition(batches=done, workers=max(workers, 1))
        for batch in whole[:done]:
            role, *where = batch["stream_pos"][-1].tolist()
            at.streams[role] = where
        stream.set_epoch(1)
        stream.resume_at(at.stream_resume())
        rest = batches()
        assert len(rest) == len(whole) - done
        for got, want in zip(rest, whole[done:]):
            assert got["text_input"] == want["text_input"] and torch.equal(got["image"], want["image"])
    stream.set_epoch(1)  # a new epoch forgets the resume point
    assert torch.equal(batches()[0]["image"], whole[0]["image"])
    stream.set_epoch(2)
    assert not torch.equal(batches()[0]["image"], whole[0]["image"])


def test_sources_mix_by_weight_and_the_buffer_shuffles_across_shards(shards):
    stream = _stream(shards, (shards, 3.0))
    stream.configure(42, 400, 0, 1)
    items = list(stream)
    taken = items[-1]["stream_pos"][2:].tolist()  # samples taken from each source
    assert sum(taken) == 400 and 0.70 < taken[1] / 400 < 0.80  # weights 1 : 3
    in_order = [i for i, _ in _items(stream, 42, 40, 0, 1)]
    stream.shuffle = 40
    shuffled = [i for i, _ in _items(stream, 42, 40, 0, 1)]
    assert shuffled != in_order and len(set(shuffled)) > 20


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

    # distillation pre-training, the teacher online, from the same shards through LAVIS's own
    # LAION builder (laion2B_multi: build_info.storage, a brace pattern), which runner_dlip streams
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONFIGS / "stream_distill_pretrain.yaml")
    wds = cfg.datasets.pop("dlip_wds_pairs")
    cfg.datasets = {"laion2B_multi": {"vis_processor": wds.vis_processor, "text_processor": wds.text_processor,
                                      "build_info": {"storage": _pattern(shards)}}, **cfg.datasets}
    laion = tmp_path / "laion_distill_pretrain.yaml"
    laion.write_text(OmegaConf.to_yaml(cfg))
    proc = run_main("lavis_dlip.train", laion, "run.max_epoch=1", f"run.output_dir={tmp_path / 'c'}", cwd=tmp_path)
    check(proc)
    (student,) = output_dirs(tmp_path / "c")
    (epoch,) = [json.loads(line) for line in (student / "log.txt").read_text().splitlines() if '"train_lr"' in line]
    assert {"train_loss_lm", "train_loss_lm_kd", "train_loss_itc_kd"} <= epoch.keys()
    assert float(epoch["train_skipped_samples"]) == 0
    assert read_metrics(student)["test"]["r_mean"] >= 0  # zero-shot retrieval

    # and from the teacher's outputs stored as shards beside LAVIS's LAION shards
    from lavis_dlip.cache_teacher import build_cache

    cached = [f"distill.cache={tmp_path / 'laion_cache'}", "run.max_epoch=1", f"run.output_dir={tmp_path / 'd'}"]
    assert build_cache(str(laion), cached)["entries"] == 128
    check(run_main("lavis_dlip.train", laion, *cached, cwd=tmp_path))
    (student,) = output_dirs(tmp_path / "d")
    assert "train_loss_lm_kd" in (student / "log.txt").read_text()


def test_lavis_laion_builder_streams_the_same_pairs(shards):
    """LAVIS's laion2B_multi train split, read by runner_dlip as a stream over its shards."""
    from omegaconf import OmegaConf

    from lavis.common.registry import registry
    from lavis_dlip.datasets.stream import lavis_laion_stream

    builder = registry.get_builder_class("laion2B_multi")
    cfg = OmegaConf.create({"data_type": "images", "build_info": {"storage": _pattern(shards)},
                            "vis_processor": {"train": {"name": "blip_image_eval", "image_size": 64}},
                            "text_processor": {"train": {"name": "blip_caption"}}})
    stream = lavis_laion_stream(builder(cfg).build_datasets()["train"])
    assert stream is not None and len(stream.sources[0].shards) == 7
    stream.shuffle = 1
    stream.configure(42, 128, 0, 1)
    texts = Counter(item["text_input"] for item in stream)
    assert texts == Counter(t for _, t in _items(_stream(shards), 42, 128, 0, 1))
    assert lavis_laion_stream(_stream(shards)) is None  # not LAVIS's pipeline
