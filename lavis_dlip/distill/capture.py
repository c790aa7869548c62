"""Forward hooks that record what a BLIP model computes, without editing LAVIS.

A BLIP model runs its BERT several times per step (unimodal text, fused positive
pairs, fused negative pairs; the decoder once), so hooks record *calls*: each call
keeps its token ids, padding mask, the image embeddings it attended to, its last
hidden state, and only those per-layer tensors that some loss term asked for.

Modules are the modules of ``blip/layout.py`` (layer ``i`` of a module is its
``i``-th layer there):

* ``vision``: ViT blocks (``hidden``, ``attn``);
* ``text``: the layers that run in ``mode="text"`` (``hidden``, ``attn``);
* ``fusion``: the layers with cross-attention, in the first fused call, i.e. the
  positive pairs (``hidden``, ``attn``, ``cross``);
* ``decoder``: the decoder's layers (``hidden``, ``attn``, ``cross``).

Attention maps are the inputs of the attention-dropout modules (post-softmax
probabilities): ``register_hook`` on tensors would fail under ``no_grad``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
from torch import nn

from lavis_dlip.blip.layout import LAYERED, module_layers

__all__ = ["KINDS", "LAYERED", "Capture", "Call", "Point", "Records", "module_layers"]

KINDS = {"vision": ("hidden", "attn"), "text": ("hidden", "attn"),
         "fusion": ("hidden", "attn", "cross"), "decoder": ("hidden", "attn", "cross")}

# (module, kind, layer index within the module)
Point = tuple[str, str, int]


@dataclass
class Call:
    """One run of a BERT (text encoder or decoder)."""

    module: str
    input_ids: Optional[torch.Tensor] = None
    attention_mask: Optional[torch.Tensor] = None  # 1 = token, 0 = padding
    encoder_hidden_states: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    output: Optional[torch.Tensor] = None  # last hidden state
    logits: Optional[torch.Tensor] = None  # decoder only: [B, L, V]
    scored_logits: Optional[torch.Tensor] = None  # decoder only, training: [N, V] at labels[:, 1:] != -100
    scored_lse: Optional[torch.Tensor] = None  # and their rows' log-partition [N]
    scored_probs: Optional[torch.Tensor] = None  # and their softmax [N, V] (no gradient)
    layers: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)


@dataclass
class Records:
    """Everything one forward pass left behind."""

    image: Optional[torch.Tensor] = None
    vision_layers: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)

    def find(self, module: str, nth: int = 0) -> Optional[Call]:
        matches = [c for c in self.calls if c.module == module]
        return matches[nth] if len(matches) > nth else None


def _bert(model: nn.Module, name: str) -> Optional[nn.Module]:
    """The BertModel of ``text_encoder`` or ``text_decoder`` (an LM head model wraps it)."""
    module = getattr(model, name, None)
    return None if module is None else getattr(module, "bert", module)


def _kwarg(args: tuple, kwargs: dict, name: str, position: int) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


class Capture:
    """Context manager: ``with Capture(model, points) as rec: model(samples)``.

    ``points`` lists the per-layer tensors to keep; image embeddings, every BERT
    call's inputs and outputs, and decoder logits (at every position, or at the
    scored ones only: ``ScoredLMHeadDecoder``) are always kept (they are cheap
    references to tensors the forward made anyway).
    """

    def __init__(self, model: nn.Module, points: Iterable[Point] = ()):
        self.model = model
        self.points = set(points)
        self.records = Records()
        self._handles: list = []

    # -- hook helpers
    def _current(self, module: str) -> Optional[Call]:
        calls = self.records.calls
        return calls[-1] if calls and calls[-1].module == module else None

    def _keep(self, module: str, kind: str, index: int, tensor: torch.Tensor) -> None:
        if (module, kind, index) not in self.points:
            return
        if module == "vision":
            self.records.vision_layers[(kind, index)] = tensor
            return
        call = self._current(module)
        if call is not None and (kind, index) not in call.layers:  # first call of its module only
            if module != "fusion" or self.records.find("fusion") is call:
                call.layers[(kind, index)] = tensor

    def _hook_layers(self, module: str, layers: list[nn.Module]) -> None:
        for index, layer in enumerate(layers):
            if layer is None:
                continue

            def keep(kind, i=index):
                return lambda _m, args, out=None: self._keep(module, kind, i, args[0])

            if module == "vision":
                self._handles.append(layer.register_forward_hook(
                    lambda _m, _a, out, i=index: self._keep("vision", "hidden", i, out)))
                self._handles.append(layer.attn.attn_drop.register_forward_pre_hook(keep("attn")))
                continue
            self._handles.append(layer.register_forward_hook(
                lambda _m, _a, out, i=index: self._keep(module, "hidden", i, out[0])))
            self._handles.append(layer.attention.self.dropout.register_forward_pre_hook(keep("attn")))
            if hasattr(layer, "crossattention"):
                self._handles.append(layer.crossattention.self.dropout.register_forward_pre_hook(keep("cross")))

    def _hook_text_encoder(self, bert: nn.Module) -> None:
        """A call starts at the embeddings (they see the token ids) and is typed at
        the encoder (it sees ``mode`` and ``encoder_hidden_states``)."""
        calls = self.records.calls

        def on_embeddings(_m, _args, kwargs):
            calls.append(Call(module="text", input_ids=kwargs.get("input_ids")))

        def on_encoder(_m, _args, kwargs):
            if not calls or calls[-1].output is not None or calls[-1].module == "decoder":
                calls.append(Call(module="fusion"))  # mode="fusion" starts from given embeddings
            call = calls[-1]
            ehs = kwargs.get("encoder_hidden_states")
            call.module = "text" if kwargs.get("mode") == "text" or ehs is None else "fusion"
            call.encoder_hidden_states = ehs
            ext = kwargs.get("attention_mask")  # med.py: (1 - mask) * -10000, [B, 1, 1, L]
            if ext is not None:
                call.attention_mask = (ext[:, 0, -1, :] == 0).long()

        def on_encoder_out(_m, _args, out):
            if calls and calls[-1].module != "decoder" and calls[-1].output is None:
                calls[-1].output = out[0]

        self._handles.append(bert.embeddings.register_forward_pre_hook(on_embeddings, with_kwargs=True))
        self._handles.append(bert.encoder.register_forward_pre_hook(on_encoder, with_kwargs=True))
        self._handles.append(bert.encoder.register_forward_hook(on_encoder_out))

    def _hook_decoder(self, decoder: nn.Module) -> None:
        def on_call(_m, args, kwargs):
            self.records.calls.append(Call(
                module="decoder",
                input_ids=_kwarg(args, kwargs, "input_ids", 0),
                attention_mask=_kwarg(args, kwargs, "attention_mask", 1),
                encoder_hidden_states=kwargs.get("encoder_hidden_states"),
                labels=kwargs.get("labels"),
            ))

        def on_out(_m, _args, out):
            call = self._current("decoder")
            if call is not None and call.logits is None and call.scored_logits is None:
                call.logits = out if torch.is_tensor(out) else out.logits
                call.scored_logits = getattr(out, "scored_logits", None)  # ScoredLMHeadDecoder
                call.scored_lse = getattr(out, "scored_lse", None)
                call.scored_probs = getattr(out, "scored_probs", None)

        def on_hidden(_m, _args, out):
            call = self._current("decoder")
            if call is not None and call.output is None:
                call.output = out[0]

        self._handles.append(decoder.register_forward_pre_hook(on_call, with_kwargs=True))
        self._handles.append(decoder.register_forward_hook(on_out))
        self._handles.append(decoder.bert.encoder.register_forward_hook(on_hidden))

    # -- context manager
    def __enter__(self) -> Records:
        model = self.model
        if hasattr(model, "visual_encoder"):
            self._handles.append(model.visual_encoder.norm.register_forward_hook(
                lambda _m, _a, out: setattr(self.records, "image", out)))
        wanted = {(s, i) for s, _k, i in self.points}
        for module in LAYERED:
            layers = module_layers(model, module)
            # hook only layers some point asks for
            self._hook_layers(module, [layer if (module, i) in wanted else None for i, layer in enumerate(layers)])
        text = _bert(model, "text_encoder")
        if text is not None:
            self._hook_text_encoder(text)
        if getattr(model, "text_decoder", None) is not None:
            self._hook_decoder(model.text_decoder)
        return self.records

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
