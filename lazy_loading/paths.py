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


def _is_within(path: Path, root: Path) -> bool:
    return path != root and path.is_relative_to(root)


def resolve_targets(
    data: LazyLoadingData, code_dir: Path, allowed_roots: Sequence[Path] = (), source: str = "",
    replace_model_code: bool = False,
) -> list[Path]:
    """Resolve every ``localPath`` (symlinks included) and check it stays inside a root.

    ``realpath`` follows every symlink that exists already, so a link planted inside the code
    dir that points elsewhere is caught, as is ``..`` and an absolute path outside the roots.
    """
    roots = _roots(code_dir, allowed_roots)
    state_dir = code_dir / STATE_DIR_NAME
    targets: list[Path] = []
    seen: dict[Path, int] = {}
    parents: dict[Path, str] = {}
    for index, item in enumerate(data.files):
        raw = Path(os.path.expanduser(item.local_path))
        joined = raw if raw.is_absolute() else code_dir / raw
        target = Path(_realpath(joined, parents))
        field = f"{source}: " * bool(source) + f"files[{index}].localPath {item.local_path!r}"
        if not any(_is_within(target, root) for root in roots):
            allowed = ", ".join(str(r) for r in roots)
            raise ConfigError(
                f"{field} resolves to {target}, outside the code dir; use a path under {allowed} "
                "or add its root to LAZY_LOADING_ALLOWED_ROOTS"
            )
        if target == state_dir or target.is_relative_to(state_dir):
            raise ConfigError(f"{field} points into {STATE_DIR_NAME}/, which this package owns")
        if target == code_dir / MODEL_CODE and not replace_model_code:
            raise ConfigError(f"{field} would replace the model's own {MODEL_CODE}; set "
                              "LAZY_LOADING_REPLACE_MODEL_CODE=true if that is what you want")
        if target.is_dir():
            raise ConfigError(f"{field} resolves to an existing directory {target}; name a file")
        if target in seen:
            raise ConfigError(
                f"{field} resolves to the same file as files[{seen[target]}]; each file needs "
                "its own localPath"
            )
        seen[target] = index
        targets.append(target)
    for target in targets:
        for parent in target.parents:
            if parent in seen:
                raise ConfigError(
                    f"{source}: " * bool(source)
                    + f"files[{seen[parent]}].localPath is a file but files[{seen[target]}] "
                    "needs it to be a directory"
                )
    return targets


def _realpath(path: Path, parents: dict[Path, str]) -> str:
    """``os.path.realpath``, resolving each distinct parent directory once: many files share a
    few directories, and resolving walks (``lstat``) every component of the path."""
    name = path.name
    if name in ("", ".."):  # the root, or a name that climbs: nothing to share
        return os.path.realpath(path)
    parent = parents.get(path.parent)
    if parent is None:
        parent = parents[path.parent] = os.path.realpath(path.parent)
    joined = os.path.join(parent, name)
    try:
        if not stat.S_ISLNK(os.lstat(joined).st_mode):
            return joined
    except OSError:
        return joined  # not there yet: nothing to follow
    return os.path.realpath(joined)


def root_of(target: Path, code_dir: Path, allowed_roots: Sequence[Path] = ()) -> Path:
    """The root ``target`` must stay in (the code dir, or the allowed root holding it)."""
    return next(root for root in _roots(code_dir, allowed_roots) if _is_within(target, root))


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
