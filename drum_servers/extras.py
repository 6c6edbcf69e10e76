"""One line naming the extra to install, instead of a ``ModuleNotFoundError`` traceback."""

from __future__ import annotations

import importlib.util

from lazy_loading import ConfigError

PACKAGE = "drum-lazy-loading"

# extra -> the top-level modules it must make importable
_MODULES: dict[str, tuple[str, ...]] = {
    "flask": ("flask",),
    "fastapi": ("fastapi", "uvicorn"),
    "gunicorn": ("gunicorn", "packaging", "gevent", "uvicorn_worker"),
    "demo": ("moto", "flask", "flask_cors"),
}


class MissingExtra(ConfigError):
    """An optional dependency group is not installed."""


def _missing(extra: str) -> list[str]:
    return [m for m in _MODULES[extra] if importlib.util.find_spec(m) is None]


def require(*extras: str, purpose: str) -> None:
    """Raise ``MissingExtra`` naming every extra ``purpose`` needs that is not installed."""
    absent = [extra for extra in extras if _missing(extra)]
    if absent:
        names = ",".join(absent)
        modules = ", ".join(m for extra in absent for m in _missing(extra))
        raise MissingExtra(f"{purpose} needs the {names} extra{'s' if len(absent) > 1 else ''} "
                           f"(missing: {modules}): pip install '{PACKAGE}[{names}]'")


def server_extras(server: str) -> tuple[str, ...]:
    """The extras a gunicorn-run ``flask`` or ``fastapi`` server needs."""
    return ("gunicorn", "flask") if server == "flask" else ("gunicorn", "fastapi")
