"""Cross-site request forgery checks for the dashboard's actions.

A browser that has signed in with HTTP basic auth sends the credentials
with every request to the dashboard, a form posted from another site's
page too. So an action (a POST that changes data) must prove it comes
from a page the dashboard rendered. Two checks, both required:

* the request's own origin: ``Sec-Fetch-Site`` (sent by current browsers)
  must be ``same-origin`` or absent, and ``Origin``, when sent, must be the
  dashboard's own scheme, host and port;
* a token in the form (``csrf_token``), :func:`token_for` the signed-in
  user: an HMAC of the user name under a secret derived from the dashboard
  token (:func:`secret_for`; actions need a token), so another site can
  neither read nor compute it, and every process serving the same
  dashboard (several server workers) accepts the others' forms. It needs
  no cookie and no server-side session.

The pages that post put ``token_for(...)`` in a hidden field (templates/
_csrf.html), and every action (:mod:`pgbroker.dashboard.actions`) calls
:func:`check` through ``web.check_form`` before acting.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from starlette.requests import Request

#: The form field that carries the token.
FIELD = "csrf_token"


class CsrfError(Exception):
    """The request may come from another site: refuse the action."""


def secret_for(token: str | None) -> bytes:
    """The key of the form tokens: derived from the dashboard's token, or
    random for this process when there is none (then no action is allowed
    anyway)."""
    if not token:
        return secrets.token_bytes(32)
    return hmac.new(token.encode("utf-8"), b"pgbroker dashboard csrf", hashlib.sha256).digest()


def token_for(secret: bytes, user: str | None) -> str:
    """The token the forms of ``user``'s pages carry."""
    return hmac.new(secret, (user or "").encode("utf-8"), hashlib.sha256).hexdigest()


def check(request: Request, secret: bytes, user: str | None, submitted: str | None) -> None:
    """Raise CsrfError unless ``request`` comes from the dashboard's own page
    and ``submitted`` is ``user``'s token."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        raise CsrfError(f"refused: a {site} request (Sec-Fetch-Site)")
    origin = request.headers.get("origin")
    if origin is not None:
        own = f"{request.url.scheme}://{request.url.netloc}"
        if origin != own:
            raise CsrfError(f"refused: the request comes from {origin!r}, not {own!r}")
    if not submitted or not hmac.compare_digest(submitted, token_for(secret, user)):
        raise CsrfError("refused: the form's token is missing or wrong (reload the page)")
