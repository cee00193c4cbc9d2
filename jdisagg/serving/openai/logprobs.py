"""Log-probabilities in OpenAI's two wire shapes (completions' parallel lists, chat's list of entries).

A token's text is its own decoding. A byte-level vocabulary has tokens that are part of a UTF-8 character and
decode to U+FFFD alone; those are named ``token_id:N`` instead, so that the completions shape, a dict keyed by
token text, never merges two different alternatives into one key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jdisagg.tokenizer import ByteTokenizer, Tokenizer

REPLACEMENT = "\ufffd"  # what a partial UTF-8 character decodes to
Alternatives = Sequence[tuple[int, float]]  # (token id, logprob), most likely first


class LogprobFormatter:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def text(self, token_id: int) -> str:
        text = self.tokenizer.decode([token_id])
        return f"token_id:{token_id}" if REPLACEMENT in text else text

    def bytes(self, token_id: int) -> list[int] | None:
        """The token's UTF-8 bytes (None when they are not known on their own)."""
        if isinstance(self.tokenizer, ByteTokenizer):
            return [token_id]
        text = self.tokenizer.decode([token_id])
        return None if REPLACEMENT in text else list(text.encode("utf-8"))

    def completion(
        self, token_ids: Sequence[int], logprobs: Sequence[float], top: Sequence[Alternatives] | None,
        num_top: int, text_offset: int,
    ) -> dict[str, Any]:
        """``/v1/completions``' shape; ``text_offset`` is where these tokens' text starts in the choice."""
        tokens = [self.text(t) for t in token_ids]
        offsets = []
        for token in tokens:
            offsets.append(text_offset)
            text_offset += len(token)
        if num_top and top is not None:
            tops = [{self.text(i): lp for i, lp in alternatives[:num_top]} for alternatives in top]
        else:  # logprobs=0: the chosen token only, as vLLM answers
            tops = [{token: lp} for token, lp in zip(tokens, logprobs, strict=True)]
        return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": tops,
                "text_offset": offsets}

    def chat(
        self, token_ids: Sequence[int], logprobs: Sequence[float], top: Sequence[Alternatives] | None,
        num_top: int,
    ) -> dict[str, Any]:
        """``/v1/chat/completions``' shape: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
        content = []
        for n, (token_id, logprob) in enumerate(zip(token_ids, logprobs, strict=True)):
            alternatives = top[n][:num_top] if num_top and top is not None else []
            content.append({
                **self._entry(token_id, logprob),
                "top_logprobs": [self._entry(i, lp) for i, lp in alternatives],
            })
        return {"content": content}

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": self.text(token_id), "logprob": logprob, "bytes": self.bytes(token_id)}
