"""Delivery of the core's messages on an event loop, a batch per wake-up.

The core queues answers to calls (and, for a stack, handler runs to start or cancel) and makes a
socket readable; the loop's reader callback takes the whole batch with one plain call. No Rust
thread ever takes the GIL to hand back an answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from .errors import InfraError


class _Native(Protocol):
    @property
    def wake_fd(self) -> int: ...
    def take_messages(self) -> tuple[str, list[int], list[Any]]: ...


class Bridge:
    """The answers to a native object's calls, as futures of the loop the calls were made on."""

    def __init__(
        self,
        native: _Native,
        on_run: Callable[[int, Any], None] | None = None,
        on_cancel: Callable[[int], None] | None = None,
    ) -> None:
        self._native = native
        self._on_run = on_run
        self._on_cancel = on_cancel
        self._loop: asyncio.AbstractEventLoop | None = None
        self._replies: dict[int, asyncio.Future[Any]] = {}

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Delivers on ``loop`` from now on. A loop that stopped hands over to a new one; one that
        still runs (in another thread) keeps its calls, and this one is refused."""
        if self._loop is loop:
            return
        if self._loop is not None and not self._loop.is_closed():
            if self._loop.is_running():
                raise InfraError(
                    "this client is in use on another running event loop; "
                    "create one client per event loop"
                )
            self._loop.remove_reader(self._native.wake_fd)
        # Calls made on a loop that has stopped can never be awaited again.
        self._replies.clear()
        loop.add_reader(self._native.wake_fd, self._drain)
        self._loop = loop

    def detach(self, reason: str) -> None:
        """Stops delivering; calls still waiting fail with ``reason``."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._native.wake_fd)
        self._loop = None
        stopped = InfraError(reason)
        for future in self._replies.values():
            if not future.done():
                future.set_exception(stopped)
        self._replies.clear()

    async def reply(self, token: int) -> Any:
        """The answer to the call registered under ``token`` (made after ``attach``)."""
        # An answer is only delivered by the loop's own callback, so none can come in before
        # the future is registered.
        assert self._loop is not None
        future: asyncio.Future[Any] = self._loop.create_future()
        self._replies[token] = future
        return await future

    def _drain(self) -> None:
        kinds, tokens, items = self._native.take_messages()
        for kind, token, item in zip(kinds, tokens, items):
            if kind == "a":
                future = self._replies.pop(token, None)
                if future is None or future.done():
                    continue
                if isinstance(item, BaseException):
                    future.set_exception(item)
                else:
                    future.set_result(item)
            elif kind == "r" and self._on_run is not None:
                self._on_run(token, item)
            elif kind == "c" and self._on_cancel is not None:
                self._on_cancel(token)
