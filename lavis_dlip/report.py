"""Compare what registered models cost, without weights: ``python -m lavis_dlip.report``.

For each ``arch:type`` (the first is the reference) it reports parameters per
module (vision, text, fusion, decoder, heads; what inference uses, not momentum
copies or queues), FLOPs per module for one image and one text (PyTorch's FLOP
counter), and latency measured side by side in one process (warm-up, then
repeats interleaved across models; median): image encoding, text encoding, ITM
re-ranking of k candidates, caption generation. Ratios are model / reference.

    python -m lavis_dlip.report --models blip_retrieval:coco dlip_retrieval:small dlip_retrieval:tiny
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch

from lavis_dlip.blip import passes
from lavis_dlip.blip.build import model_config
from lavis_dlip.blip.layout import MODULES, module_layout
from lavis_dlip import compat
from lavis_dlip.blip.layout import layouts, module_of
from lavis_dlip.blip.tokenizer import tokenizer_source
from lavis_dlip.cli import main_guard

CAPTION_TOKENS = 20  # tokens decoded per caption (prompt included), beam 3
ANSWER_TOKENS = 10  # tokens decoded per VQA answer, beam 3


@dataclass
class ModelCost:
    name: str
    params: dict[str, int] = field(default_factory=dict)
    flops: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------- building
def build(spec: str, image_size: Optional[int], tokenizer: Optional[str]):
    """A registered model ``arch:type`` with random weights, at ``image_size``."""
    from lavis.common.registry import registry

    arch, _, model_type = spec.partition(":")
    cfg = model_config(arch, model_type, where=f"--models {spec}")
    if image_size:
        if "vision" in cfg:
            cfg.vision.image_size = image_size
        else:
            cfg.image_size = image_size
    cfg.pop("init", None)
    if tokenizer:  # --tokenizer wins over a preset's own (costs do not depend on the vocabulary file)
        cfg.tokenizer = tokenizer
    with compat.random_weights(), tokenizer_source(tokenizer):
        model = registry.get_model_class(arch).from_config(cfg)
    return model.eval()


def count_params(model) -> dict[str, int]:
    """Parameters per module (``blip/layout.py``); momentum copies and queues excluded."""

    found = layouts(model)
    out = {m: 0 for m in MODULES}
    for key, p in model.named_parameters():
        m = module_of(key, model, found)
        if m:
            out[m] += p.numel()
    out["total"] = sum(out[m] for m in MODULES)
    return out


# ----------------------------------------------------------------------------- workloads
class Workloads:
    """The inference calls that LAVIS's BLIP tasks make, on dummy inputs."""

    def __init__(self, model, image_size: int, text_len: int, k: int, batch: int, device: str):
        self.model, self.k, self.batch, self.device = model, k, batch, device
        self.image = torch.randn(batch, 3, image_size, image_size, device=device)
        tok = model.tokenizer
        ids = torch.randint(1000, 2000, (batch, text_len), device=device)
        ids[:, 0] = tok.cls_token_id
        ids[:, -1] = tok.sep_token_id
        self.ids, self.mask = ids, torch.ones_like(ids)

    def _text(self, n: int):
        from transformers.tokenization_utils_base import BatchEncoding

        return BatchEncoding({"input_ids": self.ids[:1].repeat(n, 1), "attention_mask": self.mask[:1].repeat(n, 1)})

    def available(self) -> dict[str, Any]:
        m = self.model
        calls = {}
        if hasattr(m, "visual_encoder"):
            calls["image_encoding"] = lambda: m.visual_encoder.forward_features(self.image)
        if hasattr(m, "text_encoder"):
            calls["text_encoding"] = lambda: m.text_encoder.forward_text(self._text(self.batch))
            if hasattr(m, "itm_head"):
                calls["itm_rerank"] = self.itm_rerank
        # generation decodes a fixed number of tokens (min = max length): latency then
        # compares architectures, not how early each model happens to emit [SEP]
        if hasattr(m, "generate"):
            calls["caption_generation"] = lambda: m.generate(
                {"image": self.image[:1]}, num_beams=3, max_length=CAPTION_TOKENS, min_length=CAPTION_TOKENS)
        if hasattr(m, "predict_answers"):
            calls["vqa_answering"] = lambda: m.predict_answers(
                {"image": self.image[:1], "text_input": ["what is in the picture?"]},
                inference_method="generate", num_beams=3, max_len=ANSWER_TOKENS, min_len=ANSWER_TOKENS)
        return calls

    def itm_rerank(self):
        """compute_sim_matrix's inner step: one image against its k candidate texts."""
        m = self.model
        image_embeds = m.visual_encoder.forward_features(self.image[:1])
        text = self._text(self.k)
        return passes.itm_logits(m, passes.with_enc(text.input_ids, m.tokenizer.enc_token_id), text.attention_mask,
                                 image_embeds.repeat(self.k, 1, 1))

    def module_flops(self) -> dict[str, int]:
        """FLOPs per module for one image and one text (FLOPs = 2 x multiply-adds)."""
        from torch.utils.flop_counter import FlopCounterMode

        m = self.model

        def count(fn) -> int:
            with FlopCounterMode(display=False) as counter:
                fn()
            return int(counter.get_total_flops())

        out = {mod: 0 for mod in MODULES}
        image = self.image[:1]
        if hasattr(m, "visual_encoder"):
            out["vision"] = count(lambda: m.visual_encoder.forward_features(image))
            image_embeds = m.visual_encoder.forward_features(image)
        text = self._text(1)
        if hasattr(m, "text_encoder"):
            out["text"] = count(lambda: m.text_encoder.forward_text(text))
            if hasattr(m, "visual_encoder"):
                multimodal = count(lambda: passes.fused_pass(m, text.input_ids, text.attention_mask, image_embeds))
                # BLIP's ITM pass re-runs the text layers with cross-attention: its extra cost is fusion
                out["fusion"] = multimodal - (out["text"] if _shares_layers(m) else 0)
        if hasattr(m, "text_decoder") and hasattr(m, "visual_encoder"):
            enc = image_embeds if not hasattr(m, "text_encoder") or _decoder_reads_image(m) else \
                m.text_encoder.forward_text(text).last_hidden_state
            out["decoder"] = count(lambda: m.text_decoder(
                text.input_ids, attention_mask=text.attention_mask, encoder_hidden_states=enc, return_dict=True))
        out["total"] = sum(out[mod] for mod in MODULES)
        return out


