"""Every key a run yaml may hold, with its type and range: one table for the top
level, ``run`` (LAVIS 1.0.2's own keys and the plugin's) and ``datasets.<name>``.

LAVIS reads ``run`` keys with ``.get(key, default)`` all over its runners and tasks,
so a typo (``max_epochs``) is silently ignored and a bad value (``batch_size_train:
0``) fails deep inside PyTorch. ``check_run`` and ``check_dataset`` refuse both
before anything is built; the message names the key and what it must be.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from lavis_dlip.errors import ConfigError, check_keys

TOP_LEVEL = ("model", "datasets", "run", "distill")


@dataclass(frozen=True)
class Key:
    """``kind``: int, float, bool, str, list (of str) or map; bounds are inclusive
    unless ``above`` (strictly greater than ``low``)."""

    kind: str
    low: Optional[float] = None
    high: Optional[float] = None
    above: bool = False
    choices: tuple = ()

    def describe(self) -> str:
        noun = {"int": "an integer", "float": "a number", "bool": "True or False", "str": "a string",
                "list": "a list of names, e.g. [train]", "map": "a mapping"}[self.kind]
        if self.choices:
            return f"one of {', '.join(map(str, self.choices))}"
        if self.low is not None:
            noun += f" {'>' if self.above else '>='} {self.low:g}"
        if self.high is not None:
            noun += f" and <= {self.high:g}" if self.low is not None else f" <= {self.high:g}"
        return noun

    def accepts(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "str":
            return isinstance(value, str)
        if self.kind == "list":
            return isinstance(value, Sequence) and not isinstance(value, str) and all(
                isinstance(v, str) for v in value)
        if self.kind == "map":
            return isinstance(value, Mapping)
        number = _number(value, self.kind)
        if number is None:
            return False
        if self.low is not None and (number <= self.low if self.above else number < self.low):
            return False
        return self.high is None or number <= self.high


def _number(value: Any, kind: str) -> Optional[float]:
    if isinstance(value, bool):
        return None
    if kind == "int":
        return value if isinstance(value, int) else None
    try:  # LAVIS float()s learning rates, so a quoted "1e-4" works there and here
        return float(value)
    except (TypeError, ValueError):
        return None

POSITIVE_INT, COUNT = Key("int", low=1), Key("int", low=0)
RATE, NONNEG = Key("float", low=0, above=True), Key("float", low=0)
FLAG, NAME = Key("bool"), Key("str")
# pycocoevalcap's scorers, by the names COCOEvalCap reports (Bleu reports Bleu_1..Bleu_4): run.caption_scorers
SCORERS = ("Bleu", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
AGG_SCORERS = ("Bleu", "CIDEr")  # agg_metrics = CIDEr + Bleu_4, as LAVIS

# Who reads each key: LAVIS's runner_base.py, runner_iter.py, optims.py, train.py,
# dist_utils.py and tasks (captioning, retrieval, vqa, img2prompt vqa); the plugin's
# runner_dlip and compat (device, progress, best_metric, lr_mult, beta2, ...).
RUN_KEYS: dict[str, Key] = {
    # what to run
    "task": NAME, "runner": NAME, "evaluate": FLAG, "device": NAME, "seed": COUNT,
    "output_dir": NAME, "resume_ckpt_path": NAME, "progress": FLAG, "log_freq": POSITIVE_INT,
    # optimisation
    "lr_sched": NAME, "init_lr": RATE, "min_lr": NONNEG, "warmup_lr": Key("float", low=-1),
    "warmup_steps": COUNT, "lr_decay_rate": RATE, "weight_decay": NONNEG,
    "beta2": Key("float", low=0, high=1), "lr_mult": Key("map"), "amp": FLAG,
    "accum_grad_iters": POSITIVE_INT, "max_epoch": POSITIVE_INT,
    "max_iters": POSITIVE_INT, "iters_per_inner_epoch": POSITIVE_INT,  # runner_iter
    # data
    "batch_size_train": POSITIVE_INT, "batch_size_eval": POSITIVE_INT, "num_workers": COUNT,
    "train_splits": Key("list"), "valid_splits": Key("list"), "test_splits": Key("list"),
    "train_dataset_ratios": Key("map"), "use_dist_eval_sampler": FLAG,
    "train_num_samples": POSITIVE_INT,  # runner_dlip: an epoch of a streamed train split (datasets/stream.py)
    # processes
    "distributed": FLAG, "world_size": POSITIVE_INT, "dist_url": NAME, "dist_backend": NAME,
    "dist_timeout_min": POSITIVE_INT, "gpu": COUNT, "rank": COUNT, "find_unused_parameters": FLAG,
    "best_metric": NAME, "keep_freed_memory": FLAG, "keep_checkpoints": POSITIVE_INT,
    "save_every_n_steps": POSITIVE_INT,  # runner_dlip: a mid-epoch checkpoint every N optimizer steps
    # tasks
    "k_test": POSITIVE_INT, "num_beams": POSITIVE_INT, "max_len": POSITIVE_INT, "min_len": COUNT,
    "num_ans_candidates": POSITIVE_INT, "inference_method": Key("str", choices=("rank", "generate")),
    "prompt": Key("str"), "report_metric": FLAG, "repetition_penalty": RATE,
    "top_k": POSITIVE_INT, "top_p": Key("float", low=0, high=1, above=True),
    "cap_max_length": POSITIVE_INT, "cap_min_length": COUNT, "internal_bsz_fid": POSITIVE_INT,
    "num_captions": POSITIVE_INT, "num_captions_fid": POSITIVE_INT, "num_patches": POSITIVE_INT,
    "block_num": Key("int"),
    "caption_scorers": Key("list"),  # tasks/captioning.py
    "item_scores": FLAG,  # tasks/items.py: per-item test scores for lavis_dlip.study
}

# LAVIS's BaseDatasetBuilder config keys; a builder's own yaml may add more.
DATASET_KEYS = ("data_type", "build_info", "vis_processor", "text_processor", "dataset_card", "type")
# Only the plugin's builders (dlip_local_*, dlip_wds_pairs) read these.
LOCAL_DATASET_KEYS: dict[str, Key] = {
    "base_dir": NAME,
    "verify_images": Key("str", choices=("none", "exists", "header", "full")),
}
PROCESSOR_SPLITS = ("train", "eval")


def check_value(value: Any, key: Key, where: str) -> None:
    if value is not None and not key.accepts(value):
        hint = ""
        if isinstance(value, str) and key.kind in ("int", "float", "bool") and _decodes(value, key):
            hint = ("; it is a string, as ${oc.env:...} always gives: decode it, "
                    "e.g. ${oc.decode:${oc.env:NAME,42}}")
        raise ConfigError(f"{where} must be {key.describe()}, got {value!r}{hint}")


def _decodes(text: str, key: Key) -> bool:
    """Whether yaml would read ``text`` as a value ``key`` accepts (a quoted number)."""
    import yaml

    try:
        return key.accepts(yaml.safe_load(text))
    except yaml.YAMLError:
        return False


def check_run(run: Mapping[str, Any]) -> None:
    """Names, types and ranges of ``run``, and the few keys that must agree."""
    check_keys(run, RUN_KEYS, "run", reference="lavis_dlip/schema.py (RUN_KEYS)")
    for name, key in RUN_KEYS.items():
        check_value(run.get(name), key, f"run.{name}")
    for name, mult in (run.get("lr_mult") or {}).items():
        check_value(mult, NONNEG, f"run.lr_mult.{name}")
    scorers = run.get("caption_scorers")
    if scorers is not None:
        unknown = [s for s in scorers if s not in SCORERS]
        if unknown or not set(AGG_SCORERS) <= set(scorers):
            raise ConfigError(f"run.caption_scorers: {list(scorers)}: choose from {', '.join(SCORERS)}, "
                              f"including {' and '.join(AGG_SCORERS)} (agg_metrics is CIDEr + Bleu_4)"
                              + (f"; unknown: {', '.join(map(str, unknown))}" if unknown else ""))
    for low, high in (("min_lr", "init_lr"), ("min_len", "max_len")):
        if run.get(low) is not None and run.get(high) is not None and float(run[low]) > float(run[high]):
            raise ConfigError(f"run.{low} ({run[low]}) is above run.{high} ({run[high]})")


def check_dataset(name: str, cfg: Mapping[str, Any], local: bool, builder_keys: Sequence[str],
                  processors: Sequence[str]) -> None:
    """Keys of ``datasets.<name>`` (after merging the builder's defaults) and the
    processors it names; ``local``: one of the plugin's builders."""
    where = f"datasets.{name}"
    extra = tuple(LOCAL_DATASET_KEYS) if local else ()
    check_keys(cfg, sorted(set(DATASET_KEYS + extra + tuple(builder_keys))), where)
    if local:
        for key, spec in LOCAL_DATASET_KEYS.items():
            check_value(cfg.get(key), spec, f"{where}.{key}")
    for section in ("vis_processor", "text_processor"):
        splits = cfg.get(section) or {}
        check_keys(splits, PROCESSOR_SPLITS, f"{where}.{section}")
        for split, proc in splits.items():
            proc_name = (proc or {}).get("name")
            if proc_name not in processors:
                raise ConfigError(f"{where}.{section}.{split}.name '{proc_name}' is not a registered processor; "
                                  f"known: {', '.join(sorted(processors))}")
