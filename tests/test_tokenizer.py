"""BLIP's tokenizer from a configurable source, with a clear error offline."""

from __future__ import annotations

import pytest

from lavis_dlip.blip.tokenizer import (
    OFFLINE_VOCAB,
    current_source,
    TokenizerNotFoundError,
    init_blip_tokenizer,
    resolve_source,
    tokenizer_source,
)


def test_offline_vocab_gives_blip_vocabulary():
    tok = init_blip_tokenizer(OFFLINE_VOCAB)
    assert len(tok) == 30524  # BERT-uncased 30,522 + [DEC] + [ENC]
    assert tok.bos_token == "[DEC]"
    assert tok.convert_ids_to_tokens(tok.enc_token_id) == "[ENC]"
    assert tok("a red circle").input_ids == [101, 1037, 2417, 4418, 102]


def test_directory_and_vocab_file_sources_agree():
    directory = resolve_source(OFFLINE_VOCAB)
    a = init_blip_tokenizer(directory)
    b = init_blip_tokenizer(directory + "/vocab.txt")
    assert a("two blue squares").input_ids == b("two blue squares").input_ids


def test_offline_hub_name_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TokenizerNotFoundError) as err:
        init_blip_tokenizer("bert-base-uncased-not-cached")
    msg = str(err.value)
    assert "model.tokenizer" in msg and OFFLINE_VOCAB in msg


def test_missing_local_path_and_package():
    with pytest.raises(TokenizerNotFoundError, match="no usable vocab.txt"):
        init_blip_tokenizer("/nonexistent/vocab-dir/")
    with pytest.raises(TokenizerNotFoundError, match="not installed"):
        init_blip_tokenizer("pkg://no_such_package_xyz/model")


def test_lavis_blip_classes_use_the_configured_source(monkeypatch):
    import lavis_dlip  # noqa: F401
    from lavis.models.blip_models.blip import BlipBase

    with tokenizer_source(OFFLINE_VOCAB):
        assert len(BlipBase.init_tokenizer()) == 30524
    monkeypatch.setenv("LAVIS_DLIP_TOKENIZER", resolve_source(OFFLINE_VOCAB))
    assert len(BlipBase.init_tokenizer()) == 30524
    monkeypatch.delenv("LAVIS_DLIP_TOKENIZER")
    assert current_source() == "bert-base-uncased"  # LAVIS's default is unchanged


def test_models_that_ask_for_nothing_get_lavis_own_loader(monkeypatch):
    """The route is scoped: without a source, LAVIS's init_tokenizer runs as shipped."""
    import lavis_dlip  # noqa: F401
    import transformers
    from lavis.models.blip_models.blip import BlipBase

    calls, offline = [], init_blip_tokenizer(OFFLINE_VOCAB)  # loaded (and cached) before the patch
    monkeypatch.delenv("LAVIS_DLIP_TOKENIZER", raising=False)
    monkeypatch.setattr(transformers.BertTokenizer, "from_pretrained",
                        classmethod(lambda cls, name, *a, **k: calls.append(name) or offline))
    BlipBase.init_tokenizer()
    assert calls == ["bert-base-uncased"]  # LAVIS's call, exactly as blip.py makes it
    with tokenizer_source(OFFLINE_VOCAB):
        BlipBase.init_tokenizer()
    assert calls == ["bert-base-uncased"]  # the asked-for source did not go through LAVIS's loader
