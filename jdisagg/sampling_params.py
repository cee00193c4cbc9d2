"""What a request asks for: sampling knobs and stopping rules, validated at the front door."""

from __future__ import annotations

from dataclasses import dataclass, field

TOP_LOGPROBS = 20  # the most alternatives per token a request may ask for (OpenAI's bound)
# Input bounds. A temperature far above 2 (OpenAI's maximum) only flattens the distribution towards uniform
# noise; 10 leaves room for experiments and refuses +inf or 1e308, which would sample uniformly at random.
MAX_TEMPERATURE = 10.0
# Stop rules are checked on every token, so a request's own lists bound what it costs the stream's
# detokenize pass (16 searches over at most ~64 characters) and how much text its stream holds back.
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 64
MAX_STOP_TOKEN_IDS = 64


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings.

    ``temperature == 0`` is greedy. ``top_k == 0`` and ``top_p == 1`` switch those filters off. ``seed`` makes
    sampling reproducible: the random key of every token is derived from (seed, position), so a request
    gives the same tokens whatever it is batched with and even after preemption and recompute.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int = 0  # also return this many most likely alternatives of every output token (0..20)

    def validate(self, vocab_size: int) -> None:
        """Raise one ``ValueError`` naming the first bad field."""
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:  # also catches NaN and infinities
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop has {len(self.stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in self.stop):
            raise ValueError(f"stop strings may have at most {MAX_STOP_STRING_CHARS} characters, got one of "
                             f"{max(len(s) for s in self.stop)}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids has {len(self.stop_token_ids)} ids; at most "
                             f"{MAX_STOP_TOKEN_IDS} are allowed")
        if not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= TOP_LOGPROBS:
            raise ValueError(f"logprobs must be an integer in [0, {TOP_LOGPROBS}], got {self.logprobs!r}")
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids {bad} are outside the vocabulary [0, {vocab_size})")
