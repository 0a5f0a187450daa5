"""Run a simulator server in a thread of its own, for synchronous callers."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any, Protocol, TypeVar


class _Server(Protocol):
    async def start(self) -> Any: ...

    async def stop(self) -> Any: ...


_S = TypeVar("_S", bound=_Server)


@contextlib.contextmanager
def in_thread(server: _S, name: str) -> Iterator[_S]:
    """``server`` started in a daemon thread with its own event loop for the ``with``
    body, then stopped; a failure to start is raised here, in the caller's thread."""
    started = threading.Event()
    failure: list[BaseException] = []
    loop = asyncio.new_event_loop()
    stop: asyncio.Event | None = None

    async def main() -> None:
        nonlocal stop
        stop = asyncio.Event()
        try:
            await server.start()
        except BaseException as e:  # noqa: BLE001 (re-raised in the calling thread)
            failure.append(e)
            started.set()
            return
        started.set()
        try:
            await stop.wait()
        finally:
            await server.stop()

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), name=name, daemon=True)
    thread.start()
    started.wait()
    try:
        if failure:
            raise failure[0]
        yield server
    finally:
        if stop is not None and thread.is_alive():
            loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()
