"""Builders for a user's own data in LAVIS's formats, with no download.

They are LAVIS ``BaseDatasetBuilder`` subclasses that build LAVIS's own dataset
classes; what they add is where files come from (absolute paths, or relative to
the run yaml: ``base_dir``) and a check of every file and record before training.

Run yaml (docs/data.md has every format)::

    datasets:
      dlip_local_retrieval:
        vis_processor: {train: {name: blip_image_eval, image_size: 64}, eval: ...}
        text_processor: {train: {name: blip_caption}, eval: {name: blip_caption}}
        build_info:
          images: {storage: images}
          annotations:
            train: {storage: retrieval_train.json}
            test: {storage: retrieval_test.json}
"""

from __future__ import annotations

import logging
import os

from lavis.common.registry import registry
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder
from lavis.datasets.datasets.coco_caption_datasets import COCOCapDataset, COCOCapEvalDataset
from lavis.datasets.datasets.coco_vqa_datasets import COCOVQADataset, COCOVQAEvalDataset
from lavis.datasets.datasets.image_text_pair_datasets import ImageTextPairDataset
from lavis.datasets.datasets.retrieval_datasets import RetrievalDataset, RetrievalEvalDataset

from lavis_dlip.datasets import validate as V
from lavis_dlip.datasets.stream import SHUFFLE, ShardStream, read_source

logger = logging.getLogger(__name__)

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "datasets")
SPLITS = ("train", "val", "test")


class LocalBuilder(BaseDatasetBuilder):
    """Shared logic; subclasses set ``kind`` and the LAVIS dataset classes."""

    kind = ""
    name = ""

    @classmethod
    def default_config_path(cls, type="default"):
        return os.path.join(CONFIG_DIR, f"{cls.name}.yaml")

    def _download_data(self):
        """Nothing to download: the data is local."""

    def _where(self, *keys: str) -> str:
        return ".".join(("datasets", self.name) + keys)

    def _path(self, path: str) -> str:
        path = os.path.expanduser(str(path))
        if os.path.isabs(path):
            return path
        base = self.config.get("base_dir") or os.getcwd()
        return os.path.normpath(os.path.join(base, path))

    def resolve(self) -> dict[str, list[str]]:
        """Absolute paths of images and annotations, written back into the config."""
        info = self.config.get("build_info")
        if info is None or info.get("annotations") is None:
            raise V.DataError(f"missing key '{self._where('build_info', 'annotations')}'")
        images = info.get("images")
        if images is None or images.get("storage") is None:
            raise V.DataError(f"missing key '{self._where('build_info', 'images', 'storage')}'")
        image_root = self._path(images.storage)
        if not os.path.isdir(image_root):
            raise V.DataError(f"{self._where('build_info', 'images', 'storage')}: no such directory: {image_root}")
        images.storage = image_root

        splits = {}
        for split, ann in info.annotations.items():
            if split not in SPLITS:
                raise V.DataError(f"{self._where('build_info', 'annotations', split)}: split must be one of {SPLITS}")
            if ann is None or ann.get("storage") is None:
                raise V.DataError(f"missing key '{self._where('build_info', 'annotations', split, 'storage')}'")
            paths = [ann.storage] if isinstance(ann.storage, str) else list(ann.storage)
            ann.storage = [self._path(p) for p in paths]
            if ann.get("gt") is not None:
                ann.gt = self._path(ann.gt)
            splits[split] = list(ann.storage)
        return splits

    def check(self, split: str, ann_paths: list[str]) -> None:
        records = V.load_json(ann_paths[0], self._where("build_info", "annotations", split, "storage"))
        V.check_records(records, ann_paths[0], self.kind, split)
        V.check_images(records, ann_paths[0], self.config.build_info.images.storage,
                       verify=str(self.config.get("verify_images", "header")))

    def build(self):
        splits = self.resolve()
        for split, paths in splits.items():
            self.check(split, paths)
            logger.info("%s %s: %s checked", self.name, split, paths[0])
        datasets = super().build()
        for split, dataset in datasets.items():
            gt = self.config.build_info.annotations[split].get("gt")
            if gt is not None:
                dataset.coco_gt_file = gt  # read by the dlip_captioning task
        return datasets


@registry.register_builder("dlip_local_pairs")
class LocalPairsBuilder(LocalBuilder):
    """Image-text pairs for pre-training: ``[{image, caption}]`` (train only)."""

    kind, name = "pairs", "dlip_local_pairs"
    train_dataset_cls = ImageTextPairDataset
    eval_dataset_cls = ImageTextPairDataset

    def check(self, split, ann_paths):
        if split != "train":
            raise V.DataError(f"{self._where('build_info', 'annotations', split)}: pairs have a train split only")
        super().check(split, ann_paths)


