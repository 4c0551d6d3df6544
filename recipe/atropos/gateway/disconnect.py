"""A generation request whose caller has gone is given up, not generated for nobody.

atroposlib cancels an environment's running groups when the API's queue holds
``max_batches_offpolicy`` batches (and on ``worker_timeout``): the environment's HTTP
request goes away, but the handler behind it would go on waiting in the generation
window and then generate, its sequences returned to a closed connection. They never
reach the API, so the window counts them as dropped only ``settle_s`` later, and the
replica time is lost. The gateway watches the connection instead: once the caller has
disconnected, the request leaves the window (held: it never starts; generating: its
sub-requests to the replicas are cancelled) and is answered 499, as nginx logs a
request its client closed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response

CLIENT_CLOSED_REQUEST = 499
POLL_S = 0.25  # how often the connection is checked while the request is held or generating


async def unless_disconnected(raw: Request, work: Awaitable[Any],
                              on_abandoned: Callable[[], None] | None = None) -> Any:
    """``work``'s result, or a 499 response once the caller has disconnected (``work`` cancelled)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=POLL_S)
            if done:
                return task.result()
            if await raw.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                if on_abandoned is not None:
                    on_abandoned()
                return Response(status_code=CLIENT_CLOSED_REQUEST)
    finally:
        if not task.done():
            task.cancel()
