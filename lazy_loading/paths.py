"""Where each artifact lands: resolved against the code dir, and never outside the allowed roots."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

from .cache import STATE_SUBDIRS
from .config import LazyLoadingData
from .errors import ConfigError

STATE_DIR_NAME = ".lazy_loading"
MODEL_CODE = "custom.py"


def resolve_code_dir(code_dir: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Path:
    """``code_dir`` argument, else ``CODE_DIR``, else the current directory; symlinks resolved."""
    raw = code_dir if code_dir is not None else (environ.get("CODE_DIR") or os.getcwd())
    return Path(os.path.realpath(os.fspath(raw)))


def _roots(code_dir: Path, allowed_roots: Sequence[Path]) -> list[Path]:
    return [code_dir, *(Path(os.path.realpath(r)) for r in allowed_roots)]


def resolve_targets(
    data: LazyLoadingData, code_dir: Path, allowed_roots: Sequence[Path] = (), source: str = "",
    replace_model_code: bool = False,
) -> list[Path]:
    """Resolve every ``localPath`` (symlinks included) and check it stays inside a root.

    ``realpath`` follows every symlink that exists already, so a link planted inside the code
    dir that points elsewhere is caught, as is ``..`` and an absolute path outside the roots.
    The checks compare resolved strings: with ``pathlib`` comparisons they took 50 µs per file,
    most of a warm start of 256 files.
    """
    roots = _roots(code_dir, allowed_roots)
    root_names = [str(root) for root in roots]
    state_dir = os.path.join(code_dir, STATE_DIR_NAME)
    model_code = os.path.join(code_dir, MODEL_CODE)
    targets: list[str] = []
    seen: dict[str, int] = {}
    parents: dict[str, str] = {}
    for index, item in enumerate(data.files):
        raw = Path(os.path.expanduser(item.local_path))
        target = _realpath(str(raw if raw.is_absolute() else code_dir / raw), parents)
        if not any(_is_within(target, root) for root in root_names):
            allowed = ", ".join(root_names)
            raise ConfigError(
                f"{_field(source, index, item.local_path)} resolves to {target}, outside the code "
                f"dir; use a path under {allowed} or add its root to LAZY_LOADING_ALLOWED_ROOTS"
            )
        if target == state_dir or _is_within(target, state_dir):
            raise ConfigError(f"{_field(source, index, item.local_path)} points into "
                              f"{STATE_DIR_NAME}/, which this package owns")
        if target == model_code and not replace_model_code:
            raise ConfigError(f"{_field(source, index, item.local_path)} would replace the "
                              f"model's own {MODEL_CODE}; set LAZY_LOADING_REPLACE_MODEL_CODE=true "
                              "if that is what you want")
        if os.path.isdir(target):
            raise ConfigError(f"{_field(source, index, item.local_path)} resolves to an existing "
                              f"directory {target}; name a file")
        if target in seen:
            raise ConfigError(
                f"{_field(source, index, item.local_path)} resolves to the same file as "
                f"files[{seen[target]}]; each file needs its own localPath"
            )
        seen[target] = index
        targets.append(target)
    clear: set[str] = set()  # directories no target is, with all their parents
    for target in targets:
        parent = os.path.dirname(target)
        while parent not in clear:
            if parent in seen:
                raise ConfigError(
                    f"{source}: " * bool(source)
                    + f"files[{seen[parent]}].localPath is a file but files[{seen[target]}] "
                    "needs it to be a directory"
                )
            clear.add(parent)
            above = os.path.dirname(parent)
            if above == parent:
                break
            parent = above
    return [Path(target) for target in targets]


def _field(source: str, index: int, local_path: str) -> str:
    return f"{source}: " * bool(source) + f"files[{index}].localPath {local_path!r}"


def _is_within(path: str, root: str) -> bool:
    """``path`` is below ``root``; both resolved, so a prefix up to a separator says it."""
    return path != root and path.startswith(root if root.endswith(os.sep) else root + os.sep)


def _realpath(path: str, parents: dict[str, str]) -> str:
    """``os.path.realpath``, resolving each distinct parent directory once: many files share a
    few directories, and resolving walks (``lstat``) every component of the path. ``path`` is
    normalised (``pathlib``'s form: no empty or ``.`` components, no trailing separator)."""
    directory, name = os.path.split(path)
    if name in ("", ".."):  # the root, or a name that climbs: nothing to share
        return os.path.realpath(path)
    parent = parents.get(directory)
    if parent is None:
        parent = parents[directory] = os.path.realpath(directory)
    joined = os.path.join(parent, name)
    try:
        if not stat.S_ISLNK(os.lstat(joined).st_mode):
            return joined
    except OSError:
        return joined  # not there yet: nothing to follow
    return os.path.realpath(joined)


def place_targets(targets: list[Path], code_dir: Path, allowed_roots: Sequence[Path] = ()
                  ) -> list[tuple[Path, str]]:
    """Each target's root (the code dir, or the allowed root holding it), which it must stay
    in, and its name for messages (relative to the code dir when inside it)."""
    roots = [(root, str(root)) for root in _roots(code_dir, allowed_roots)]
    inside = os.path.join(code_dir, "")
    placed = []
    for target in targets:
        name = str(target)
        root = next(root for root, root_name in roots if _is_within(name, root_name))
        placed.append((root, name[len(inside):] if name.startswith(inside) else name))
    return placed


def prepare_state_dir(code_dir: Path) -> Path:
    """Create ``.lazy_loading`` and its subdirectories as real directories inside the code dir.

    A symlink there (planted, or left by an image) would put manifests and locks, and every
    write and delete that follows, wherever it points: refuse it, with the fix.
    """
    state = code_dir / STATE_DIR_NAME
    code_dir.mkdir(parents=True, exist_ok=True)
    for directory in (state, *(state / sub for sub in STATE_SUBDIRS)):
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, 0o755)
        st = os.lstat(directory)
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
            raise ConfigError(f"{directory} is {kind}; lazy loading keeps its state only in a "
                              "real directory inside the code dir: remove it")
    if os.path.realpath(state) != str(state):
        raise ConfigError(f"{state} resolves outside the code dir; remove the link on its way")
    return state
