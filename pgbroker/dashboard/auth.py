"""Who may use the dashboard: a token, checked on every request when set.

A client proves it knows the token with ``Authorization: Bearer TOKEN``, or
with HTTP basic auth whose password is the token (a browser asks for it;
the user name is free and is recorded as who did what). Without a token
the dashboard is open to whoever reaches its address, which is why it binds
to 127.0.0.1 by default and is read-only unless actions are turned on;
:func:`pgbroker.dashboard.create_app` refuses actions without a token.

The middleware is plain ASGI, so it also guards the static files and works
mounted inside another application.
"""

from __future__ import annotations

import base64
import binascii
import hmac

from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

#: Where the authenticated user's name is kept in the ASGI scope.
USER_KEY = "pgbroker.user"


def user_of(authorization: str | None, token: str) -> str | None:
    """The user an Authorization header authenticates, or None.

    ``Bearer TOKEN`` is the user "token"; ``Basic user:TOKEN`` is ``user``
    (or "token" when the user name is empty).
    """
    if not authorization:
        return None
    scheme, _, credentials = authorization.partition(" ")
    credentials = credentials.strip()
    if scheme.lower() == "bearer":
        return "token" if _same(credentials, token) else None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        user, sep, password = decoded.partition(":")
        if sep and _same(password, token):
            return user or "token"
    return None


def _same(given: str, token: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8"))


class RequireToken:
    """Answer 401 to any HTTP request that does not carry the token."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        user = user_of(Headers(scope=scope).get("authorization"), self.token)
        if user is None:
            response = PlainTextResponse(
                "pgbroker dashboard: authentication required (HTTP basic auth with the "
                "dashboard token as the password, or Authorization: Bearer TOKEN)\n",
                status_code=401,
                headers={"WWW-Authenticate": 'Basic realm="pgbroker dashboard", charset="UTF-8"'},
            )
            await response(scope, receive, send)
            return
        scope[USER_KEY] = user
        await self.app(scope, receive, send)
