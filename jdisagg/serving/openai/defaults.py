"""Defaults for sampling knobs a request leaves out: the model's ``generation_config.json``, else OpenAI's.

Model authors tune temperature/top-p for their checkpoint and ship them there; vLLM and TGI apply them too, so
the same request gives the same kind of output everywhere. Its eos ids are already stop tokens (the tokenizer
reads them), so only the sampling knobs are read here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GenerationDefaults:
    temperature: float = 1.0  # OpenAI's default: sampling, not greedy
    top_p: float = 1.0
    top_k: int = 0

    @classmethod
    def for_model(cls, model_dir: str | Path | None) -> GenerationDefaults:
        """OpenAI's defaults, overridden by what the checkpoint's ``generation_config.json`` sets.

        ``do_sample`` is not read (as in vLLM): many files leave it at HF's ``false`` while listing the
        temperature their authors recommend.
        """
        path = Path(model_dir) / "generation_config.json" if model_dir is not None else None
        if path is None or not path.is_file():
            return cls()
        config = json.loads(path.read_text())
        base = cls()
        return cls(
            temperature=float(config.get("temperature", base.temperature)),
            top_p=float(config.get("top_p", base.top_p)),
            top_k=int(config.get("top_k", base.top_k)),
        )
