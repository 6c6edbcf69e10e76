"""One line naming the extra to install, instead of a ``ModuleNotFoundError`` traceback."""

from __future__ import annotations

import importlib.util
import sys

from lazy_loading import ConfigError

PACKAGE = "drum-lazy-loading"

# extra -> the top-level modules it must make importable
_MODULES: dict[str, tuple[str, ...]] = {
    "flask": ("flask",),
    "fastapi": ("fastapi", "uvicorn"),
    "gunicorn": ("gunicorn", "packaging", "gevent", "uvicorn_worker"),
    "demo": ("moto", "flask_cors"),
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


def exit_unless_installed(*extras: str, purpose: str) -> None:
    """For config modules that gunicorn imports: one line and exit 1, never a traceback."""
    try:
        require(*extras, purpose=purpose)
    except MissingExtra as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
