"""The teacher-output cache: built once (resumably, by one or two processes),
read back with the teacher's exact values for every term but lm_kd (top-k),
refused when it was built for something else, and trained from."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import CONFIGS, SMOKE_RETRIEVAL, TESTS, check, output_dirs, read_metrics, run_main
from lavis_dlip.distill.cache import CACHED, load_chunk

RANDOM_TEACHER = "distill.teacher.load_weights=False"  # seeded random weights: no trained teacher needed
RETRIEVAL_TERMS = ("distill.terms=[{name: itc_kd}, {name: itm_kd, pairs: positives}, {name: itm_kd, key: itm_all}, "
                   "{name: itm_kd, pairs: mined, key: itm_mined}, "
                   "{name: embed, targets: [image_feat, text_feat, itm_cls]}, {name: hidden, module: vision}, "
                   "{name: hidden, module: text}, {name: hidden, module: fusion}, "
                   "{name: attention, module: text}, {name: attention, module: fusion, maps: cross}]")
# LAVIS's random train transform (crop, flip, RandAugment): stored augmentations 0 and 1 of a
# sample are different images, so a cache that replays the wrong one gives other values
RANDOM_CROPS = "{name: blip_image_train, image_size: 64, min_scale: 0.5}"
CASES = {  # on the smoke data (128 retrieval and caption samples, 192 VQA questions)
    "retrieval": ("distill_retrieval", [RETRIEVAL_TERMS, SMOKE_RETRIEVAL,
                                        f"datasets.dlip_local_retrieval.vis_processor.train={RANDOM_CROPS}"]),
    "caption": ("distill_caption", ["distill.terms.4={name: embed, targets: [decoder_cls]}",
                                    "datasets.dlip_local_caption.base_dir=${dlip_demo_data:smoke}",
                                    f"datasets.dlip_local_caption.vis_processor.train={RANDOM_CROPS}"]),
    "vqa": ("distill_vqa", ["distill.terms.4={name: attention, module: decoder, maps: cross}",
                            "datasets.dlip_local_vqa.base_dir=${dlip_demo_data:smoke}",
                            f"datasets.dlip_local_vqa.vis_processor.train={RANDOM_CROPS}"]),
}


def _options(cache_dir, *extra) -> list[str]:
    return [RANDOM_TEACHER, f"distill.cache={{dir: {cache_dir}, dtype: float32, augmentations: 2, chunk: 32}}",
            *extra]


def _training_side(cfg_path, options):
    """What train builds: the task (cache reader, teacher shape), the student with its terms."""
    import lavis.tasks as tasks

    from lavis_dlip.config import load_config
    from lavis_dlip.blip.tokenizer import tokenizer_source

    cfg = load_config(str(cfg_path), options)
    task = tasks.setup_task(cfg)
    task.build_datasets(cfg)
    with tokenizer_source(cfg.model_cfg.get("tokenizer")):
        student = task.build_model(cfg)
    return cfg, task, student


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_terms_equal_online_replay(case, tmp_path, demo_smoke_data, monkeypatch, caplog):
    """Built under random augmentation (K = 2, several chunks) and read back in two epochs
    through the data loader's collater: every term equals the online teacher's on the very
    images the student sees; lm_kd equals the top-k KL of the online teacher's logits."""
    from lavis_dlip.cache_teacher import build_cache
    from lavis_dlip.distill import load_teacher

    monkeypatch.chdir(tmp_path)
    name, extra = CASES[case]
    options = _options(tmp_path / "cache", *extra)
    stats = build_cache(str(CONFIGS / f"{name}.yaml"), options)

    with caplog.at_level("WARNING", logger="lavis_dlip.tasks.distill"):
        cfg, task, student = _training_side(CONFIGS / f"{name}.yaml", options)
    n = len(task.cache_dataset)
    assert stats["entries"] == 2 * n and stats["bytes"] > 0 and n > 2 * 32  # three chunks or more
    # training reads the cache: no teacher weights are loaded unless itm_kd scores the student's negatives,
    # and then it says so
    assert task.teacher.is_meta != task.cache.online_fusion
    assert task.cache.online_fusion == (case == "retrieval")
    assert ("the teacher's text encoder runs on them every step" in caplog.text) == task.cache.online_fusion
    teacher = load_teacher(cfg.config.distill.teacher, cfg.config.distill.base_dir)  # for the online values
    dataset = task.cache_dataset
    assert not torch.equal(dataset.item(3, 0)["image"], dataset.item(3, 1)["image"])  # two different crops
    student.eval()
    compared, augs = 0, set()
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        samples = dataset.collater([dataset[i] for i in (0, 5, 17, 40, n // 3, n // 2, n - 2, n - 1)])
        augs |= set(samples["cache_aug"].tolist())
        compared += _cached_equals_online(task, student, teacher, samples, epoch, alone=True)
    assert augs == {0, 1}  # both stored augmentations were read and checked
    assert compared >= 6


def _cached_equals_online(task, student, teacher, samples, epoch, alone=False) -> int:
    """Every term of ``student`` on ``samples``, from the cache and from the online ``teacher``:
    equal (lm_kd: to the top-k KL of the online logits); how many terms were compared."""
    from lavis_dlip.distill.capture import Capture
    from lavis_dlip.distill.divergence import topk_kl
    from lavis_dlip.distill.outputs import BlipOutputs, MinedPairs, positive_pairs

    distiller = student.dlip_distill
    # the data loader gathers the teacher's outputs with the batch, off the training step
    assert set(samples[CACHED]) == {"text_len", *task.cache.manifest["fields"]}
    samples.update(epoch=epoch, iters=0, num_iters_per_epoch=1)
    with torch.no_grad(), Capture(student, distiller.student_points) as records:
        output = student(samples)
    s = BlipOutputs(student, records, output)
    positives = positive_pairs(samples)
    online = teacher.replay(samples["image"], records, distiller.needs, distiller.teacher_points,
                            positives=positives)
    cached = task.cache.outputs(samples, records, teacher)

    def parts(value):  # lm top-k and mined pairs are tuples of tensors
        return value if isinstance(value, tuple) else (value,)

    if alone:  # a batch without them (not from the loader) reads the same values itself
        itself = task.cache.outputs({k: v for k, v in samples.items() if k != CACHED}, records, teacher)
        for field, value in cached.fields.items():
            assert all(torch.equal(a, b) for a, b in zip(parts(value), parts(itself.fields[field]))), field
    if "itm_mined" in cached.fields and hasattr(task.cache_dataset, "annotation"):
        _check_mined(online, cached, positives, task, samples)
    compared = 0
    for term in distiller.terms:
        if term.teacher_free:
            continue
        if getattr(term, "pairs", None) == "mined":  # the cache mined in its build batch: score those online
            pairs = cached.mined
            online.mined = MinedPairs(pairs.input_ids, pairs.attention_mask,
                                      online.itm_logits_on(pairs.input_ids, pairs.attention_mask))
        with torch.no_grad():
            want, got = float(term(s, online)), float(term(s, cached))
            if term.NAME == "lm_kd":  # the cache keeps the online teacher's top-k and log-partition
                rows, keep = s.lm_rows()
                logits = online.lm_rows(keep)[0].float()
                top = logits.topk(task.cache.manifest["key"]["fields"]["topk"], dim=-1)
                t = term.temperature
                want = float(topk_kl(rows, top.values, top.indices, torch.logsumexp(logits / t, -1), t))
                assert 0.0 < want <= float(term(s, online)) + 1e-6
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6), (epoch, term.key, got, want)
        compared += 1
    return compared


def test_teacher_outputs_as_shards_equal_the_online_teacher(tmp_path, demo_smoke_data, monkeypatch, capsys):
    """A stream's teacher outputs, built as one file per data shard (K = 2 random crops), read
    back beside the shards over two epochs through the stream's collater: every term equals
    the online teacher's on the very images the student sees; a run trains from them, and
    its rebuild only reports the finished cache."""
    from lavis_dlip.cache_teacher import build_cache
    from lavis_dlip.distill import load_teacher
    from lavis_dlip.shards import write_shards

    monkeypatch.chdir(tmp_path)
    shards = tmp_path / "shards"
    write_shards(str(CONFIGS / "retrieval.yaml"), str(shards), samples_per_shard=20, options=[SMOKE_RETRIEVAL])
    cfg = CONFIGS / "stream_distill_retrieval.yaml"
    options = [f"datasets.dlip_wds_pairs.build_info.sources=[{{shards: '{shards}'}}]",
               f"distill.cache={{dir: {tmp_path / 'cache'}, dtype: float32, augmentations: 2}}"]
    stats = build_cache(str(cfg), options)
    assert stats["entries"] == 2 * 128 and "KiB per sample and augmentation" in capsys.readouterr().out
    files = sorted(p.name for p in (tmp_path / "cache").glob("*.pt"))
    assert files == [f"0-train-{i:06d}.pt" for i in range(7)]  # one per data shard

    cfg_, task, student = _training_side(cfg, options)
    assert task.teacher.is_meta  # mined pairs: no teacher step at all
    teacher = load_teacher(cfg_.config.distill.teacher, cfg_.config.distill.base_dir)
    stream = task.cache_dataset
    stream.configure(42, 64, 0, 1)
    student.eval()
    compared, augs = 0, set()
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        items = iter(stream)
        for _ in range(2):
            samples = stream.collater([next(items) for _ in range(8)])
            augs |= set(samples["cache_aug"].tolist())
            compared += _cached_equals_online(task, student, teacher, samples, epoch)
    assert augs == {0, 1} and compared == 4 * 5

    proc = run_main("lavis_dlip.train", cfg, *options, f"run.output_dir={tmp_path / 'out'}", cwd=tmp_path)
    check(proc)
    (job,) = output_dirs(tmp_path / "out")
    log = (job / "log.txt").read_text()
    assert "train_loss_itm_kd" in log and "train_loss_attention_fusion_cross" in log
    assert read_metrics(job)["test"]["r_mean"] >= 0


def _check_mined(online, cached, positives, task, samples) -> None:
    """The teacher's mined caption: its most similar among the other images' (online,
    in this batch); the cache's: another sample's caption, as the student tokenizes it."""
    sim = online.image_feat @ online.text_feat.t()
    mined, fused = online.mined, online.call("fusion")
    for i in range(sim.shape[0]):
        j = int(sim[i].masked_fill(positives[i], float("-inf")).argmax())
        assert not positives[i, j] and torch.equal(mined.input_ids[i], fused.input_ids[j])
    torch.testing.assert_close(mined.logits, online.itm_logits_on(mined.input_ids, mined.attention_mask))
    tokenizer, dataset = task.teacher.model.tokenizer, task.cache_dataset
    for i, index in enumerate(samples["cache_index"].tolist()):
        ids = cached.mined.input_ids[i][cached.mined.attention_mask[i].bool()]
        caption = tokenizer.decode(ids[1:], skip_special_tokens=True)
        owner = [k for k, ann in enumerate(dataset.annotation) if dataset.text_processor(ann["caption"]) == caption]
        assert owner and all(dataset.annotation[k]["image"] != dataset.annotation[index]["image"] for k in owner)


def test_topk_kl_is_the_full_kl_when_k_covers_the_vocabulary():
    from lavis_dlip.distill.divergence import soft_kl, topk_kl

    torch.manual_seed(0)
    student, teacher = torch.randn(7, 50), torch.randn(7, 50) * 3
    full = soft_kl(student, teacher, 2.0)
    top = teacher.topk(50, dim=-1)
    assert float(topk_kl(student, top.values, top.indices, torch.logsumexp(teacher / 2.0, -1), 2.0)) == \
        pytest.approx(float(full), rel=1e-5)
    top8 = teacher.topk(8, dim=-1)
    partial = float(topk_kl(student, top8.values, top8.indices, torch.logsumexp(teacher / 2.0, -1), 2.0))
    assert 0.0 < partial <= float(full)


def test_chunks_round_trip(tmp_path):
    from lavis_dlip.distill.cache import save_chunk

    g = torch.Generator().manual_seed(0)
    entries = [{"text_len": n, "text.hidden.0": [torch.randn(n, 4, generator=g).half()],
                "lm_t1": [{"values": torch.randn(n, 3, generator=g).half(),
                           "indices": torch.arange(3 * n).int().view(n, 3), "lse": torch.randn(n, generator=g)}]}
               for n in (2, 5)]
    save_chunk(entries, str(tmp_path / "chunk.pt"))
    back = load_chunk(str(tmp_path / "chunk.pt"))
    assert [e["text_len"] for e in back] == [2, 5]
    for a, b in zip(entries, back):
        x, y = a["text.hidden.0"][0], b["text.hidden.0"][0]
        assert torch.equal(x, y) and y.dtype == torch.float16
        for k in ("values", "indices", "lse"):
            x, y = a["lm_t1"][0][k], b["lm_t1"][0][k]
            assert torch.equal(x, y) and x.dtype == y.dtype


def test_replayed_augmentations_are_the_stored_ones():
    """Sample i's augmentation k is LAVIS's random train processor seeded from (seed,
    i, k): drawn again, it is the same crop and flip; another k or seed draws another;
    epoch e shows augmentation (h(i) + e) mod K; the caller's RNG state is untouched."""
    import random

    import numpy as np
    from lavis.common.registry import registry
    from omegaconf import OmegaConf
    from PIL import Image

    from lavis_dlip.distill.cache import ReplayDataset

    process = registry.get_processor_class("blip_image_train").from_config(
        OmegaConf.create({"image_size": 32, "min_scale": 0.3}))
    pixels = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)

    class Images(torch.utils.data.Dataset):  # RandomResizedCrop, flips, RandAugment: torch, numpy and random
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {"image": process(Image.fromarray(np.roll(pixels, i, axis=0)))}

    data = ReplayDataset(Images(), augmentations=3, seed=7)
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    first = [[data.item(i, k)["image"] for k in range(3)] for i in range(3)]
    assert torch.equal(torch.get_rng_state(), before[0]) and np.array_equal(np.random.get_state()[1], before[1])
    assert random.getstate() == before[2]
    for i in range(3):
        assert all(torch.equal(data.item(i, k)["image"], first[i][k]) for k in range(3))
        assert not torch.equal(first[i][0], first[i][1]) and not torch.equal(first[i][1], first[i][2])
    assert not torch.equal(ReplayDataset(Images(), 3, seed=8).item(0, 0)["image"], first[0][0])
    shown = []
    for epoch in range(3):
        data.set_epoch(epoch)
        item = data[1]
        assert torch.equal(item["image"], first[1][item["cache_aug"]]) and item["cache_index"] == 1
        shown.append(item["cache_aug"])
    assert sorted(shown) == [0, 1, 2]  # each stored augmentation once in K epochs


def test_topk_kl_gradient_is_autograds():
    """topk_kl's hand-written backward (one softmax pass) against autograd's on the
    plain expression, and gradcheck in double precision."""
    from lavis_dlip.distill.divergence import _GatheredLogSoftmax, topk_kl

    torch.manual_seed(0)
    teacher = torch.randn(6, 40, dtype=torch.float64) * 3
    top = teacher.topk(5, dim=-1)
    z = torch.randn(6, 40, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: _GatheredLogSoftmax.apply(x, top.indices), (z,))
    for t in (1.0, 2.0):
        lse = torch.logsumexp(teacher / t, -1)
        (ours,) = torch.autograd.grad(topk_kl(z, top.values, top.indices, lse, t), z)
        x = z / t
        log_ps = x.gather(-1, top.indices) - torch.logsumexp(x, -1, keepdim=True)
        log_pt = top.values / t - lse[:, None]
        rest_t, rest_s = 1 - log_pt.exp().sum(-1), 1 - log_ps.exp().sum(-1)
        plain = ((log_pt.exp() * (log_pt - log_ps)).sum(-1) + rest_t * (rest_t.log() - rest_s.log())).mean() * t * t
        (want,) = torch.autograd.grad(plain, z)
        torch.testing.assert_close(ours, want)
    # at T = 1 the student's log-partition can come from its own loss (SmoothedCrossEntropy):
    # the same value and gradient as computing it here
    from lavis_dlip.models.components import SmoothedCrossEntropy

    y = torch.randint(0, 40, (6,))
    lse = torch.logsumexp(teacher, -1)
    results = []
    for shared in (False, True):
        ce, student_lse, _ = SmoothedCrossEntropy.apply(z, y, 0.1)
        kl = topk_kl(z, top.values, top.indices, lse, 1.0, student_lse=student_lse if shared else None)
        results.append((float(ce.sum() + kl), torch.autograd.grad(ce.sum() + kl, z)[0]))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-9)
    torch.testing.assert_close(results[1][1], results[0][1])


