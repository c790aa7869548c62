"""Serve an exported student (``python -m lavis_dlip.export --format onnx``) with
ONNX Runtime: from a PIL image and a string to scores, a caption or an answer,
without LAVIS or PyTorch.

    from lavis_dlip.serve import load
    model = load("export/retrieval")              # Retriever, Captioner or Answerer
    model.scores([image], ["a red circle"])       # ITC similarity and ITM probability
    load("export/caption").caption([image])       # LAVIS's greedy caption, token for token

What it reproduces from LAVIS, each in one place below: the eval image transform
(``blip_image_eval``: bicubic resize, scale, normalise), the text processors
(``blip_caption``, ``blip_question``), ``[ENC]``/``[DEC]`` placement, and greedy
generation with LAVIS's ``min_len``/``max_len`` (counted with the prompt, as
transformers' ``generate`` counts them).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from PIL import Image

CONFIG = "serve.json"
TOKENIZER = "tokenizer"


def caption_text(text: str, max_words: int = 50) -> str:
    """LAVIS's ``blip_caption`` text processing: lower case, listed punctuation to spaces."""
    text = re.sub(r"\s{2,}", " ", re.sub(r"([.!\"()*#:;~])", " ", text.lower())).rstrip("\n").strip(" ")
    return " ".join(text.split(" ")[:max_words])


def question_text(text: str, max_words: int = 50) -> str:
    """LAVIS's ``blip_question`` text processing: lower case, listed punctuation removed."""
    text = re.sub(r"([.!\"()*#:;~])", "", text.lower()).rstrip(" ")
    return " ".join(text.split(" ")[:max_words])


class Exported:
    """The graphs, tokenizer and settings an export wrote into one directory."""

    def __init__(self, directory: Union[str, Path], threads: Optional[int] = None):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        self.directory = Path(directory)
        path = self.directory / CONFIG
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no {CONFIG}; export with python -m lavis_dlip.export --format onnx")
        self.cfg: dict[str, Any] = json.loads(path.read_text())
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.directory / TOKENIZER))
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # idle ONNX Runtime threads otherwise spin after each call, taking the cores from
        # whatever runs next in the process (the tokenizer, PyTorch, the next graph)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sessions = {p.stem: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                         for p in sorted(self.directory.glob("*.onnx"))}

    def run(self, graph: str, **inputs: np.ndarray) -> list[np.ndarray]:
        return self.sessions[graph].run(None, inputs)

    def pixels(self, images: Sequence[Image.Image]) -> np.ndarray:
        """LAVIS's ``blip_image_eval``: RGB, bicubic resize to the square size, [0, 1], normalise."""
        img = self.cfg["image"]
        size = int(img["image_size"])
        arrays = [np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
                  for im in images]
        x = (np.stack(arrays) - np.array(img["mean"], np.float32)) / np.array(img["std"], np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def tokens(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        enc = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=self.cfg["max_txt_len"],
                             return_tensors="np")
        return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)

    def image_embeds(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.run("image_encoder", pixel_values=self.pixels(images))[0]

    def greedy(self, input_ids: np.ndarray, states: np.ndarray, states_mask: np.ndarray) -> np.ndarray:
        """LAVIS's greedy decoding (transformers' ``generate``, ``num_beams=1``) over
        ``decoder_step.onnx`` with its key/value cache: ``[SEP]`` is barred below
        ``min_len`` tokens, finished rows are padded, all stop at ``max_len``."""
        dec, gen = self.cfg["decoder"], self.cfg["generate"]
        sep, pad = self.cfg["sep_token_id"], self.cfg["pad_token_id"]
        batch = input_ids.shape[0]
        empty = np.zeros((batch, dec["heads"], 0, dec["head_dim"]), np.float32)
        past = {f"past_{kind}_{i}": empty for i in range(dec["layers"]) for kind in ("key", "value")}
        out, step = input_ids, input_ids
        done = np.zeros(batch, dtype=bool)
        while out.shape[1] < gen["max_len"]:
            logits, *present = self.run("decoder_step", input_ids=step, encoder_hidden_states=states,
                                        encoder_attention_mask=states_mask, **past)
            if out.shape[1] < gen["min_len"]:
                logits[:, sep] = -np.inf
            nxt = np.where(done, pad, logits.argmax(-1)).astype(np.int64)
            out = np.concatenate([out, nxt[:, None]], axis=1)
            done |= nxt == sep
            if done.all():
                break
            past = dict(zip(past, present))
            step = nxt[:, None]
        return out

    def decode(self, ids: np.ndarray) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)


class Retriever(Exported):
    def image_features(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """(image_embeds for ITM, normalised ITC features)."""
        embeds, feats = self.run("image_encoder", pixel_values=self.pixels(images))
        return embeds, feats

    def text_features(self, texts: Sequence[str]) -> np.ndarray:
        ids, mask = self.tokens([caption_text(t) for t in texts])
        return self.run("text_encoder", input_ids=ids, attention_mask=mask)[0]

    def itm(self, texts: Sequence[str], image_embeds: np.ndarray) -> np.ndarray:
        """Match probability of each (text, image) pair, row by row."""
        ids, mask = self.tokens([caption_text(t) for t in texts])
        return self.run("itm", input_ids=ids, attention_mask=mask, image_embeds=image_embeds)[1]

    def scores(self, images: Sequence[Image.Image], texts: Sequence[str]) -> dict[str, np.ndarray]:
        """ITC cosine similarity [images, texts] and ITM probability of every pair."""
        embeds, img = self.image_features(images)
        txt = self.text_features(texts)
        pairs = [(i, j) for i in range(len(images)) for j in range(len(texts))]
        prob = self.itm([texts[j] for _, j in pairs], embeds[[i for i, _ in pairs]])
        return {"itc": img @ txt.T, "itm": prob.reshape(len(images), len(texts))}


class Captioner(Exported):
    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        embeds = self.image_embeds(images)
        prompt = self.cfg["prompt"]
        ids, _ = self.tokens([prompt] * len(images))
        ids = ids[:, :-1].copy()  # no [SEP]: generation continues the prompt
        ids[:, 0] = self.cfg["bos_token_id"]
        out = self.greedy(ids, embeds, np.ones(embeds.shape[:2], np.int64))
        return [text[len(prompt):] for text in self.decode(out)]


class Answerer(Exported):
    def answer(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list[str]:
        embeds = self.image_embeds(images)
        ids, mask = self.tokens([question_text(q) for q in questions])
        states = self.run("question_encoder", input_ids=ids, attention_mask=mask, image_embeds=embeds)[0]
        bos = np.full((len(questions), 1), self.cfg["bos_token_id"], np.int64)
        return self.decode(self.greedy(bos, states, mask))


SERVED = {"retrieval": Retriever, "caption": Captioner, "vqa": Answerer}  # task -> its class


def load(directory: Union[str, Path], threads: Optional[int] = None) -> Exported:
    """The exported model in ``directory``, as the class of its task."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG}; export with python -m lavis_dlip.export --format onnx")
    cfg = json.loads(path.read_text())
    return SERVED[cfg.get("task") or cfg["kind"]](directory, threads)  # "kind": the old name of "task"
