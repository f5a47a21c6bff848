"""A web dashboard over a pgbroker schema: ``pgbroker dashboard``, or an ASGI
app to mount in your own web application.

::

    from pgbroker.dashboard import create_app

    app = create_app("postgresql://app@db/app")  # an ASGI application

Install it with ``pip install "pgbroker[dashboard]"`` (Starlette, Jinja2,
uvicorn, python-multipart); docs/dashboard.md says how to run and mount it. This module
imports none of them until :func:`create_app` is called, so the ``pgbroker``
command works without the extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.applications import Starlette

__all__ = ["create_app"]

#: The distributions of the ``dashboard`` extra, by the module they install.
EXTRA_MODULES = ("starlette", "jinja2", "uvicorn", "markupsafe", "anyio", "python_multipart")


def create_app(
    url: str,
    *,
    schema: str = "pgbroker",
    actions: bool = False,
    token: str | None = None,
    refresh: float = 5.0,
) -> Starlette:
    """The dashboard of the pgbroker ``schema`` in the database at ``url``, as
    an ASGI application (a Starlette app).

    ``token``: when set, every request must carry it (HTTP basic auth with
    the token as the password, or ``Authorization: Bearer TOKEN``).
    ``actions``: allow the pages' actions (replay or drop dead letters,
    send durable events, enable or disable beat entries); needs a token,
    and a role that may write pgbroker's tables (checked at each action).
    ``refresh``: seconds between two refreshes of the overview. Nothing
    connects until the first request; the pages run their queries on a
    small pool of the app's own (at most 4 sessions), need the schema at
    version 16 or later (``pgbroker migrate``) and, without actions, only
    read: a role with SELECT on the schema's tables is enough.
    """
    try:
        from pgbroker.dashboard import app
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in EXTRA_MODULES:
            raise
        from pgbroker.errors import ConfigurationError

        raise ConfigurationError(
            f"the dashboard needs the 'dashboard' extra: pip install \"pgbroker[dashboard]\" "
            f"({exc})"
        ) from None
    return app.create_app(url, schema=schema, actions=actions, token=token, refresh=refresh)
