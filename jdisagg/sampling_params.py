"""What a request asks for: sampling knobs and stopping rules, validated at the front door."""

from __future__ import annotations

from dataclasses import dataclass, field

TOP_LOGPROBS = 20  # the most alternatives per token a request may ask for (OpenAI's bound)


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
        if not self.temperature >= 0.0:  # also catches NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        if not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= TOP_LOGPROBS:
            raise ValueError(f"logprobs must be an integer in [0, {TOP_LOGPROBS}], got {self.logprobs!r}")
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids {bad} are outside the vocabulary [0, {vocab_size})")
