"""Gzip request bodies: environments compress large scored groups (``Content-Encoding: gzip``).

Responses are compressed by Starlette's ``GZipMiddleware`` when the client accepts it.
"""

from __future__ import annotations

import gzip
import zlib

from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class GzipRequestBody:
    """ASGI middleware: inflate a gzip request body before the route reads it; 400 if it is not gzip."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = [(key, value) for key, value in scope["headers"]]
        encoding = next((value for key, value in headers if key.lower() == b"content-encoding"), b"")
        if b"gzip" not in encoding.lower():
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        compressed = b"".join(chunks)
        try:
            body = gzip.decompress(compressed) if compressed else b""
        except (OSError, EOFError, zlib.error) as exc:
            await PlainTextResponse(f"Invalid gzip payload: {exc}", status_code=400)(scope, receive, send)
            return
        kept = [(k, v) for k, v in headers if k.lower() not in (b"content-encoding", b"content-length")]
        scope = {**scope, "headers": [*kept, (b"content-length", str(len(body)).encode())]}
        delivered = False

        async def receive_inflated() -> Message:
            nonlocal delivered
            if delivered:
                return await receive()  # e.g. the client disconnecting
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, receive_inflated, send)
