"""A content store shared by every process and pod that mounts it (``LAZY_LOADING_CACHE_DIR``).

The engine fills the store exactly as it fills a code dir, so every guarantee carries over: one
fetch per object however many processes start together (the per-target lock), resumable
partials, ETag pinning, verification, atomic publish, no symlink followed. Each code dir then
receives its artifacts from the store:

* by **hard link** when both are on one filesystem: no byte is copied, and the link count tells
  eviction that a code dir still uses the object;
* else by a reflink (``FICLONE``) where the filesystem has it, else by a copy.

Stored objects are made read-only (0444) before the first link, and a link is made from the
descriptor that was checked (``/proc/self/fd``), so what lands in a code dir is the inode whose
size and mtime the store's manifest vouches for, and whose SHA-256 was re-computed when the
config names one. Anyone who can write the store is trusted: see docs/scaling.md.

Objects are named by what identifies them remotely (endpoint, bucket, key); which bytes they
hold is pinned by the store's manifest (ETag, size, mtime, digest). A new version of an object
replaces the store's file atomically, while code dirs linked to the old one keep its inode.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from .cache import Manifest, target_id
from .dirfd import open_dir
from .paths import STATE_DIR_NAME, prepare_state_dir
from .plan import FileTransfer

logger = logging.getLogger("lazy_loading")

OBJECTS_DIR = "objects"
PINS_DIR = "pins"  # under the store's state dir: link (shared) vs evict (exclusive)
USED_DIR = "used"  # one empty file per object, touched at each link: the LRU clock
_FICLONE = 0x40049409
_COPY_CHUNK = 8 * 1024 * 1024


class StoreUnusable(Exception):
    """The store cannot serve this download (unwritable, full): fall back to the code dir."""


class Tampered(Exception):
    """A stored object's bytes no longer match the configured SHA-256."""


@dataclass(frozen=True)
class NodeCache:
    root: Path
    max_bytes: int | None

    @property
    def state_dir(self) -> Path:
        return self.root / STATE_DIR_NAME

    @classmethod
    def open(cls, path: Path, max_bytes: int | None) -> NodeCache | None:
        """The store at ``path``, or ``None`` (with one warning) when it cannot be written."""
        root = Path(os.path.realpath(path))
        try:
            os.makedirs(root / OBJECTS_DIR, exist_ok=True)
            state = prepare_state_dir(root)
            for sub in (PINS_DIR, USED_DIR):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(state / sub, 0o755)
            probe = state / f".probe-{os.getpid()}-{secrets.token_hex(4)}"
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
            os.unlink(probe)
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            logger.warning("LAZY_LOADING_CACHE_DIR %s cannot be used (%s); downloading into "
                           "the code dir instead", path, reason)
            return None
        return cls(root, max_bytes)

    # ----------------------------------------------------------------- naming
    def object_path(self, transfer: FileTransfer) -> Path:
        repo = transfer.repository
        identity = "\0".join([repo.endpoint_url or f"aws:{repo.region or ''}",
                              repo.bucket_name, transfer.spec.remote_path])
        digest = hashlib.sha256(identity.encode()).hexdigest()
        return self.root / OBJECTS_DIR / digest[:2] / digest[2:40]

    def for_store(self, transfer: FileTransfer) -> FileTransfer:
        """The same artifact, aimed at the store instead of the code dir."""
        return replace(transfer, target=self.object_path(transfer), root=self.root)

    def is_local_failure(self, reason: str) -> bool:
        """A failure reason that names the store: its disk, not the object, is at fault."""
        return str(self.root) in reason

    # ----------------------------------------------------------------- links
    def link(self, stored: FileTransfer, target: FileTransfer, check_sha256: bool) -> str:
        """Make ``target`` the stored object (atomically replacing what was there); say how."""
        with self._pin(stored.target, exclusive=False):
            fd = os.open(stored.target, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise StoreUnusable(f"{stored.target} is not a regular file")
                if check_sha256 and target.spec.sha256:
                    _check_sha256(fd, target.spec.sha256, stored.target)
                if st.st_mode & 0o222:
                    os.fchmod(fd, 0o444)  # a code dir must never get a writable shared inode
                how = _place(fd, st, target)
            finally:
                os.close(fd)
        self._touch_used(stored.target)
        return how

    def forget(self, stored: FileTransfer) -> None:
        """Drop a stored object (found tampered) so the next fill fetches it again."""
        with self._pin(stored.target, exclusive=True):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stored.target)
            Manifest(self.state_dir).record(stored.target, None)

    # ----------------------------------------------------------------- eviction
    def evict(self, keep: set[Path]) -> int:
        """Remove least recently used objects until the store fits ``max_bytes``. Objects still
        linked from a code dir (link count > 1), objects being linked, and ``keep`` stay."""
        if self.max_bytes is None:
            return 0
        objects = list(self._objects())
        total = sum(st.st_size for _, st in objects)
        removed = 0
        candidates = sorted((p for p, st in objects if st.st_nlink == 1 and p not in keep),
                            key=self._last_used)
        for path in candidates:
            if total <= self.max_bytes:
                break
            with self._pin(path, exclusive=True, wait=False) as pinned:
                if not pinned:
                    continue  # being linked right now
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue
                if st.st_nlink != 1 or not stat.S_ISREG(st.st_mode):
                    continue
                os.unlink(path)
                Manifest(self.state_dir).record(path, None)
                total -= st.st_size
                removed += 1
                logger.info("node cache: evicted %s (%d bytes) to stay under %d bytes",
                            path.name, st.st_size, self.max_bytes)
        if total > self.max_bytes:
            logger.warning("node cache holds %d bytes, over LAZY_LOADING_CACHE_MAX_BYTES=%d: "
                           "everything else is in use", total, self.max_bytes)
        return removed

    def _objects(self) -> Iterator[tuple[Path, os.stat_result]]:
        base = self.root / OBJECTS_DIR
        for shard in sorted(os.listdir(base)):
            shard_dir = base / shard
            if not os.path.isdir(shard_dir) or os.path.islink(shard_dir):
                continue
            for name in os.listdir(shard_dir):
                if name.startswith("."):
                    continue  # a partial being written
                path = shard_dir / name
                with contextlib.suppress(FileNotFoundError):
                    st = os.lstat(path)
                    if stat.S_ISREG(st.st_mode):
                        yield path, st

    def _last_used(self, path: Path) -> float:
        try:
            return os.lstat(self.state_dir / USED_DIR / target_id(path)).st_mtime
        except OSError:
            return 0.0

    def _touch_used(self, path: Path) -> None:
        marker = self.state_dir / USED_DIR / target_id(path)
        with contextlib.suppress(OSError):
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            os.close(fd)
            os.utime(marker)

    @contextlib.contextmanager
    def _pin(self, path: Path, exclusive: bool, wait: bool = True) -> Iterator[bool]:
        lock_path = self.state_dir / PINS_DIR / f"{target_id(path)}.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            flags = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else
                                                                     fcntl.LOCK_NB)
            try:
                fcntl.flock(fd, flags)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)


