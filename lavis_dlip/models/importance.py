"""How ``teacher_reduced`` ranks what it keeps (``model.init.criterion``): residual
channels of a stream, attention heads (and channels within a head), FFN units.

* ``first``: in order (a baseline);
* ``magnitude``: from the weights alone: a residual channel by the summed |gamma|
  of its stream's LayerNorms; a head channel or FFN unit by the L1 norm of every
  weight that reads or writes it;
* ``activation``: measured on a few training batches (``model.init.calibration``):
  the mean |activation| of each residual channel at every layer output, of each
  head channel at the attention's output projection input, of each FFN unit at
  the second FFN layer's input (as activation-based pruning of BERT/ViT/BLIP does).
  The batches come from the run's training split (``lavis_dlip.train`` provides
  them) or from :func:`calibration_data` in Python.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
from collections import defaultdict
from typing import Iterable, Iterator, Optional

import torch

from lavis_dlip.errors import ConfigError
from lavis_dlip.blip.layout import layouts, module_of

CRITERIA = ("magnitude", "first", "activation")
NORM = re.compile(r"(norm\d?|LayerNorm)\.weight$")
# block -> (module whose input holds the block's units, relative to a layer)
UNIT_INPUTS = {
    "attn": "attn.proj",  # ViT: concatenated head outputs
    "attention": "attention.output.dense",
    "crossattention": "crossattention.output.dense",
    "ffn": {"vision": "mlp.fc2", "bert": "output.dense"},
}

logger = logging.getLogger(__name__)
_BATCHES: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("lavis_dlip_calibration", default=None)


@contextlib.contextmanager
def calibration_data(batches: Optional[Iterable[dict]]) -> Iterator[None]:
    """Models built inside this block may measure importance on ``batches``
    (LAVIS training batches: ``image``, ``text_input``, ...)."""
    token = _BATCHES.set(list(batches) if batches is not None else None)
    try:
        yield
    finally:
        _BATCHES.reset(token)


class Importance:
    """Scores over the source model's units; larger is kept first."""

    def __init__(self, source):
        self.source = source

    def stream(self, stream: str, width: int) -> torch.Tensor:
        raise NotImplementedError

    def units(self, key_prefix: str, block: str, weights: list[tuple[torch.Tensor, int]], size: int) -> torch.Tensor:
        """Scores of the ``size`` units of ``block`` in the layer at ``key_prefix``;
        ``weights`` are that block's (tensor, unit dimension) pairs in the source."""
        raise NotImplementedError


class First(Importance):
    def stream(self, stream, width):
        return torch.arange(width, 0, -1, dtype=torch.float)

    def units(self, key_prefix, block, weights, size):
        return torch.arange(size, 0, -1, dtype=torch.float)


class Magnitude(Importance):
    def stream(self, stream, width):
        model, state = self.source.model, self.source.state
        found = layouts(model)
        gammas = [v.abs().float() for k, v in state.items()
                  if NORM.search(k) and found.get(module_of(k, model, found) or "") is not None
                  and found[module_of(k, model, found)].stream == stream]
        if not gammas:
            raise ConfigError(f"{self.source.name}: no LayerNorm of the {stream} stream to rank channels by")
        return torch.stack(gammas).sum(0)

    def units(self, key_prefix, block, weights, size):
        score = torch.zeros(size)
        for w, d in weights:
            unit = w.abs().float().sum(1 - d) if w.dim() == 2 else w.abs().float()
            if unit.numel() == 3 * size:  # ViT's fused q, k, v: a head channel is read by all three
                unit = unit.reshape(3, size).sum(0)
            score += unit
        return score


class Activation(Importance):
    """Runs the source model once over the calibration batches with hooks."""

    def __init__(self, source):
        super().__init__(source)
        batches = _BATCHES.get()
        if not batches:
            raise ConfigError("model.init.criterion 'activation' needs calibration batches: train with "
                              "python -m lavis_dlip.train (it passes the first training batches) or build "
                              "the model inside lavis_dlip.models.importance.calibration_data(batches)")
        self.sums: dict[str, torch.Tensor] = defaultdict(lambda: 0)
        model = source.build()
        found = layouts(model)
        handles = []

        def record(name):
            def hook(_m, args, out=None):
                x = (args[0] if out is None else (out[0] if isinstance(out, tuple) else out)).detach()
                self.sums[name] = self.sums[name] + x.abs().float().reshape(-1, x.shape[-1]).mean(0)
            return hook

        for lay in found.values():
            for i in lay.layer_ids:
                layer = lay.layer_module(model, i)
                prefix = lay.prefix + lay.layer_prefix.format(i=i)
                if lay.name in ("vision", "text", "decoder"):
                    handles.append(layer.register_forward_hook(record(f"stream:{lay.stream}")))
                for block, sub in UNIT_INPUTS.items():
                    if isinstance(sub, dict):
                        sub = sub["vision" if lay.name == "vision" else "bert"]
                    try:
                        target = layer.get_submodule(sub)
                    except AttributeError:
                        continue
                    if lay.owns(sub):
                        handles.append(target.register_forward_pre_hook(record(prefix + block)))
        try:
            with torch.no_grad():
                for batch in batches:
                    model(dict(batch))
        except Exception as err:
            raise ConfigError(f"model.init.criterion activation: the source model {source.name} failed on a "
                              f"calibration batch ({type(err).__name__}: {err})") from err
        finally:
            for h in handles:
                h.remove()
        logger.info("importance measured on %d calibration batches", len(batches))

    def stream(self, stream, width):
        score = self.sums.get(f"stream:{stream}")
        if score is None:
            raise ConfigError(f"{self.source.name}: no {stream} activations were recorded on the calibration batches")
        return score

    def units(self, key_prefix, block, weights, size):
        score = self.sums.get(key_prefix + block)
        if score is None:  # a block the calibration forward never ran (e.g. the decoder in VQA eval)
            logger.info("no activations of %s%s; ranking it by magnitude", key_prefix, block)
            return Magnitude(self.source).units(key_prefix, block, weights, size)
        return score


def importance(criterion: str, source) -> Importance:
    if criterion not in CRITERIA:
        raise ConfigError(f"model.init.criterion '{criterion}' is unknown; choose {', '.join(CRITERIA)}")
    return {"first": First, "magnitude": Magnitude, "activation": Activation}[criterion](source)


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, in increasing order (ties: lower index first)."""
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return order.sort().values

