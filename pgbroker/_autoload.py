"""Register pgbroker's URL schemes with Kombu, at no cost until Kombu loads.

``pgbroker-autoload.pth`` (installed next to the package) imports this module
at every interpreter start. Importing Kombu there would slow every Python
process down (about 80 ms), so instead a meta-path finder waits for
``kombu.transport`` to be imported and adds the aliases right after it has
loaded. This module and ``pgbroker/__init__.py`` import nothing but ``sys``
(not even ``typing`` or ``importlib.abc``, 10 ms and more between them):
``tests/test_startup.py`` keeps the cost measured.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec
    from types import ModuleType
    from typing import Any

_TARGET = "kombu.transport"
# Refuses a mistyped pgbroker URL before Kombu prints its password.
_GUARDED = "kombu.connection"
_ALIASES = {
    "postgresql": "pgbroker.broker.transport:Transport",
    "postgres": "pgbroker.broker.transport:Transport",
    "pgbroker": "pgbroker.broker.transport:Transport",
}


def _add_aliases(module: ModuleType) -> None:
    aliases = getattr(module, "TRANSPORT_ALIASES", None)
    if isinstance(aliases, dict):
        for scheme, target in _ALIASES.items():
            aliases.setdefault(scheme, target)


class _Loader:
    """Runs the real loader of ``kombu.transport``, then adds the aliases.
    (A plain class: the import system only calls these two methods.)"""

    def __init__(self, wrapped: Any) -> None:
        self._wrapped = wrapped

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._wrapped.create_module(spec)  # type: ignore[no-any-return]

    def exec_module(self, module: ModuleType) -> None:
        self._wrapped.exec_module(module)
        if module.__name__ == _GUARDED:
            from pgbroker.urltypo import guard_module

            guard_module(module)
        else:
            _add_aliases(module)


class _Finder:
    """On ``sys.meta_path``: finds ``kombu.transport`` with the other finders
    and wraps its loader; answers None for every other module."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in (_TARGET, _GUARDED):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader)  # type: ignore[assignment]
                return spec
        return None


def install() -> None:
    """Add the aliases now if Kombu's transports are loaded, else when they are."""
    if _GUARDED in sys.modules:
        from pgbroker.urltypo import guard_module

        guard_module(sys.modules[_GUARDED])
    module = sys.modules.get(_TARGET)
    if module is not None:
        _add_aliases(module)
    if module is not None and _GUARDED in sys.modules:
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
