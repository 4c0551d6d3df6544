"""An optional shared token for runs whose environments or trainer are on other machines.

Without a token configured every request is served (the default bind is 127.0.0.1,
so only this machine can ask). With one, a request must carry it, or it is answered
401. Three ways to carry it, so stock clients need no change:

* ``Authorization: Bearer TOKEN``;
* ``X-Atropos-Token: TOKEN``;
* HTTP basic auth with the token as the password (or the user name): what httpx,
  requests and aiohttp send for a URL with credentials, e.g.
  ``http://atropos:TOKEN@10.0.0.5:9001`` as an environment's ``rollout_server_url``
  or the trainer's ``trainer.atropos.api_url``.
"""

from __future__ import annotations

import base64
import binascii
import hmac

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

TOKEN_HEADER = "x-atropos-token"


def presented_tokens(headers: dict[str, str]) -> list[str]:
    """Every token candidate a request carries."""
    found = []
    if TOKEN_HEADER in headers:
        found.append(headers[TOKEN_HEADER])
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        found.append(credentials.strip())
    elif scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(credentials.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return found
        found += [password, user]
    return found


class TokenAuth:
    """ASGI middleware: every HTTP request must present ``token``."""

    def __init__(self, app: ASGIApp, token: str):
        if not token:
            raise ValueError("the API token must not be empty")
        self.app = app
        self._token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
            if not any(hmac.compare_digest(candidate.encode(), self._token) for candidate in presented_tokens(headers)):
                response = JSONResponse(
                    {
                        "status": "error",
                        "message": "this trajectory API needs its token: send 'Authorization: Bearer TOKEN', "
                        "'X-Atropos-Token: TOKEN', or put it in the URL (http://atropos:TOKEN@host:port)",
                    },
                    status_code=401,
                    headers={"WWW-Authenticate": 'Bearer realm="atropos"'},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