def test_smoothed_cross_entropy_is_pytorchs_and_its_gradient_autograds():
    import torch.nn.functional as F

    from lavis_dlip.models.components import SmoothedCrossEntropy

    torch.manual_seed(0)
    z = (torch.randn(5, 30, dtype=torch.float64) * 2).requires_grad_()
    y = torch.randint(0, 30, (5,))
    loss, lse, probs = SmoothedCrossEntropy.apply(z, y, 0.1)
    torch.testing.assert_close(loss, F.cross_entropy(z, y, reduction="none", label_smoothing=0.1))
    torch.testing.assert_close(lse, torch.logsumexp(z, -1))
    torch.testing.assert_close(probs, torch.softmax(z, -1))
    assert not probs.requires_grad  # a target for lm_kd, not a path for gradients
    w = torch.randn(5, dtype=torch.float64)  # both outputs used, with different weights
    assert torch.autograd.gradcheck(lambda x: SmoothedCrossEntropy.apply(x, y, 0.1)[:2], (z,))
    (g,) = torch.autograd.grad((loss * w).sum() + lse.sum(), z)
    (want,) = torch.autograd.grad((F.cross_entropy(z, y, reduction="none", label_smoothing=0.1) * w).sum()
                                  + torch.logsumexp(z, -1).sum(), z)
    torch.testing.assert_close(g, want)
    # far-apart logits (the target's probability underflows in float32): finite and still PyTorch's
    wide = torch.tensor([[80.0, 0.0, -90.0], [0.0, 0.0, 0.0]])
    loss, lse, _ = SmoothedCrossEntropy.apply(wide, torch.tensor([2, 1]), 0.1)
    torch.testing.assert_close(loss, F.cross_entropy(wide, torch.tensor([2, 1]), reduction="none", label_smoothing=0.1))
    torch.testing.assert_close(lse, torch.logsumexp(wide, -1))