def _shares_layers(model) -> bool:
    return module_layout(model, "fusion").part == "cross"  # BLIP: cross-attention inside the text layers


def _decoder_reads_image(model) -> bool:
    return module_layout(model, "decoder").cross_stream == "vision"


# ----------------------------------------------------------------------------- measuring
def measure(specs: Sequence[str], image_size: Optional[int], text_len: int, k: int, batch: int,
            device: str, warmup: int, repeats: int, tokenizer: Optional[str], latency: bool = True
            ) -> list[ModelCost]:
    torch.manual_seed(0)
    models = [build(s, image_size, tokenizer).to(device) for s in specs]
    # a spec given twice (e.g. to see timing noise) keeps both rows: "spec", "spec #2"
    names = [s if specs[:i].count(s) == 0 else f"{s} #{specs[:i].count(s) + 1}" for i, s in enumerate(specs)]
    return measure_models(dict(zip(names, models)), image_size, text_len, k, batch, device, warmup, repeats,
                          latency)


def measure_models(models: Mapping[str, Any], image_size: Optional[int], text_len: int, k: int, batch: int,
                   device: str, warmup: int, repeats: int, latency: bool = True) -> list[ModelCost]:
    """Parameters, FLOPs and (interleaved, median) latency of built models, by name."""
    sizes = [image_size or _image_size(m) for m in models.values()]
    loads = [Workloads(m, size, text_len, k, batch, device) for m, size in zip(models.values(), sizes)]
    costs = [ModelCost(name=name) for name in models]
    with torch.inference_mode():
        for cost, model, load in zip(costs, models.values(), loads):
            cost.params = count_params(model)
            cost.flops = load.module_flops()
        if latency:
            calls = [load.available() for load in loads]
            times: list[dict[str, list[float]]] = [{name: [] for name in c} for c in calls]
            for r in range(warmup + repeats):
                for i, c in enumerate(calls):  # interleaved: every model sees the same machine state
                    for name, fn in c.items():
                        _sync(device)
                        t0 = time.perf_counter()
                        fn()
                        _sync(device)
                        if r >= warmup:
                            times[i][name].append((time.perf_counter() - t0) * 1000)
            for cost, t in zip(costs, times):
                cost.latency_ms = {name: statistics.median(v) for name, v in t.items()}
    return costs


