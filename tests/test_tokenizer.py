"""Tokenizers and the streaming detokenizer."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from jdisagg.tokenizer import ByteTokenizer, HFTokenizer, IncrementalDetokenizer, load_tokenizer

TEXT = "héllo wörld — 日本語 🙂 done"


def _stream(tokenizer, ids, chunk: int = 1) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    return [*deltas, detok.flush()]


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(TEXT.encode())
    assert tok.decode(ids) == TEXT
    assert tok.decode([0xE2, 0x82]) == "\ufffd"  # half a character decodes, replaced
    assert tok.vocab_size == 256 and tok.eos_token_ids == () and tok.bos_token_id is None


@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
def test_incremental_detokenizer_never_splits_a_character(chunk):
    tok = ByteTokenizer()
    deltas = _stream(tok, tok.encode(TEXT), chunk)
    assert "".join(deltas) == TEXT
    assert not any("\ufffd" in d for d in deltas)


def test_incremental_detokenizer_holds_then_releases():
    detok = IncrementalDetokenizer(ByteTokenizer())
    assert detok.add([ord("a")]) == "a"
    assert detok.add([0xE2]) == ""  # first byte of "€"
    assert detok.add([0x82]) == ""
    assert detok.add([0xAC, ord("!")]) == "€!"
    assert detok.add([ord("b"), 0xC3]) == "b"  # the complete part of a chunk goes out at once
    assert detok.add([0xA9]) == "é"
    assert detok.add([0xF0, 0x9F]) == ""
    assert detok.flush() == "\ufffd"  # the stream ended mid-character
    assert detok.flush() == ""


def test_incremental_detokenizer_releases_invalid_bytes():
    detok = IncrementalDetokenizer(ByteTokenizer())
    deltas = [detok.add([0xFF]) for _ in range(8)] + [detok.add([ord("x")]), detok.flush()]
    assert "".join(deltas) == "\ufffd" * 8 + "x"
    assert detok.add([ord("y")]) == "y"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny byte-level BPE trained here, saved like a HF model directory."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<|eot|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world", "hello there world", "the world says hello"] * 20, trainer)
    directory = tmp_path_factory.mktemp("hf_tok")
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"},
                                                                 "bos_token": "<s>"}))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    return directory


def test_hf_tokenizer(hf_dir):
    tok = HFTokenizer.from_file(hf_dir)
    assert tok.eos_token_ids == (1, 2) and tok.bos_token_id == 0
    assert tok.vocab_size == tok.tokenizer.get_vocab_size() > 256  # bytes + specials + merges
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert len(tok.encode("hello world")) < len("hello world")  # merges were learned
    assert tok.decode([*tok.encode("hi"), 1]) == "hi"  # special tokens are not shown
    from_file = HFTokenizer.from_file(hf_dir / "tokenizer.json")
    assert from_file.encode(TEXT) == ids


def test_hf_incremental_detokenizer(hf_dir):
    tok = HFTokenizer.from_file(hf_dir)
    ids = tok.encode(TEXT + " hello world")
    for chunk in (1, 2, 5):
        deltas = _stream(tok, ids, chunk)
        assert "".join(deltas) == TEXT + " hello world"
        assert not any("\ufffd" in d for d in deltas)


def test_load_tokenizer(hf_dir, tmp_path):
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    assert isinstance(load_tokenizer(hf_dir), HFTokenizer)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 256}))
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 32000}))
    with pytest.raises(ValueError, match="--tokenizer PATH"):
        load_tokenizer(tmp_path)


def _llama_style_tokenizer() -> HFTokenizer:
    """SentencePiece-style BPE: "▁" marks a space, byte-fallback tokens for what the vocabulary lacks, and a
    decoder that strips the first leading space, so decoding a token alone loses its space."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "▁w", "ll", "llo", "▁he", "▁hello"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "h"), ("▁", "w"), ("l", "l"), ("ll", "o"), ("▁h", "e"), ("▁he", "llo")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<s>", "</s>"])
    return HFTokenizer(tok, eos_token_ids=(2,), bos_token_id=1)


def test_hf_stream_keeps_spaces_and_holds_bytes():
    tok = _llama_style_tokenizer()
    text = "hello wörld 🙂 hello"
    ids = tok.encode(text)
    assert tok.decode(ids[1:2]) == "w"  # alone, " w" loses its space: why streaming needs context
    for chunk in (1, 2, 3):
        deltas = _stream(tok, [*ids, 2], chunk)  # the special eos at the end shows no text
        assert "".join(deltas) == text
        assert not any("\ufffd" in d for d in deltas)


def test_hf_stream_flushes_an_unfinished_character():
    tok = _llama_style_tokenizer()
    detok = IncrementalDetokenizer(tok)
    ids = tok.encode("hello 🙂")
    assert detok.add(ids[:-2]) == "hello "  # two of the emoji's four byte tokens
    assert set(detok.flush()) == {"\ufffd"}  # byte fallback shows each byte of it as U+FFFD
    assert detok.flush() == ""


def test_malformed_tokenizer_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable tokenizer.json"):
        HFTokenizer.from_file(tmp_path)
    with pytest.raises(ValueError, match="no tokenizer.json"):
        HFTokenizer.from_file(tmp_path / "missing")