@registry.register_builder("dlip_local_retrieval")
class LocalRetrievalBuilder(LocalBuilder):
    """COCO-Karpathy-style retrieval: train ``{image, caption, image_id}``; eval ``{image, caption: [..]}``."""

    kind, name = "retrieval", "dlip_local_retrieval"
    train_dataset_cls = RetrievalDataset
    eval_dataset_cls = RetrievalEvalDataset


@registry.register_builder("dlip_local_caption")
class LocalCaptionBuilder(LocalBuilder):
    """Captioning: train as retrieval; eval ``{image}`` named ``*_<id>.jpg`` plus a COCO-format ``gt`` file."""

    kind, name = "caption", "dlip_local_caption"
    train_dataset_cls = COCOCapDataset
    eval_dataset_cls = COCOCapEvalDataset

    def check(self, split, ann_paths):
        super().check(split, ann_paths)
        if split == "train":
            return
        gt = self.config.build_info.annotations[split].get("gt")
        if gt is None:
            raise V.DataError(
                f"missing key '{self._where('build_info', 'annotations', split, 'gt')}': "
                "caption evaluation needs a COCO-format ground-truth file"
            )
        V.check_caption_gt(V.load_json(ann_paths[0], ann_paths[0]), ann_paths[0], gt)


@registry.register_builder("dlip_local_vqa")
class LocalVQABuilder(LocalBuilder):
    """VQA: train ``{image, question, answer: [..]}``; eval files in LAVIS's order:
    records, answer_list.json, VQA-API questions, VQA-API annotations."""

    kind, name = "vqa", "dlip_local_vqa"
    train_dataset_cls = COCOVQADataset
    eval_dataset_cls = COCOVQAEvalDataset

    def check(self, split, ann_paths):
        super().check(split, ann_paths)
        if split != "train":
            if len(ann_paths) < 2:
                raise V.DataError(
                    f"{self._where('build_info', 'annotations', split, 'storage')}: VQA eval needs "
                    "[records.json, answer_list.json, questions.json, annotations.json]"
                )
            V.check_vqa_eval(ann_paths, V.load_json(ann_paths[0], ann_paths[0]))



@registry.register_builder("dlip_wds_pairs")
class ShardPairsBuilder(BaseDatasetBuilder):
    """Image-text pairs streamed from webdataset shards (train only; ``datasets/stream.py``):
    ``build_info.sources: [{shards: DIR | PATTERN | [files], weight: 1.0}, ...]``, relative
    paths against the run yaml (``base_dir``); ``build_info.shuffle``: samples in each
    source's shuffle buffer (1: shard order). An epoch is ``run.train_num_samples`` samples."""

    name = "dlip_wds_pairs"

    @classmethod
    def default_config_path(cls, type="default"):
        return os.path.join(CONFIG_DIR, f"{cls.name}.yaml")

    def _download_data(self):
        """Nothing to download: the shards are local."""

    def build(self):
        self.build_processors()
        where = f"datasets.{self.name}.build_info.sources"
        specs = (self.config.get("build_info") or {}).get("sources")
        if not specs:
            raise V.DataError(f"missing key '{where}' (a list of {{shards, weight}})")
        base = self.config.get("base_dir") or os.getcwd()
        sources = []
        for n, spec in enumerate(specs):
            if spec.get("shards") is None:
                raise V.DataError(f"missing key '{where}[{n}].shards'")
            shards = spec.shards
            if isinstance(shards, str) and not os.path.isabs(os.path.expanduser(shards)):
                shards = os.path.join(base, shards)
            elif not isinstance(shards, str):
                shards = [s if os.path.isabs(s) else os.path.join(base, s) for s in map(str, shards)]
            weight = float(spec.get("weight", 1.0))
            if weight <= 0:
                raise V.DataError(f"{where}[{n}].weight must be > 0, got {weight}")
            sources.append(read_source(shards, weight, f"{where}[{n}].shards"))
        shuffle = (self.config.get("build_info") or {}).get("shuffle", SHUFFLE)
        if not isinstance(shuffle, int) or isinstance(shuffle, bool) or shuffle < 1:
            raise V.DataError(f"datasets.{self.name}.build_info.shuffle must be an integer >= 1 (samples in the "
                              f"shuffle buffer; 1: shard order), got {shuffle!r}")
        stream = ShardStream(sources, self.vis_processors["train"], self.text_processors["train"])
        stream.shuffle = shuffle
        return {"train": stream}


# the plugin's builders: paths relative to the run yaml (base_dir)
PLUGIN_BUILDERS = (LocalBuilder, ShardPairsBuilder)
