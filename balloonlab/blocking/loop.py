"""The library's private asyncio loop, on a daemon thread.

Notebook kernels and scripts call balloonlab's blocking facade from a thread whose own loop
may already be running (Jupyter's), so the facade never calls ``asyncio.run`` or
``run_until_complete`` on the caller's thread: it submits coroutines to this one loop with
``run_coroutine_threadsafe`` and waits for the result, as bluesky and ophyd-async do.
Objects bound to a loop (QMP clients, agent sockets) are all created inside this loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def get_loop() -> asyncio.AbstractEventLoop:
    """Return the library loop, starting its daemon thread on first use."""
    global _loop, _thread
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            _thread = threading.Thread(target=run, name="balloonlab-loop", daemon=True)
            _thread.start()
            ready.wait()
            _loop = loop
        return _loop


def in_library_loop() -> bool:
    """True when called from the library loop's own thread."""
    return _thread is not None and threading.current_thread() is _thread


def run(coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
    """Run ``coro`` on the library loop and block until it finishes.

    :param timeout_s: give up waiting (and cancel the coroutine) after this long.
    :raises RuntimeError: when called from the library loop itself (it would deadlock).
    :raises TimeoutError: when ``timeout_s`` passes first.
    """
    if in_library_loop():
        coro.close()
        raise RuntimeError("balloonlab's blocking API was called from its own event loop; "
                           "use the async API (await ...) inside coroutines")
    future = asyncio.run_coroutine_threadsafe(coro, get_loop())
    try:
        return future.result(timeout_s)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise TimeoutError(f"operation did not finish within {timeout_s} s") from None
    except KeyboardInterrupt:
        # Ctrl-C / a notebook interrupt: stop the work on the loop too, then re-raise.
        future.cancel()
        raise


def submit(coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    """Schedule ``coro`` on the library loop without waiting (for widgets and samplers)."""
    return asyncio.run_coroutine_threadsafe(coro, get_loop())


def stop_loop(timeout_s: float = 5.0) -> None:
    """Stop the library loop and join its thread (tests use this to prove nothing leaks)."""
    global _loop, _thread
    with _lock:
        loop, thread = _loop, _thread
        _loop = _thread = None
    if loop is None or thread is None:
        return

    async def cancel_all() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run_coroutine_threadsafe(cancel_all(), loop).result(timeout_s)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout_s)
    loop.close()
