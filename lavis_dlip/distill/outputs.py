"""What the loss terms compare, computed the same way for student and teacher
from a model and its :class:`~lavis_dlip.distill.capture.Records`.

Quantities are computed on first use and cached, so a term that is not
configured costs nothing.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Mapping, NamedTuple, Optional

import torch
from torch import nn

from lavis_dlip.blip import passes
from lavis_dlip.distill.capture import Call, Records


class DistillError(RuntimeError):
    """A loss term cannot be computed for this model pair or batch."""


def match_rows(rows: torch.Tensor, table: torch.Tensor, what: str) -> torch.Tensor:
    """Index of each row of ``rows`` in ``table`` (exact copies, as LAVIS's hard
    negative mining makes them); compares the first token to keep it cheap."""
    if rows is table:
        return torch.arange(table.shape[0], device=table.device)
    a, b = rows[:, 0].detach(), table[:, 0].detach()
    equal = (a[:, None, :] == b[None, :, :]).all(-1)
    found = equal.any(1)
    if not bool(found.all()):
        raise DistillError(
            f"{what}: {int((~found).sum())} of {rows.shape[0]} rows are not in this process's batch "
            f"(LAVIS mines negatives across processes with model.negative_all_rank: True); "
            f"set negative_all_rank: False or use itm_kd with pairs: mined or positives"
        )
    return equal.float().argmax(1)


def positive_pairs(samples: Mapping[str, Any]) -> torch.Tensor:
    """``[B, B]`` on the images' device: True where text ``j`` belongs to image ``i``:
    same ``image_id`` (retrieval data holds several captions per image), else the
    diagonal (LAVIS's pre-training does the same)."""
    image, ids = samples["image"], samples.get("image_id")
    if not torch.is_tensor(ids):
        return torch.eye(image.shape[0], dtype=torch.bool, device=image.device)
    ids = ids.to(image.device).view(-1, 1)
    return ids == ids.t()


def hardest_negatives(sim: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Per row of ``sim``, the column of highest similarity that is not a positive; a
    row whose columns are all positives (every caption in the batch is the image's
    own) keeps its highest: still a pair whose ITM logits a student can learn."""
    only_own = positives.all(1, keepdim=True)
    return torch.where(only_own, sim, sim.masked_fill(positives, float("-inf"))).argmax(1)


class MinedPairs(NamedTuple):
    """Image ``i`` with the caption its teacher finds hardest among the batch's other
    images' (``itm_kd`` with ``pairs: mined``): that caption's fused-pass token ids and
    mask, and the teacher's ITM logits of the pair."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    logits: torch.Tensor


def scored_positions(call: Call) -> torch.Tensor:
    """``[R, L-1]`` mask of the decoder positions a next-token loss scores: the
    model's labels when it has them (prompt and padding are -100), else its tokens."""
    if call.labels is not None:
        return call.labels[:, 1:] != -100
    return call.attention_mask[:, 1:].bool()


class BlipOutputs:
    """Lazily derived features of one BLIP forward pass."""

    def __init__(self, model: nn.Module, records: Records, lavis_output: Any = None):
        self.model = model
        self.records = records
        self.lavis_output = lavis_output
        self.mined: Optional[MinedPairs] = None  # a teacher's, replayed with fusion_mined

    # -- records
    def call(self, module: str, nth: int = 0) -> Call:
        call = self.records.find(module, nth)
        if call is None or call.output is None:
            which = {"text": "a text-encoder pass", "fusion": "a fused (ITM) pass", "decoder": "a decoder pass"}
            raise DistillError(f"the forward pass of {type(self.model).__name__} made no {which[module]} "
                               f"(call {nth}); a loss term needs it")
        return call

    def model_loss(self, key: str) -> torch.Tensor:
        value = None if self.lavis_output is None else getattr(self.lavis_output, key, None)
        if value is None:
            raise DistillError(f"{type(self.model).__name__}'s forward returns no {key}")
        return value

    @property
    def image_embeds(self) -> torch.Tensor:
        if self.records.image is None:
            raise DistillError(f"{type(self.model).__name__} did not encode an image")
        return self.records.image

    # -- contrastive
    @cached_property
    def image_feat(self) -> torch.Tensor:
        return passes.image_feat(self.model, self.image_embeds)

    @cached_property
    def text_feat(self) -> torch.Tensor:
        return passes.text_feat(self.model, self.call("text").output)

    @cached_property
    def itc_logits(self) -> torch.Tensor:
        """In-batch image-to-text logits (the model's own temperature, clamped as LAVIS does)."""
        temp = self.model.temp.clamp(0.001, 0.5)
        return self.image_feat @ self.text_feat.t() / temp

    # -- image-text matching
    @cached_property
    def fusion_cls(self) -> torch.Tensor:
        return self.call("fusion").output[:, 0, :]

    def itm_logits(self, pairs: str = "all") -> torch.Tensor:
        """ITM logits of the positive pairs, then (``pairs="all"``) the negatives."""
        cls = [self.fusion_cls]
        if pairs == "all":
            cls.append(self.call("fusion", 1).output[:, 0, :])
        return self.model.itm_head(torch.cat(cls, dim=0))

    def itm_logits_on(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """ITM logits of image ``i`` paired with text row ``i`` (a pass outside the
        LAVIS forward: the pairs ``itm_kd`` mined with the teacher)."""
        return passes.itm_logits(self.model, input_ids, attention_mask, self.image_embeds)

    def mine_negatives(self, positives: torch.Tensor) -> MinedPairs:
        """Per image, the caption of another image in the batch that this model's ITC
        similarity ranks highest (``hardest_negatives``), and the pair's ITM logits."""
        hardest = hardest_negatives(self.image_feat @ self.text_feat.t(), positives)
        call = self.call("fusion")  # positive pairs: row j is text j with BLIP's [ENC] token
        ids, mask = call.input_ids[hardest], call.attention_mask[hardest]
        return MinedPairs(ids, mask, self.itm_logits_on(ids, mask))

    # -- decoder
    @cached_property
    def decoder_cls(self) -> torch.Tensor:
        return self.call("decoder").output[:, 0, :]

    def lm_rows(self, keep: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits ``[N, V]`` at the positions ``keep`` (``[B, L-1]``; default:
        those this decoder call scores, see ``scored_positions``), row-major, and ``keep``.
        A decoder that computed logits only at its scored positions (a DLIP model
        trained with labels) serves exactly those."""
        call = self.call("decoder")
        own = scored_positions(call)
        keep = own if keep is None else keep
        if call.scored_logits is not None:
            if not torch.equal(keep, own):
                raise DistillError(f"{type(self.model).__name__}'s decoder scored other positions than "
                                   f"the student's (its labels differ)")
            return call.scored_logits, keep
        if call.logits is None:
            raise DistillError(f"{type(self.model).__name__}'s decoder returned no logits")
        return call.logits[:, :-1, :][keep], keep

    def lm_lse(self) -> Optional[torch.Tensor]:
        """The log-partition of each ``lm_rows()`` row, when the decoder's loss computed
        it (``ScoredLMHeadDecoder``); else None."""
        return self.call("decoder").scored_lse

    def lm_probs(self) -> Optional[torch.Tensor]:
        """The softmax of each ``lm_rows()`` row, when the decoder's loss computed it; else None."""
        return self.call("decoder").scored_probs

    # -- per-layer
    def layer(self, module: str, kind: str, index: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """A captured per-layer tensor and its token mask (None: no padding)."""
        if module == "vision":
            tensor, mask = self.records.vision_layers.get((kind, index)), None
        else:
            call = self.call(module)
            tensor, mask = call.layers.get((kind, index)), call.attention_mask
        if tensor is None:
            raise DistillError(f"{module} layer {index} ({kind}) was not captured for {type(self.model).__name__}")
        return tensor, mask
