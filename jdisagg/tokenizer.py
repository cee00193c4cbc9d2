"""Text <-> token ids: the demo model's byte tokenizer, HF ``tokenizer.json`` files, streaming decode.

The engine streams text while tokens are generated, so ``IncrementalDetokenizer`` turns each step's new
ids into a text delta that never splits a UTF-8 character (byte-level vocabularies emit a character's
bytes as separate tokens) and costs O(new tokens), not O(sequence), per step.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import tokenizers

REPLACEMENT = "\ufffd"
# A UTF-8 character is at most 4 bytes, so at most 4 byte tokens can be an unfinished character; a
# longer tail ending in U+FFFD is genuinely invalid bytes and is released as is.
_MAX_HELD_TOKENS = 4


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


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, no special tokens: the built-in demo model's vocabulary."""

    vocab_size = 256
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


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
        tokenizer = tokenizers.Tokenizer.from_file(str(file))
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
            "(256); pass a tokenizer explicitly"
        )
    return ByteTokenizer()


class IncrementalDetokenizer:
    """Streams the text of a growing token sequence, one delta per ``add``.

    Decoding ids one by one is wrong (a character's bytes can span tokens; some decoders strip a leading
    space at the start of what they decode) and decoding everything each step is quadratic. So each step
    decodes a window: the previous step's tokens (the *prefix*, for context) plus the new ones, and emits
    the part of the window's text beyond the prefix's text. When that text ends in U+FFFD, the last (up
    to 4) tokens are an unfinished character: the text before them is emitted and they are held back
    until the next tokens complete them (or ``flush``).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start: first token of the last emitted chunk
        self._read = 0  # tokens before this are emitted

    def add(self, token_ids: Iterable[int]) -> str:
        """Append tokens; return the newly completed text (possibly empty)."""
        start = len(self._ids)
        self._ids.extend(token_ids)
        total = len(self._ids)
        if total == start:
            return ""
        prefix_text = self._decode(self._read)
        full_text = self._decode(total)
        if not full_text.endswith(REPLACEMENT):
            return self._advance(prefix_text, full_text, total)
        for end in range(total - 1, max(self._read, total - _MAX_HELD_TOKENS - 1), -1):
            text = self._decode(end)
            if not text.endswith(REPLACEMENT):
                return self._advance(prefix_text, text, end)
        if total - self._read > _MAX_HELD_TOKENS:  # too long to be one character: invalid bytes
            return self._advance(prefix_text, full_text, total)
        return ""

    def flush(self) -> str:
        """Everything still held back (an unfinished character shows as U+FFFD)."""
        total = len(self._ids)
        if self._read == total:
            return ""
        return self._advance(self._decode(self._read), self._decode(total), total)

    def _decode(self, end: int) -> str:
        """The text of the window: tokens from the prefix start up to ``end``."""
        return self.tokenizer.decode(self._ids[self._prefix:end])

    def _advance(self, prefix_text: str, text: str, end: int) -> str:
        """Emit the window's text up to token ``end``; those tokens become the next prefix."""
        self._prefix, self._read = self._read, end
        return text[len(prefix_text):]


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