def _check_sha256(fd: int, expected: str, path: Path) -> None:
    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, _COPY_CHUNK, offset):
        digest.update(chunk)
        offset += len(chunk)
    if digest.hexdigest() != expected.lower():
        raise Tampered(f"{path}: its bytes no longer match the configured sha256")


def _place(fd: int, st: os.stat_result, target: FileTransfer) -> str:
    """Link (or clone, or copy) the open stored object to a temp name beside the target, then
    rename it over the target: the target is its old content or the whole object, never half."""
    name = target.target.name
    dir_fd = open_dir(target.root, target.target.parent, create=True)
    try:
        with contextlib.suppress(FileNotFoundError):
            existing = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if (existing.st_dev, existing.st_ino) == (st.st_dev, st.st_ino):
                return "linked"
        temp = f".{name[:40]}.{os.getpid()}-{secrets.token_hex(4)}.partial"
        try:
            try:
                os.link(f"/proc/self/fd/{fd}", temp, dst_dir_fd=dir_fd, follow_symlinks=True)
                how = "linked"
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOENT,
                                     errno.EOPNOTSUPP, errno.EACCES):
                    raise
                how = _clone_or_copy(fd, st, temp, dir_fd)
            os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp, dir_fd=dir_fd)
            raise
        return how
    finally:
        os.close(dir_fd)


def _clone_or_copy(src: int, st: os.stat_result, temp: str, dir_fd: int) -> str:
    out = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                  0o444, dir_fd=dir_fd)
    try:
        try:
            fcntl.ioctl(out, _FICLONE, src)
            how = "cloned"
        except OSError:
            _copy(src, out, st.st_size)
            how = "copied"
        os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        os.close(out)
    return how


def _copy(src: int, out: int, size: int) -> None:
    """``copy_file_range`` (in the kernel), or plain reads and writes where it cannot."""
    offset = 0
    while offset < size:
        count = min(_COPY_CHUNK, size - offset)
        try:
            copied = os.copy_file_range(src, out, count, offset, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            chunk = os.pread(src, count, offset)
            copied = os.pwrite(out, chunk, offset) if chunk else 0
        if copied == 0:
            raise OSError(errno.EIO, "the stored object shrank while being copied")
        offset += copied
