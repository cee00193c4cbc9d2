"""Tokenizers and the streaming detokenizer."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

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


def test_incremental_detokenizer_work_is_linear():
    class Counting(ByteTokenizer):
        decoded = 0

        def decode(self, ids):
            Counting.decoded += len(ids)
            return super().decode(ids)

    ids = ByteTokenizer().encode(TEXT * 50)
    assert "".join(_stream(Counting(), ids)) == TEXT * 50
    assert Counting.decoded < 8 * len(ids)


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
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
