"""``lmrt chat``: a multi-turn conversation in the terminal.

The history is a list of messages rendered with the model's chat template at every turn. Ctrl-C
stops the answer being written (what was written stays in the history) and Ctrl-D leaves.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import click

from .utf8 import is_utf8

try:  # line editing and history for input() in a terminal
    import readline  # noqa: F401
except ImportError:  # Windows
    pass

HELP = "/reset clears the conversation, Ctrl-C stops an answer, Ctrl-D leaves"


class Conversation:
    """Messages so far; the system message survives /reset and trimming."""

    def __init__(self, system: str | None):
        self.system = [{"role": "system", "content": system}] if system else []
        self.turns: list[dict[str, str]] = []

    @property
    def messages(self) -> list[dict[str, str]]:
        return self.system + self.turns

    def reset(self) -> None:
        self.turns = []

    def drop_oldest_exchange(self) -> bool:
        """Forget the oldest user message and the answer to it; False when only the newest user
        message is left."""
        if len(self.turns) <= 1:
            return False
        del self.turns[:2]
        return True


def fitting_prompt(gen, conversation: Conversation, reserve: int) -> list[int] | None:
    """Token ids of the conversation, dropping the oldest exchanges until ``reserve`` new tokens
    fit in the context; None when even the newest message alone does not fit."""
    while True:
        ids = gen.chat_prompt(conversation.messages)
        if len(ids) + reserve <= gen.context_length:
            return ids
        if not conversation.drop_oldest_exchange():
            return None
        click.echo("[the oldest exchange was dropped to fit the context]", err=True)


def run(gen, system: str | None, options: dict[str, Any], read: Callable[[str], str] = input) -> None:
    """The read-answer loop; returns on end of input."""
    config = gen.config(**options)
    if config.num_return_sequences > 1:
        raise ValueError("chat answers with one sequence; drop --num-return-sequences")
    gen.chat_prompt([{"role": "user", "content": "hi"}])  # no template: fail before the first turn
    conversation = Conversation(system)
    reserve = min(config.max_new_tokens, max(1, gen.context_length // 4))
    click.echo(f"[{HELP}]", err=True)
    while True:
        try:
            line = read("> ")
        except EOFError:
            click.echo()
            return
        except KeyboardInterrupt:
            click.echo()
            continue
        if not is_utf8(line):
            click.echo("[that line is not UTF-8 text; type it again]", err=True)
            continue
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            conversation.reset()
            click.echo("[conversation cleared]", err=True)
            continue
        if text in ("/help", "/?"):
            click.echo(f"[{HELP}]", err=True)
            continue
        conversation.turns.append({"role": "user", "content": line.rstrip("\n")})
        ids = fitting_prompt(gen, conversation, reserve)
        if ids is None:
            conversation.turns.pop()
            click.echo("[that message is too long for the model's context]", err=True)
            continue
        conversation.turns.append({"role": "assistant", "content": answer(gen, ids, options)})


def answer(gen, prompt_ids: list[int], options: dict[str, Any]) -> str:
    """Stream the reply to stdout; Ctrl-C ends it early. Returns the text written."""
    stream = gen.stream(prompt_ids, **options)
    try:
        for piece in stream:
            click.echo(piece, nl=False)
            sys.stdout.flush()
    except KeyboardInterrupt:
        click.echo()
        click.echo("[stopped]", err=True)
        return stream.text
    click.echo()
    return stream.text
