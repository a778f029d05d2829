"""From the engine's thread to the event loop, and back when the client leaves.

A request's engine requests (one per prompt) send their events from the engine's thread; ``submit``
has them put on an asyncio queue through the event loop, and ``events`` reads them in order. A client
that leaves is heard by one mechanism, ``unless_disconnected``, which races the work of an answer
against the client's disconnect message: for a whole answer it runs in the route, for a stream in
``EventStream``. Either way the generation is cancelled, and the slot freed at the engine's next step,
also while the request still waits for a slot.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from functools import partial
from typing import Any, AsyncIterator, Awaitable, Callable

from starlette.responses import StreamingResponse
from starlette.types import Receive

from ..runtime import ConfigError, Engine, Event, GenerationConfig, QueueFullError, Score
from .errors import APIError, busy
from .requests import GenerationRequest


@dataclass
class Run:
    """One HTTP request's engine requests (one per prompt), and their events as they arrive; the
    prompts' scores when the request scores them."""

    request: GenerationRequest
    config: GenerationConfig
    engine: Engine
    queue: asyncio.Queue
    submitted: list = field(default_factory=list)  # the engine requests, one per prompt
    scoring: list = field(default_factory=list)  # futures of the prompts' Scores, one per prompt

    @property
    def n(self) -> int:
        """Choices per prompt."""
        return self.request.n

    @property
    def copies(self) -> int:
        """Identical choices per generated sequence (choices that do not sample)."""
        return self.request.copies(self.config)

    @property
    def choices(self) -> int:
        return len(self.request.prompts) * self.n

    async def scores(self) -> list[Score]:
        """The prompts' Scores, once the engine has computed them."""
        try:
            return [await asyncio.wrap_future(f) for f in self.scoring]
        except CancelledError:  # the engine shut down first
            raise APIError(503, "the server is shutting down", code="server_shutting_down") from None
        except ValueError as e:
            raise APIError(400, str(e), "prompt") from None

    def cancel(self) -> None:
        for r in self.submitted:
            self.engine.cancel(r)
        for f in self.scoring:
            f.cancel()


def submit(engine: Engine, request: GenerationRequest, config: GenerationConfig) -> Run:
    """Submit one engine request per prompt (none when the request only scores its prompts), and
    each prompt's scoring when it asks for that; a refusal cancels those already submitted. More
    prompts than the slots and the queue hold together could never all be taken: a 400, before any is."""
    most = engine.slots + engine.max_queue
    if len(request.prompts) > most:
        raise APIError(400, f"{len(request.prompts)} prompts in one request, more than this server ever holds at once "
                       f"({engine.slots} slots + a queue of {engine.max_queue} = {most})", "prompt", "too_many_prompts")  # fmt: skip
    box = mailbox(asyncio.get_running_loop())
    run = Run(request, config, engine, asyncio.Queue())
    try:
        if request.prompt_top is not None:
            run.scoring = [engine.score(ids, request.prompt_top) for ids in request.prompts]
        for p, ids in enumerate(request.prompts if request.generates else ()):
            engine_request = engine.request(ids, config, partial(box.post, run.queue, p), request.logprobs)
            run.submitted.append(engine.submit(engine_request))
    except QueueFullError as e:
        run.cancel()
        raise busy(str(e), "server_busy") from None
    except ConfigError as e:  # a constraint found invalid once compiled
        run.cancel()
        raise request.error(e) from None
    except ValueError as e:
        run.cancel()
        raise APIError(400, str(e)) from None
    return run


class Mailbox:
    """Events from the engine's thread to one event loop, handed over in bunches: the events of one
    decode step (one per running request) wake the loop once, not once each."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._pending: list[tuple[asyncio.Queue, tuple[int, Event]]] = []
        self._lock = threading.Lock()

    def post(self, queue: asyncio.Queue, prompt: int, event: Event) -> None:
        """From the engine's thread: hand ``event`` of prompt ``prompt`` to ``queue`` on the loop."""
        with self._lock:
            self._pending.append((queue, (prompt, event)))
            if len(self._pending) > 1:  # a hand-over is already on its way
                return
        try:
            self.loop.call_soon_threadsafe(self._hand_over)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    def _hand_over(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, item in pending:
            queue.put_nowait(item)


_mailboxes: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox]" = weakref.WeakKeyDictionary()


def mailbox(loop: asyncio.AbstractEventLoop) -> Mailbox:
    """The one mailbox of ``loop``."""
    box = _mailboxes.get(loop)
    if box is None:
        box = _mailboxes[loop] = Mailbox(loop)
    return box


async def events(run: Run) -> AsyncIterator[tuple[int, Event]]:
    """(choice index, event) until every choice has finished; a sequence repeated as several
    choices (``copies``) gives each of them its events."""
    open_sequences = len(run.submitted) * run.config.num_return_sequences
    copies = run.copies
    while open_sequences:
        prompt, event = await run.queue.get()
        if event.finish_reason == "error":
            error = run.submitted[prompt].error
            raise APIError(500, f"generation failed: {type(error).__name__}: {error}")
        if event.finish_reason is not None:
            open_sequences -= 1
        for copy in range(copies):
            yield prompt * run.n + event.choice * copies + copy, event


async def unless_disconnected(receive: Receive, work: Awaitable, on_disconnect: Callable[[], None]) -> Any:
    """``work``'s result, or None once the client has left: then ``on_disconnect`` runs and the work
    is cancelled. So it is too when this is cancelled (Ray Serve's way of saying the client left),
    or when the connection breaks while the work sends (OSError)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        on_disconnect()
        raise
    finally:
        gone.cancel()
    if task not in done:
        task.cancel()
        on_disconnect()
        return None
    try:
        return task.result()
    except OSError:
        on_disconnect()
        return None


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream(StreamingResponse):
    """Server-Sent Events that always listen for the client's disconnect (Starlette's own stream
    listens only under older ASGI servers), so the generation is cancelled at once, even before a
    token is sent."""

    def __init__(self, content: AsyncIterator[str], on_disconnect: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_disconnect = on_disconnect

    async def __call__(self, scope, receive, send) -> None:
        await unless_disconnected(receive, self.stream_response(send), self.on_disconnect)