def _build_options(cache_dir, chunk: int = 32) -> list[str]:
    """``cache_teacher``'s options for the smoke retrieval data (128 samples) in chunks of ``chunk``."""
    return [RANDOM_TEACHER, f"distill.cache={{dir: {cache_dir}, chunk: {chunk}}}", "run.progress=False",
            SMOKE_RETRIEVAL]


def _build_cmd(options: list[str]) -> list[str]:
    return [sys.executable, "-m", "lavis_dlip.cache_teacher", "--cfg-path", str(CONFIGS / "distill_retrieval.yaml"),
            "--options", *options]


def test_killed_build_resumes_refuses_stale_and_trains(tmp_path, demo_smoke_data, monkeypatch, capsys):
    from lavis_dlip.train import main as train

    def refused(*options: str) -> str:
        """The training CLI in this process (a refusal needs no fresh interpreter): exit 2, its one line."""
        capsys.readouterr()
        assert train(["--cfg-path", str(CONFIGS / "distill_retrieval.yaml"), "--options", *options]) == 2
        return capsys.readouterr().err

    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    build = _build_options(cache, chunk=8)  # 16 chunks
    proc = subprocess.Popen(_build_cmd(build), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list(cache.glob("chunk-*.pt"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in cache.glob("chunk-*.pt")}
    assert proc.returncode == -signal.SIGKILL and 3 <= len(done) < 16, "the build ended before it could be killed"

    # an unfinished cache is refused, before anything is written
    out = tmp_path / "out"
    opts = [RANDOM_TEACHER, f"distill.cache={cache}", f"run.output_dir={out}", "run.max_epoch=1", SMOKE_RETRIEVAL]
    assert "holds an unfinished cache" in refused(*opts) and not out.exists()

    from lavis_dlip.cache_teacher import build_cache

    build_cache(str(CONFIGS / "distill_retrieval.yaml"), build)  # resumed, in this process
    assert len(list(cache.glob("chunk-*.pt"))) == 16  # 128 samples / 8
    assert {n: (cache / n).stat().st_mtime_ns for n in done} == done  # finished chunks were not redone
    assert not list(cache.glob(".tmp-*"))

    # built for another teacher (a wider one) or other augmentations: refused, the difference named
    for option, words in (("distill.teacher.overrides.vision.width=48", "another teacher"),
                          (f"distill.cache={{dir: {cache}, augmentations: 2}}", "other augmentations")):
        stale = refused(*opts, option)
        assert words in stale and "rebuild it" in stale, stale[-2000:]
    assert not out.exists()

    # a chunk damaged after the build (a cut copy): training refuses it by its size, and the build
    # command, run again, finds it by size and checksum and rebuilds it alone
    from lavis_dlip.distill.cache import read_manifest

    damaged = cache / "chunk-000005.pt"
    good = load_chunk(str(damaged))
    intact = {p.name: p.stat().st_mtime_ns for p in cache.glob("chunk-*.pt") if p != damaged}
    damaged.write_bytes(damaged.read_bytes()[:-100])
    assert "chunk-000005.pt is damaged" in refused(*opts) and not out.exists()
    capsys.readouterr()
    build_cache(str(CONFIGS / "distill_retrieval.yaml"), build)
    assert "rebuilding 1 broken chunk(s): chunk-000005.pt" in capsys.readouterr().out
    assert {n: (cache / n).stat().st_mtime_ns for n in intact} == intact
    manifest = read_manifest(str(cache))
    assert manifest["complete"] and manifest["chunks"]["chunk-000005.pt"]["bytes"] == damaged.stat().st_size
    for a, b in zip(good, load_chunk(str(damaged))):
        for field in a:
            if field != "text_len":
                for ra, rb in zip(a[field], b[field]):
                    torch.testing.assert_close(ra, rb, rtol=1e-3, atol=1e-3)

    check(run_main("lavis_dlip.train", CONFIGS / "distill_retrieval.yaml", *opts, cwd=tmp_path))
    job = output_dirs(out)[0]
    assert read_metrics(job)["test"]["r_mean"] > 0


def test_two_processes_build_the_same_cache(tmp_path, demo_smoke_data):
    from lavis_dlip.cache_teacher import build_cache

    one, two = tmp_path / "one", tmp_path / "two"
    build_cache(str(CONFIGS / "distill_retrieval.yaml"), _build_options(one))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *_build_cmd(_build_options(two))[1:]]
    check(subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env))
    assert len(list(one.glob("chunk-*.pt"))) == len(list(two.glob("chunk-*.pt"))) == 4  # 128 samples / 32
    for chunk in sorted(one.glob("chunk-*.pt")):
        a, b = load_chunk(str(chunk)), load_chunk(str(two / chunk.name))
        assert len(a) == len(b)
        for ea, eb in zip(a, b):
            assert ea.keys() == eb.keys()
            for field in ea:
                if field == "text_len":
                    assert ea[field] == eb[field]
                    continue
                for ra, rb in zip(ea[field], eb[field]):
                    torch.testing.assert_close(ra, rb, rtol=1e-3, atol=1e-3)
