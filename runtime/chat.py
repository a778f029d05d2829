"""Render a model's chat template (Jinja, as Hugging Face tokenizers store it) into a prompt."""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping, Sequence


class ChatTemplateError(ValueError):
    """The model has no chat template, or the template rejected the messages."""


@lru_cache(maxsize=8)
def _compile(template: str):
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("chat templates need jinja2: pip install jinja2") from None

    def raise_exception(message: str):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(
    template: str | None,
    messages: Sequence[Mapping[str, Any]],
    bos_token: str | None = None,
    eos_token: str | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """The prompt text for ``messages`` (dicts with "role" and "content")."""
    if not template:
        raise ChatTemplateError("this model has no chat template; use a plain prompt instead")
    for m in messages:
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ChatTemplateError(f"each message needs 'role' and 'content', got {m!r}")
    from jinja2 import TemplateError

    try:
        return _compile(template).render(
            messages=list(messages),
            bos_token=bos_token or "",
            eos_token=eos_token or "",
            add_generation_prompt=add_generation_prompt,
        )
    except TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from None
