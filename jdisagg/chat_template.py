"""Chat messages -> prompt token ids, the way the model was trained to see them.

Instruct checkpoints ship a Jinja template (``chat_template`` in ``tokenizer_config.json``, or a
``chat_template.jinja`` file beside it). We render it as Hugging Face's ``apply_chat_template`` does,
because that is what the model was fine-tuned on and what every other server produces for it: a sandboxed
Jinja environment with ``trim_blocks`` and ``lstrip_blocks``, loop controls, a ``tojson`` filter that keeps
non-ASCII text, the globals ``raise_exception`` and ``strftime_now``, and the tokenizer's special tokens
(``bos_token``, ``eos_token``, ...) as variables. The rendered text already holds every special token the
model needs, so it is encoded *without* the tokenizer adding its own (a second BOS shifts what the model
sees).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox

from jdisagg.tokenizer import HFTokenizer, Tokenizer

# The built-in demo model has no template of its own: it was trained on plays, so a turn is a speaker's line,
# "USER:\n<text>\n\n", and the model is asked to answer as the next speaker.
DEMO_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | upper }}:\n{{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:\n{% endif %}"
)

_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


class ChatTemplateError(ValueError):
    """The messages cannot be rendered (the template raised, or it is broken): a client-visible reason."""


class ChatTemplate:
    """A compiled chat template and the special-token strings it may refer to."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None) -> None:
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"chat template does not parse: {exc}") from exc

    @classmethod
    def for_model(
        cls, model_dir: str | Path | None, override: str | Path | None = None
    ) -> ChatTemplate | None:
        """The template to serve ``model_dir`` (None: the demo model) with; None if the model has none.

        ``override`` is a file holding a template (``--chat-template``): it replaces the model's own, keeping
        the model's special tokens.
        """
        config = _read_json(Path(model_dir) / "tokenizer_config.json") if model_dir is not None else {}
        special = {name: text for name in _SPECIAL_TOKENS if (text := _token_text(config.get(name)))}
        if override is not None:
            path = Path(override)
            if not path.is_file():
                raise ValueError(f"chat template file {str(path)!r} does not exist")
            return cls(path.read_text(), special)
        if model_dir is None:
            return cls(DEMO_CHAT_TEMPLATE)
        source = _model_template(Path(model_dir), config)
        return None if source is None else cls(source, special)

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, **self.special_tokens
            )
        except jinja2.TemplateError as exc:  # includes raise_exception() from the template itself
            raise ChatTemplateError(f"the chat template rejected the messages: {exc}") from exc

    def encode(
        self, tokenizer: Tokenizer, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Prompt token ids for ``messages``: rendered, then encoded without added special tokens."""
        return encode_rendered(tokenizer, self.render(messages, add_generation_prompt))


def encode_rendered(tokenizer: Tokenizer, text: str) -> list[int]:
    """Encode text that already carries its special tokens (a rendered template).

    ``HFTokenizer.encode`` lets the post-processor add BOS as plain prompts need; here it must not.
    """
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.tokenizer.encode(text, add_special_tokens=False).ids
    return tokenizer.encode(text)


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """The Jinja environment HF templates are written for (see the module docstring)."""

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def _model_template(directory: Path, config: dict[str, Any]) -> str | None:
    """A checkpoint's own template: ``chat_template.jinja`` (newer saves) or ``tokenizer_config.json``'s
    ``chat_template``, which may also be a list of named templates (we serve the one named "default")."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def _token_text(token: str | dict | None) -> str | None:
    """A special token as ``tokenizer_config.json`` gives it: a string or ``{"content": ...}``."""
    return token.get("content") if isinstance(token, dict) else token


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}
