"""Every request the gateway answered, counted by client, route and status code.

A client is known by the API key it sends (``Authorization: Bearer KEY``): the launcher gives each
environment copy its service name as its key, so ``GET /stats`` says, per environment, how many
requests it made and how they ended. The launcher prints this when a run trains nothing.
"""

from __future__ import annotations

import contextvars
import threading
from collections import Counter, defaultdict

ANONYMOUS = "anonymous"

# the client of the request being answered (set for the whole request by RequestStats.middleware)
current_client: contextvars.ContextVar[str] = contextvars.ContextVar("gateway_client", default=ANONYMOUS)


def client_of(headers: list[tuple[bytes, bytes]]) -> str:
    """The bearer key of an ASGI request's headers, or ``anonymous``."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, key = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and key.strip():
                return key.strip()[:100]
    return ANONYMOUS


class RequestStats:
    """Thread-safe counters: requests by client and ``"METHOD /path STATUS"``, and max_tokens clamps by client."""

    def __init__(self):
        self._requests: dict[str, Counter] = defaultdict(Counter)
        self._clamped: Counter = Counter()
        self._lock = threading.Lock()

    def count_request(self, client: str, method: str, path: str, status: int) -> None:
        with self._lock:
            self._requests[client][f"{method} {path} {status}"] += 1

    def count_clamp(self, client: str | None = None) -> None:
        with self._lock:
            self._clamped[client or current_client.get()] += 1

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "requests": {client: dict(calls) for client, calls in self._requests.items()},
                "max_tokens_clamped": dict(self._clamped),
            }


class CountRequests:
    """ASGI middleware: counts each HTTP request's final status under its client (``app.add_middleware``)."""

    def __init__(self, app, stats: RequestStats):
        self.app = app
        self.stats = stats

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in ("/health", "/stats"):
            return await self.app(scope, receive, send)
        client = client_of(scope.get("headers", []))
        token = current_client.set(client)
        status = {"code": 500}  # an app that fails before answering is a 500 to the client

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            current_client.reset(token)
            self.stats.count_request(client, scope["method"], scope["path"], status["code"])
