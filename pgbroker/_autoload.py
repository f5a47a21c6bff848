"""Register pgbroker's URL schemes with Kombu, at no cost until Kombu loads.

``pgbroker-autoload.pth`` (installed next to the package) imports this module
at interpreter start. Importing Kombu there would slow every Python process
down, so instead a meta-path finder waits for ``kombu.transport`` to be
imported and adds the aliases right after it has loaded.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any

_TARGET = "kombu.transport"
# Refuses a mistyped pgbroker URL before Kombu prints its password.
_GUARDED = "kombu.connection"
_ALIASES = {
    "postgresql": "pgbroker.transport:Transport",
    "postgres": "pgbroker.transport:Transport",
    "pgbroker": "pgbroker.transport:Transport",
}


def _add_aliases(module: ModuleType) -> None:
    aliases = getattr(module, "TRANSPORT_ALIASES", None)
    if isinstance(aliases, dict):
        for scheme, target in _ALIASES.items():
            aliases.setdefault(scheme, target)


class _Loader(importlib.abc.Loader):
    def __init__(self, wrapped: Any) -> None:
        self._wrapped = wrapped

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._wrapped.create_module(spec)  # type: ignore[no-any-return]

    def exec_module(self, module: ModuleType) -> None:
        self._wrapped.exec_module(module)
        if module.__name__ == _GUARDED:
            from pgbroker.urltypo import guard_module

            guard_module(module)
        else:
            _add_aliases(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in (_TARGET, _GUARDED):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def install() -> None:
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
