"""Every workaround lavis_dlip needs for salesforce-lavis 1.0.2, in one place.

Each fix states its one-line reason (with the LAVIS file:line it answers) and is
active only where needed: on an ordinary CUDA install with network access, only
the registry-level fixes (tokenizer hook, re-registrable paths) change anything,
and those keep LAVIS's behaviour when the config does not ask for more.

``apply()`` is idempotent and is called by ``import lavis_dlip`` before LAVIS is
imported. docs/compat.md lists the same fixes for users.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import importlib.abc
import importlib.machinery
import logging
import os
import sys
import threading
import types
import warnings
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

_APPLIED = False
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "LAVIS_DLIP_OFFLINE")
_KEEP_ALIVE: list = []  # torch.library fragments must outlive the call that made them


def is_offline() -> bool:
    """True when the user told the hub libraries (or us) that there is no network."""
    return any(os.environ.get(k, "0") not in ("", "0", "false", "False") for k in _OFFLINE_ENV)


# --------------------------------------------------------------------------- import time
# Modules that ``import lavis`` imports and a LAVIS run never uses: spacy (for the
# img2prompt model's noun chunks, lavis/models/img2prompt_models/img2prompt_vqa.py:10),
# pandas (lavis/common/utils.py:22, for a few dataset tools), and torchvision's model zoo
# and ops (imported by ``torchvision/__init__``; ops imports torch._dynamo). Together about
# 1.8 of ``import lavis_dlip``'s 3.7 s (benchmarks/import_time.py). Each is still imported
# the moment anything reads one of its attributes, so behaviour does not change.
DEFERRED = ("spacy", "pandas", "torchvision.datasets", "torchvision.models", "torchvision.ops")
EAGER_ENV = "LAVIS_DLIP_EAGER_IMPORTS"  # set to 1 to import them at once, as LAVIS does


class _Deferred(types.ModuleType):
    """A module whose code runs on the first read of an attribute it does not have yet
    (``__path__``, ``__spec__`` and the other import attributes are there from the start,
    so its submodules import without running it)."""

    SETUP = frozenset({"__file__", "__cached__", "__path__", "__loader__", "__package__", "__spec__"})

    def __getattr__(self, attr: str):
        spec = self.__dict__.get("__spec__")
        # importlib probes __file__, __cached__, ... while it sets the module up: not a use
        if attr in self.SETUP or getattr(spec, "loader_state", None) is None:
            raise AttributeError(attr)
        with _DEFER_LOCK:
            if type(self) is _Deferred:
                self.__class__ = types.ModuleType
                spec.loader = self.__loader__ = spec.loader_state
                spec.loader.exec_module(self)
        return getattr(self, attr)


class _DeferringLoader(importlib.abc.Loader):
    def __init__(self, real: importlib.abc.Loader):
        self.real = real

    def create_module(self, spec):
        return _Deferred(spec.name)

    def exec_module(self, module) -> None:
        module.__spec__.loader_state = self.real


class _DeferringFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in DEFERRED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _DeferringLoader(spec.loader)
        return spec


_DEFER_LOCK = threading.RLock()


def defer_unused_imports() -> bool:
    """Import ``DEFERRED`` on first use instead of with LAVIS (unless ``$LAVIS_DLIP_EAGER_IMPORTS``
    is set, or they are imported already). Returns whether the finder is installed."""
    if os.environ.get(EAGER_ENV, "0") not in ("", "0") or any(m in sys.modules for m in DEFERRED):
        return False
    if not any(isinstance(f, _DeferringFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _DeferringFinder())
    return True


def quiet_known_warnings() -> None:
    """fairscale 0.4.4 (imported by LAVIS's ViT for activation checkpointing) warns twice
    on import that ``torch.cuda.amp.custom_fwd`` is deprecated: nothing a user can act on."""
    warnings.filterwarnings("ignore", message=r"`torch\.cuda\.amp\.custom_(fwd|bwd)", category=FutureWarning)


# --------------------------------------------------------------------------- torchvision
def fix_torchvision_on_cpu_torch() -> bool:
    """PyPI's torchvision wheels are CUDA builds: on a CPU torch their C++ ops do not
    load and ``import torchvision`` raises in torchvision/_meta_registrations.py,
    which stops ``import lavis`` and ``import timm``. Define the two missing op
    schemas and import again; BLIP uses none of the compiled ops. Returns True if
    the fix was needed."""
    try:
        import torchvision  # noqa: F401

        return False
    except RuntimeError as err:
        if "torchvision::nms does not exist" not in str(err):
            raise
    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "FRAGMENT")  # noqa: TOR901
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define(
        "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
    )
    _KEEP_ALIVE.append(lib)
    import torchvision  # noqa: F401,F811

    logger.debug("torchvision: defined nms/qnms schemas for a CPU torch")
    return True


# --------------------------------------------------------------------------- registry paths
def register_path(name: str, path: str) -> None:
    """LAVIS's ``registry.register_path`` raises on a second registration
    (common/registry.py:236), so a second runner in one process (tests, the demo)
    fails in RunnerBase.setup_output_dir. Overwrite instead."""
    from lavis.common.registry import registry

    registry.mapping["paths"][name] = str(path)


def fix_cache_root() -> str:
    """The 1.0.2 wheel's configs/default.yaml sets ``cache_root`` to
    /export/home/.cache/lavis (LAVIS issues #703, #411). Use ``$LAVIS_DLIP_CACHE_ROOT``
    when set; else keep LAVIS's value if that directory exists and is writable;
    else ~/.cache/lavis (never create /export on someone's machine)."""
    from lavis.common.registry import registry

    current = registry.get_path("cache_root")
    wanted = os.environ.get("LAVIS_DLIP_CACHE_ROOT")
    if not wanted:
        if os.path.isdir(current) and os.access(current, os.W_OK):
            return current
        wanted = str(Path.home() / ".cache" / "lavis")
    Path(wanted).mkdir(parents=True, exist_ok=True)
    register_path("cache_root", wanted)
    logger.debug("cache_root: %s -> %s", current, wanted)
    return wanted


# --------------------------------------------------------------------------- tokenizer
def route_blip_tokenizer() -> None:
    """``BlipBase.init_tokenizer`` hard-codes ``bert-base-uncased`` from the hub
    (models/blip_models/blip.py:21). A model that names a tokenizer
    (``model.tokenizer``, ``distill.teacher.overrides.tokenizer``: the builder wraps
    it in ``tokenizer_source``) or a process that sets ``$LAVIS_DLIP_TOKENIZER``
    gets lavis_dlip's resolver (local vocab files, clear error offline); every
    other BLIP model in the process keeps LAVIS's own loader, untouched."""
    from lavis.models.blip_models.blip import BlipBase

    from lavis_dlip.blip.tokenizer import asked_source, init_blip_tokenizer

    if getattr(BlipBase.init_tokenizer, "_dlip", False):
        return
    original = BlipBase.init_tokenizer.__func__

    def init_tokenizer(cls):
        source = asked_source()
        return init_blip_tokenizer(source) if source else original(cls)

    init_tokenizer._dlip = True  # type: ignore[attr-defined]
    BlipBase.init_tokenizer = classmethod(init_tokenizer)


# --------------------------------------------------------------------------- single process
def guard_all_gather_with_grad() -> None:
    """``negative_all_rank: True`` (LAVIS's COCO retrieval yaml) calls
    ``torch.distributed.get_world_size()`` without a process group
    (models/base_model.py:209) and crashes single-process runs: gather nothing there."""
    import lavis.models.base_model as base_model
    import lavis.models.blip_models.blip_retrieval as blip_retrieval

    original = base_model.all_gather_with_grad
    if getattr(original, "_dlip", False):
        return

    @functools.wraps(original)
    def all_gather_with_grad(tensors):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return tensors
        return original(tensors)

    all_gather_with_grad._dlip = True  # type: ignore[attr-defined]
    base_model.all_gather_with_grad = all_gather_with_grad
    blip_retrieval.all_gather_with_grad = all_gather_with_grad


def first_parameter_device() -> None:
    """``BaseModel.device`` (models/base_model.py:25) lists every parameter to read the first
    one's device, and ``compute_sim_matrix`` asks it once per text and image batch: a third
    of a small retrieval evaluation's time. The same device, read off the first parameter."""
    from lavis.models.base_model import BaseModel

    if getattr(BaseModel.device.fget, "_dlip", False):
        return

    def device(self):
        return next(self.parameters()).device

    device._dlip = True  # type: ignore[attr-defined]
    BaseModel.device = property(device)


def init_distributed_mode(run_cfg) -> None:
    """LAVIS's ``init_distributed_mode`` hard-codes NCCL and ``torch.cuda.set_device``
    (common/dist_utils.py:72-73), so ``torchrun`` on CPU fails. Same contract (sets
    ``run_cfg.distributed/rank/world_size/gpu``), with gloo when CUDA is absent."""
    import torch
    import torch.distributed as dist
    from lavis.common.dist_utils import setup_for_distributed

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        run_cfg.distributed = False
        return
    run_cfg.rank = int(os.environ["RANK"])
    run_cfg.world_size = int(os.environ["WORLD_SIZE"])
    run_cfg.gpu = int(os.environ.get("LOCAL_RANK", 0))
    run_cfg.distributed = True
    use_cuda = torch.cuda.is_available() and str(run_cfg.get("device", "cuda")) != "cpu"
    if use_cuda:
        torch.cuda.set_device(run_cfg.gpu)
    run_cfg.dist_backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend=run_cfg.dist_backend,
            init_method=run_cfg.get("dist_url", "env://"),
            world_size=run_cfg.world_size,
            rank=run_cfg.rank,
            timeout=datetime.timedelta(minutes=int(run_cfg.get("dist_timeout_min", 60))),
        )
    setup_for_distributed(run_cfg.rank == 0)


# --------------------------------------------------------------------------- caption metrics
def skip_spice_offline() -> None:
    """pycocoevalcap's ``COCOEvalCap.evaluate`` always builds SPICE, whose constructor
    downloads Stanford CoreNLP (spice/spice.py:24, get_stanford_models.py) and so
    fails offline. When the CoreNLP jar is absent and we are offline, SPICE reports
    NaN with a warning instead; BLEU, METEOR, ROUGE-L and CIDEr are unaffected."""
    import pycocoevalcap.eval as coco_eval
    import pycocoevalcap.spice.spice as spice_mod

    jar = Path(spice_mod.__file__).parent / "lib" / "stanford-corenlp-3.6.0.jar"
    if jar.exists() or getattr(coco_eval.Spice, "_dlip", False):
        return
    original = coco_eval.Spice

    class OfflineSpice(original):  # type: ignore[misc, valid-type]
        _dlip = True

        def __init__(self):
            self._skip = is_offline() and not jar.exists()
            if not self._skip:
                super().__init__()

        def compute_score(self, gts, res):
            if not self._skip:
                return super().compute_score(gts, res)
            logger.warning(
                "SPICE skipped: Stanford CoreNLP (%s) is missing and downloads are off; "
                "SPICE is reported as NaN.", jar.name
            )
            return float("nan"), [float("nan")] * len(gts)

    coco_eval.Spice = OfflineSpice


@contextlib.contextmanager
def random_weights() -> Iterator[None]:
    """LAVIS's ``from_config`` downloads the checkpoint its yaml names
    (base_model.py:load_checkpoint_from_config), and BLIP pre-training models also
    fetch DeiT and bert-base-uncased weights (blip_pretrain.py:368, ``from_pretrained=True``);
    inside this context none of that happens, for dry runs and cost reports."""
    from lavis.models.base_model import BaseModel
    from lavis.models.med import XBertEncoder, XBertLMHeadDecoder
    from lavis.models.vit import VisionTransformerEncoder

    def no_pretrained(original):
        return classmethod(lambda cls, cfg, from_pretrained=False: original.__func__(cls, cfg, from_pretrained=False))

    encoders = (VisionTransformerEncoder, XBertEncoder, XBertLMHeadDecoder)
    saved = [(c, c.__dict__["from_config"]) for c in encoders]
    load = BaseModel.load_checkpoint_from_config
    BaseModel.load_checkpoint_from_config = lambda self, cfg, **kw: None
    for cls, original in saved:
        cls.from_config = no_pretrained(original)
    try:
        yield
    finally:
        BaseModel.load_checkpoint_from_config = load
        for cls, original in saved:
            cls.from_config = original


@contextlib.contextmanager
def meta_device() -> Iterator[None]:
    """Models built inside allocate no memory (their layout only, e.g. a teacher's
    shape for inheritance). ``torch.device("meta")`` alone fails on LAVIS's ViT,
    which reads its drop-path rates back with ``.item()`` (vit.py:224-226), so
    ``torch.linspace`` stays on the CPU; every other new tensor goes to meta."""
    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils._device import _device_constructors

    constructors = _device_constructors() - {torch.linspace}

    class Meta(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func in constructors and kwargs.get("device") is None:
                kwargs["device"] = "meta"
            return func(*args, **kwargs)

    with Meta():
        yield


def apply() -> None:
    """Apply every fix once. torchvision must be fixed before LAVIS is imported."""
    global _APPLIED
    if _APPLIED:
        return
    defer_unused_imports()
    quiet_known_warnings()
    fix_torchvision_on_cpu_torch()
    import lavis  # noqa: F401  (registers LAVIS's own classes and paths)

    fix_cache_root()
    route_blip_tokenizer()
    guard_all_gather_with_grad()
    first_parameter_device()
    skip_spice_offline()
    _APPLIED = True
