"""Say so when an environment name looks like one of ours but is not: a misspelled variable is
otherwise silently ignored, and the model fails later for a reason far from the cause."""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Iterable, Mapping

from .config import DATA_ENV, SECRET_ENV_PREFIX, VALUES_FILE_ENV
from .settings import setting_names

logger = logging.getLogger("lazy_loading")

_OWN_PREFIX = "LAZY_LOADING_"
_CUTOFF = 0.8
_known: set[str] = {DATA_ENV, VALUES_FILE_ENV, *setting_names()}
_warned: set[str] = set()


def register_known(names: Iterable[str]) -> None:
    """Packages built on this one (the servers) declare the ``LAZY_LOADING_*`` names they read."""
    _known.update(names)
    _unknown_names.cache_clear()


_KnownCounts = tuple[tuple[str, int, tuple[tuple[str, int], ...]], ...]


@functools.lru_cache(maxsize=2)
def _counted(known: frozenset[str]) -> _KnownCounts:
    return tuple((name, len(name), tuple(Counter(name).items())) for name in sorted(known))


def _ratio(a: str, b: str) -> float:
    """difflib's similarity, imported only by an environment with a name close to ours."""
    import difflib

    return difflib.SequenceMatcher(None, a, b).ratio()


def _closest_known(word: str, known: _KnownCounts) -> str | None:
    """``difflib.get_close_matches(word, sorted(_known), n=1, cutoff=0.8)``, same answer.

    It runs for every environment name at every start. difflib spends it in ``quick_ratio``,
    a character-count bound it recounts for each pair; here each known name is counted once,
    and the word once."""
    length = len(word)
    counts: dict[str, int] | None = None
    best: tuple[float, str] | None = None
    for name, name_length, name_counts in known:
        total = length + name_length
        if 2.0 * min(length, name_length) / total < _CUTOFF:
            continue
        if counts is None:
            counts = Counter(word)
        shared = 0
        for char, n in name_counts:
            have = counts.get(char, 0)
            shared += n if n < have else have
        if 2.0 * shared / total < _CUTOFF:
            continue
        ratio = _ratio(name, word)
        if ratio >= _CUTOFF and (best is None or (ratio, name) > best):
            best = (ratio, name)
    return best[1] if best is not None else None


def _suggestion(name: str, known: _KnownCounts) -> str | None:
    upper = name.upper()
    if name in _known or name.startswith(SECRET_ENV_PREFIX):
        return None
    if upper.startswith(SECRET_ENV_PREFIX) or (
            "SECRET" in upper
            and _ratio(upper[:len(SECRET_ENV_PREFIX)], SECRET_ENV_PREFIX) >= _CUTOFF):
        return f"{SECRET_ENV_PREFIX}<ID> (upper case)"
    close = _closest_known(upper, known)
    if close is not None:
        return close
    if upper.startswith(_OWN_PREFIX):
        return ""
    return None


def unknown_names(environ: Mapping[str, str]) -> list[str]:
    """One line per suspicious name: never a value, which may be a secret."""
    return list(_unknown_names(frozenset(environ)))


@functools.lru_cache(maxsize=8)
def _unknown_names(names: frozenset[str]) -> tuple[str, ...]:
    # Matching every name against ours takes milliseconds, and the CLI and the handler both
    # ask about the same environment.
    lines = []
    known = _counted(frozenset(_known))
    for name in sorted(names):
        hint = _suggestion(name, known)
        if hint is None:
            continue
        lines.append(f"{name} is not a variable lazy loading reads; did you mean {hint}?" if hint
                     else f"{name} is not a variable lazy loading reads (see the README's "
                          "configuration table)")
    return tuple(lines)


def warn_about_environ(environ: Mapping[str, str]) -> None:
    """Log each suspicious name once per process (workers and repeated calls stay quiet)."""
    for line in unknown_names(environ):
        if line not in _warned:
            _warned.add(line)
            logger.warning("%s", line)
