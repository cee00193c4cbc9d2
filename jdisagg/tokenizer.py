"""Text <-> token ids: the demo model's byte tokenizer, HF ``tokenizer.json`` files, streaming decode.

The engine streams text while tokens are generated, so each tokenizer also hands out a ``TextStream``
that turns each step's new ids into a text delta that never splits a UTF-8 character (byte-level
vocabularies emit a character's bytes as separate tokens) and costs O(new tokens), not O(sequence), per
step. Both jobs are done natively: Python's incremental UTF-8 decoder for bytes, ``tokenizers``'
``DecodeStream`` (which also keeps the context that space-prefix decoders need) for HF tokenizers.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import tokenizers
from tokenizers.decoders import DecodeStream


class TextStream(Protocol):
    """The text of one growing token sequence, one delta per ``add``."""

    def add(self, token_ids: Iterable[int]) -> str:
        """Append tokens; return the newly completed text (possibly empty: an unfinished character)."""
        ...

    def flush(self) -> str:
        """Everything still held back, at the sequence's end (an unfinished character shows as U+FFFD)."""
        ...


class Tokenizer(Protocol):
    """What the engine needs from a tokenizer; ``eos_token_ids`` end generation (with the model's)."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_token_ids(self) -> tuple[int, ...]: ...

    @property
    def bos_token_id(self) -> int | None: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def decode_stream(self) -> TextStream:
        """A fresh ``TextStream`` for one sequence."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, no special tokens: the built-in demo model's vocabulary."""

    vocab_size = 256
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def decode_stream(self) -> TextStream:
        return _Utf8Stream()


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer plus the eos/bos ids its model directory declares.

    ``encode`` lets the tokenizer's post-processor add special tokens (e.g. BOS) as the model expects;
    ``decode`` drops special tokens so they never appear in streamed text.
    """

    def __init__(
        self, tokenizer: tokenizers.Tokenizer, *, eos_token_ids: tuple[int, ...] = (),
        bos_token_id: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.bos_token_id = bos_token_id

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        """From a ``tokenizer.json`` or a model directory holding one (and maybe the sidecar configs).

        eos ids are the union of ``generation_config.json``, ``config.json`` and ``tokenizer_config.json``'s
        ``eos_token``: chat models often stop on several ids that only one of these files lists.
        """
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise ValueError(f"no tokenizer.json at {str(path)!r}")
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(file))
        except Exception as exc:  # the tokenizers library raises bare Exception for a malformed file
            raise ValueError(f"{str(file)!r} is not a readable tokenizer.json: {exc}") from exc
        directory = file.parent
        tokenizer_config = _read_json(directory / "tokenizer_config.json")
        model_configs = [_read_json(directory / name) for name in ("generation_config.json", "config.json")]

        eos: list[int] = []
        for config in model_configs:
            eos += _as_ids(config.get("eos_token_id"))
        eos += _special_id(tokenizer, tokenizer_config.get("eos_token"))
        bos = _special_id(tokenizer, tokenizer_config.get("bos_token"))
        bos += [b for config in model_configs if (b := config.get("bos_token_id")) is not None]
        return cls(tokenizer, eos_token_ids=tuple(dict.fromkeys(eos)), bos_token_id=bos[0] if bos else None)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def decode_stream(self) -> TextStream:
        return _HFStream(self.tokenizer)


def load_tokenizer(model_dir: str | Path | None) -> Tokenizer:
    """The tokenizer for a model directory: its ``tokenizer.json``, else bytes for a 256-token vocabulary.

    None (the built-in demo model) gives the ``ByteTokenizer``. A directory without ``tokenizer.json``
    whose model is not byte-level is an error rather than a silent mis-tokenisation.
    """
    if model_dir is None:
        return ByteTokenizer()
    directory = Path(model_dir)
    if (directory / "tokenizer.json").exists():
        return HFTokenizer.from_file(directory)
    vocab_size = _read_json(directory / "config.json").get("vocab_size", ByteTokenizer.vocab_size)
    if vocab_size != ByteTokenizer.vocab_size:
        raise ValueError(
            f"{str(directory)!r} has no tokenizer.json and its vocab_size={vocab_size} is not byte-level "
            "(256); pass one: `--tokenizer PATH` (a tokenizer.json or its directory) on the command line, "
            "Engine(..., tokenizer=HFTokenizer.from_file(PATH)) in Python"
        )
    return ByteTokenizer()


class IncrementalDetokenizer:
    """The engine's text stream of one request: whichever ``TextStream`` its tokenizer streams with."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._stream = tokenizer.decode_stream()

    def add(self, token_ids: Iterable[int]) -> str:
        return self._stream.add(token_ids)

    def flush(self) -> str:
        return self._stream.flush()


class _Utf8Stream:
    """Byte tokens: UTF-8's own incremental decoder holds back an unfinished character, and replaces a
    byte that can never start or continue one at once."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_ids: Iterable[int]) -> str:
        return self._decoder.decode(bytes(token_ids))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class _HFStream:
    """``DecodeStream`` returns None while the tokens so far end in an unfinished character; it cannot be
    told that the sequence ended, so the tokens it holds are remembered here for ``flush``."""

    def __init__(self, tokenizer: tokenizers.Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._held: list[int] = []

    def add(self, token_ids: Iterable[int]) -> str:
        chunks = []
        for token_id in token_ids:
            chunk = self._stream.step(self._tokenizer, token_id)
            if chunk is None:
                self._held.append(token_id)
            else:
                self._held.clear()
                chunks.append(chunk)
        return "".join(chunks)

    def flush(self) -> str:
        if not self._held:
            return ""
        text = self._tokenizer.decode(self._held, skip_special_tokens=True)
        self._held.clear()
        self._stream = DecodeStream(skip_special_tokens=True)  # what it held is out now
        return text


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _as_ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def _special_id(tokenizer: tokenizers.Tokenizer, token: str | dict | None) -> list[int]:
    """The id of a special token given as in ``tokenizer_config.json`` (a string or ``{"content": ...}``)."""
    if isinstance(token, dict):
        token = token.get("content")
    token_id = tokenizer.token_to_id(token) if token else None
    return [] if token_id is None else [token_id]