def _image_size(model) -> int:
    return int(model.visual_encoder.patch_embed.img_size[0])


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- output
def ratios(costs: list[ModelCost]) -> list[dict[str, Optional[float]]]:
    ref = costs[0]
    out = []
    for c in costs:
        r: dict[str, Optional[float]] = {
            "params": c.params["total"] / ref.params["total"],
            "flops": c.flops["total"] / ref.flops["total"] if ref.flops["total"] else None,
        }
        for name, ms in c.latency_ms.items():
            if name in ref.latency_ms:
                r[f"speedup_{name}"] = ref.latency_ms[name] / ms
        out.append(r)
    return out


def to_markdown(costs: list[ModelCost], settings: dict[str, Any]) -> str:
    rs = ratios(costs)
    lines = [f"Reference: `{costs[0].name}`. Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), ""]
    lines += ["| model | " + " | ".join(f"{m} params (M)" for m in MODULES) + " | total params (M) | % of ref |",
              "|---" * (len(MODULES) + 3) + "|"]
    for c, r in zip(costs, rs):
        lines.append(f"| `{c.name}` | " + " | ".join(f"{c.params[m] / 1e6:.2f}" for m in MODULES)
                     + f" | {c.params['total'] / 1e6:.2f} | {100 * r['params']:.1f}% |")
    lines += ["", "| model | " + " | ".join(f"{m} GFLOPs" for m in MODULES) + " | total GFLOPs | % of ref |",
              "|---" * (len(MODULES) + 3) + "|"]
    for c, r in zip(costs, rs):
        pct = f"{100 * r['flops']:.1f}%" if r["flops"] is not None else "-"
        lines.append(f"| `{c.name}` | " + " | ".join(f"{c.flops[m] / 1e9:.3f}" for m in MODULES)
                     + f" | {c.flops['total'] / 1e9:.2f} | {pct} |")
    names = sorted({n for c in costs for n in c.latency_ms})
    if names:
        lines += ["", "| model | " + " | ".join(f"{n} ms (speed-up)" for n in names) + " |",
                  "|---" * (len(names) + 1) + "|"]
        for c, r in zip(costs, rs):
            cells = [f"{c.latency_ms[n]:.1f} ({r.get('speedup_' + n, 0):.2f}x)" if n in c.latency_ms else "-"
                     for n in names]
            lines.append(f"| `{c.name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", required=True, help="arch:type; the first is the reference")
    parser.add_argument("--image-size", type=int, help="default: each model's preset")
    parser.add_argument("--text-len", type=int, default=35)
    parser.add_argument("--k", type=int, default=16, help="ITM re-ranking candidates (k_test)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--tokenizer", help="tokenizer source for every model (see docs/compat.md)")
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--format", choices=("md", "json"), default="md")
    parser.add_argument("--out", help="write here instead of stdout")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict[str, Any] = {}

    def go() -> None:
        costs = measure(args.models, args.image_size, args.text_len, args.k, args.batch, args.device,
                        args.warmup, args.repeats, args.tokenizer, latency=not args.no_latency)
        settings = {"device": args.device, "threads": torch.get_num_threads(),
                    "image_size": args.image_size or "preset", "text_len": args.text_len, "k": args.k,
                    "batch": args.batch, "repeats": args.repeats}
        if args.format == "json":
            text = json.dumps({"settings": settings, "models": [asdict(c) for c in costs],
                               "ratios": ratios(costs)}, indent=2)
        else:
            text = to_markdown(costs, settings)
        result["text"] = text

    code = main_guard(go)
    if code:
        return code
    if args.out:
        with open(args.out, "w") as f:
            f.write(result["text"])
    else:
        sys.stdout.write(result["text"])
    return 0

if __name__ == "__main__":
    sys.exit(main())
