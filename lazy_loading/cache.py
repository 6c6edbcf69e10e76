"""What this package remembers on disk under ``<code_dir>/.lazy_loading/``.

* the ``user.lazy_loading.record`` attribute of each file we published, or ``manifest/<id>.json``
  where the filesystem has no user attributes — what we published there (ETag, size, checksum,
  mtime), so a restart or a second worker can trust an intact local copy instead of fetching it
  again.
* ``journal/<id>.log`` — completed ranges of an unfinished multi-part file, so a process killed
  mid-download resumes with only the missing ranges.
* ``locks/targets.lock`` — one byte-range lock per target in one shared file (``locks/<id>.lock``
  per target where the platform has no open-file-description locks): the single-flight between
  processes on one host.

All writes are unique-temp-then-``os.replace``; readers never see a torn JSON document.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import itertools
import json
import logging
import os
import stat
import struct
import sys
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .s3io import RemoteObject

logger = logging.getLogger("lazy_loading")

MANIFEST_VERSION = 1
RECORD_ATTRIBUTE = "user.lazy_loading.record"  # the manifest record on a published file
MANIFEST_DIR, JOURNAL_DIR, LOCKS_DIR = "manifest", "journal", "locks"
RECORD_SUFFIX, JOURNAL_SUFFIX = ".json", ".log"  # after the target's id, in those dirs
STATE_SUBDIRS = (MANIFEST_DIR, JOURNAL_DIR, LOCKS_DIR)


@functools.lru_cache(maxsize=8192)
def target_id(target: Path) -> str:
    """A target's name in the state dirs (its lock, record, journal); asked several times per
    file, so remembered."""
    return hashlib.sha256(os.fsencode(target)).hexdigest()[:24]


def write_atomic(path: Path, data: bytes, durable: bool = False) -> None:
    """Unique temp file, then ``os.replace``. Not fsynced unless ``durable``: a record lost in a
    power cut only costs a re-download, and fsyncs per record would dominate small files."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


_TEMP_NAME_KEEP = 40  # of the target's name, for a reader; the id keeps temp names unique


def _temp_prefix(target: Path) -> str:
    return f".{target.name[:_TEMP_NAME_KEEP]}.{target_id(target)[:12]}."


def temp_path(target: Path) -> Path:
    """A unique temp file beside ``target`` whose name stays short whatever the target's length
    (a long name plus a suffix would exceed NAME_MAX)."""
    return target.parent / f"{_temp_prefix(target)}{_process_tag}{next(_temp_count):x}.partial"


def _tag_this_process() -> None:
    """The pid and a random token, read once per process (and again in a forked child): a temp
    name per file then costs no system call (``getpid`` and ``getrandom`` each released the
    GIL once per file)."""
    global _process_tag
    _process_tag = f"{os.getpid()}-{os.urandom(4).hex()}-"


_process_tag = ""
_temp_count = itertools.count()
_tag_this_process()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_tag_this_process)


class DebrisIndex:
    """What earlier, dead attempts left behind, found with one listing per directory per run.

    Looking per file (a listing of the target's directory, two globs of the state dirs) made a
    download of N small files in one directory read O(N^2) names. A listing taken once is as
    good: a temp file is removed only by a process holding its target's lock, and any temp file
    of that target that existed at the listing then belongs to a writer that has since finished
    (its name is gone: the unlink is a no-op) or died (debris).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listings: dict[str, dict[str, list[str]]] = {}

    def _grouped(self, key: str, list_names: Any, group_of: Any) -> dict[str, list[str]]:
        # Read without the lock once listed: every I/O thread asks for every file, and a lock
        # taken each time made them queue behind whichever holder the GIL had paused.
        grouped = self._listings.get(key)
        if grouped is not None:
            return grouped
        with self._lock:
            grouped = self._listings.get(key)
            if grouped is None:
                grouped = {}
                try:
                    names = list_names()
                except FileNotFoundError:
                    names = []
                for name in names:
                    group = group_of(name)
                    if group is not None:
                        grouped.setdefault(group, []).append(name)
                self._listings[key] = grouped
            return grouped

    def temp_names(self, target: Path, dir_fd: int) -> list[str]:
        """Temp files of ``target`` beside it, in the directory open as ``dir_fd`` (matched by
        name, not glob: a target name may contain ``[`` or ``*``)."""
        grouped = self._grouped(f"dir:{target.parent}", lambda: os.listdir(dir_fd),
                                _temp_group)
        return grouped.get(_temp_prefix(target), [])

    def remove_stale_records(self, state_dir: Path, target: Path) -> None:
        """Remove the temp files a killed writer of ``target``'s records left behind (call it
        holding the target's lock: every writer of a target's records holds it)."""
        name = target_id(target)
        for directory, suffix in _record_dirs(state_dir):
            grouped = self._grouped(f"records:{directory}", lambda d=directory: os.listdir(d),
                                    _record_temp_group)
            # Usually there is no debris at all: no path is built for each file then.
            for stale in grouped.get(f"{name}{suffix}", []) if grouped else []:
                with contextlib.suppress(OSError):
                    (directory / stale).unlink()


@functools.lru_cache(maxsize=64)
def _record_dirs(state_dir: Path) -> tuple[tuple[Path, str], ...]:
    """The state dirs holding a target's records, and each record's suffix after the target's
    id (``Manifest.path``, ``ResumeJournal.path_for``)."""
    return ((state_dir / MANIFEST_DIR, RECORD_SUFFIX), (state_dir / JOURNAL_DIR, JOURNAL_SUFFIX))


def _temp_group(name: str) -> str | None:
    """``.<name>.<id>.<pid>-<rand>.partial`` -> ``.<name>.<id>.`` (``temp_path``'s prefix)."""
    if not name.endswith(".partial"):
        return None
    cut = name.rfind(".", 0, len(name) - len(".partial"))
    return name[:cut + 1] if cut > 0 else None


def _record_temp_group(name: str) -> str | None:
    """``.<record>.<pid>.<rand>.tmp`` -> ``<record>`` (``write_atomic``'s temp names)."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return None
    parts = name[1:-len(".tmp")].rsplit(".", 2)
    return parts[0] if len(parts) == 3 else None


def write_json_atomic(path: Path, payload: Any, durable: bool = False) -> None:
    write_atomic(path, json.dumps(payload, sort_keys=True).encode(), durable)


def _read_json(path: Path) -> Any:
    try:
        with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        logger.warning("ignoring unreadable %s", path)
        return None


@dataclass(frozen=True)
class ManifestEntry:
    endpoint: str
    bucket: str
    key: str
    etag: str
    size: int
    mtime_ns: int
    version_id: str | None = None
    checksum: tuple[str, str] | None = None
    sha256: str | None = None
    published_at: float = 0.0

    def matches(self, remote: RemoteObject) -> bool:
        return (self.endpoint, self.bucket, self.key, self.etag, self.size) == (
            remote.endpoint, remote.bucket, remote.key, remote.etag, remote.size
        )

    def matches_entry(self, other: ManifestEntry) -> bool:
        return (self.endpoint, self.bucket, self.key, self.etag, self.size) == (
            other.endpoint, other.bucket, other.key, other.etag, other.size)

    def intact(self, target: Path) -> bool:
        """Cheap integrity check: still the regular file we published (not a symlink put in
        its place), with the same size and mtime."""
        try:
            st = os.lstat(target)
        except OSError:
            return False
        return (stat.S_ISREG(st.st_mode) and st.st_size == self.size
                and st.st_mtime_ns == self.mtime_ns)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ManifestEntry:
        checksum = raw.get("checksum")
        return cls(**{**raw, "checksum": tuple(checksum) if checksum else None})


_ENTRY_FIELDS = tuple(field.name for field in fields(ManifestEntry))


class Manifest:
    """The record of published files: one small JSON document per target.

    Where the filesystem allows, the document is an extended attribute of the published file
    itself, set through the temp file's descriptor before the rename (``attach``): the file and
    its record are published by one rename, and no inode is created for the record (creating
    one cost about a sixth of a 256-small-file download). Otherwise (a filesystem without user
    attributes, a record written after the fact, a link to the node cache's inode, which
    carries the cache's own record), one file per target under ``manifest/``: O(1) to write and
    free of read-merge-write contention, since the per-target lock serializes its writers.
    """

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / MANIFEST_DIR

    def path(self, target: Path) -> Path:
        return self.dir / f"{target_id(target)}{RECORD_SUFFIX}"

    def lookup(self, target: Path) -> ManifestEntry | None:
        """The record of ``target``: its own attribute first, then its record file. Whichever
        is found must name this very target (a hard link shares its attribute)."""
        try:
            attached = json.loads(os.getxattr(target, RECORD_ATTRIBUTE, follow_symlinks=False))
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return None  # no file there: a record would vouch for nothing
            attached = None
        except (ValueError, AttributeError):  # AttributeError: no xattrs (macOS)
            attached = None
        return self._entry(attached, target) or self._entry(_read_json(self.path(target)),
                                                            target)

    @staticmethod
    def _entry(raw: Any, target: Path) -> ManifestEntry | None:
        if not isinstance(raw, dict) or raw.get("version") != MANIFEST_VERSION \
                or raw.get("target") != str(target):
            return None
        try:
            return ManifestEntry.from_json(raw["entry"])
        except (KeyError, TypeError, ValueError):
            return None

    @staticmethod
    def _document(target: Path, entry: ManifestEntry) -> dict[str, Any]:
        # Field by field: ``asdict`` deep-copies each one (15 µs per record in a loop).
        return {"version": MANIFEST_VERSION, "target": str(target),
                "entry": {name: getattr(entry, name) for name in _ENTRY_FIELDS}}

    def attach(self, fd: int, target: Path, entry: ManifestEntry) -> bool:
        """Record ``entry`` on the temp file (open as ``fd``) that is about to be renamed onto
        ``target``. False when the filesystem refuses: the caller then uses ``record``."""
        try:
            os.setxattr(fd, RECORD_ATTRIBUTE, json.dumps(self._document(target, entry),
                                                         separators=(",", ":")).encode())
        except (OSError, AttributeError):  # AttributeError: no xattrs (macOS)
            return False
        return True

    def record(self, target: Path, entry: ManifestEntry | None, durable: bool = False) -> None:
        """Publish (or with ``None`` forget) the record file of one target, atomically. Forget
        only a target already removed: an attribute goes with its file."""
        if entry is None:
            with contextlib.suppress(FileNotFoundError):
                self.path(target).unlink()
            return
        write_json_atomic(self.path(target), self._document(target, entry), durable=durable)


class ResumeJournal:
    """Completed ranges of one unfinished file, bound to the object version they came from.

    Stored as a JSON header line followed by one line per finished part, each appended with a
    single ``write``: no temp-and-rename per part, and a torn last line is ignored on resume.
    """

    def __init__(self, state_dir: Path, target: Path, remote: RemoteObject, part_size: int,
                 temp: Path, crc_algorithm: str | None, done: set[int] | None = None,
                 crcs: dict[int, int] | None = None, durable: bool = False,
                 parts_trusted: bool = True) -> None:
        self.path = self.path_for(state_dir, target)
        self.crc_algorithm = crc_algorithm  # of every part's CRC, checked again on resume
        self.durable = durable
        # Without CRCs, the parts of a journal from this boot, or synced: a power cut can leave
        # a record on disk while its part's bytes are not (zeros in their place).
        self.parts_trusted = parts_trusted
        self.target = target
        self.remote = remote
        self.part_size = part_size
        self.temp = temp
        self.done: set[int] = set(done or ())
        self.crcs: dict[int, int] = dict(crcs or {})
        self._lock = threading.Lock()
        self._fd = -1

    @staticmethod
    def path_for(state_dir: Path, target: Path) -> Path:
        return state_dir / JOURNAL_DIR / f"{target_id(target)}{JOURNAL_SUFFIX}"

    def _identity(self) -> dict[str, Any]:
        r = self.remote
        return {"target": str(self.target), "endpoint": r.endpoint, "bucket": r.bucket,
                "key": r.key, "etag": r.etag, "size": r.size, "part_size": self.part_size,
                "crc": self.crc_algorithm}

    @staticmethod
    def read(path: Path) -> tuple[dict[str, Any], set[int], dict[int, int]] | None:
        """Header, finished part indexes and their CRCs (when known) of a journal file."""
        try:
            lines = path.read_text(encoding="utf-8").split("\n")
            header = json.loads(lines[0])
        except (OSError, ValueError, IndexError):
            return None
        if not isinstance(header, dict):
            return None
        done: set[int] = set()
        crcs: dict[int, int] = {}
        for line in lines[1:]:
            fields = line.split()
            if not fields or not all(f.isdigit() for f in fields) or len(fields) > 2:
                continue  # a torn last line
            done.add(int(fields[0]))
            if len(fields) == 2:
                crcs[int(fields[0])] = int(fields[1])
        return header, done, crcs

    @classmethod
    def resume(cls, state_dir: Path, target: Path, remote: RemoteObject, part_size: int,
               crc_algorithm: str | None, durable: bool = False) -> ResumeJournal | None:
        """The journal of an earlier, dead attempt at the same object version, if usable."""
        probe = cls(state_dir, target, remote, part_size, temp=target,
                    crc_algorithm=crc_algorithm)
        found = cls.read(probe.path)
        if found is None:
            return None
        header, done, crcs = found
        temp = Path(str(header.get("temp", "")))
        same = all(header.get(k) == v for k, v in probe._identity().items())
        if not same or temp.parent != target.parent:
            return None
        try:
            st = os.lstat(temp)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode) or st.st_size != remote.size:
            return None
        boot = boot_id()
        trusted = header.get("durable") is True or (boot is not None and header.get("boot") == boot)
        return cls(state_dir, target, remote, part_size, temp=temp, crc_algorithm=crc_algorithm,
                   done=done, crcs=crcs, durable=durable, parts_trusted=trusted)

    def start(self) -> None:
        """(Re)write the header and the parts done so far, then append from here on."""
        with self._lock:
            self._close()
            header = json.dumps({**self._identity(), "temp": str(self.temp),
                                 "started": time.time(), "boot": boot_id(),
                                 "durable": self.durable}, sort_keys=True)
            body = "".join(self._line(i) for i in sorted(self.done))
            write_atomic(self.path, f"{header}\n{body}".encode())
            self._fd = os.open(self.path,
                               os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW)

    def _line(self, index: int) -> str:
        crc = self.crcs.get(index)
        return f"{index}\n" if crc is None else f"{index} {crc}\n"

    def mark_done(self, index: int, crc: int | None = None) -> None:
        """Record a finished part. With ``durable`` the caller has synced the part's data
        already, and the record is synced too: never a record on disk before its data."""
        with self._lock:
            self.done.add(index)
            if crc is not None:
                self.crcs[index] = crc
            if self._fd >= 0:
                os.write(self._fd, self._line(index).encode())
                if self.durable:
                    os.fdatasync(self._fd)

    def forget(self, indexes: set[int]) -> None:
        """Parts whose bytes on disk failed their check: they are fetched again."""
        with self._lock:
            self.done -= indexes
            for index in indexes:
                self.crcs.pop(index, None)

    def adopt(self, temp: Path, dir_fd: int) -> None:
        """Move the earlier attempt's temp file to our own name (both in the directory open as
        ``dir_fd``), then record it."""
        os.replace(self.temp.name, temp.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        self.temp = temp
        self.start()

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def remove(self) -> None:
        with self._lock:
            self._close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@functools.lru_cache(maxsize=1)
def boot_id() -> str | None:
    """This boot of the machine (Linux), for telling a journal written before a restart."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            return fh.read().strip() or None
    except OSError:
        return None


# Open-file-description locks (Linux >= 3.15), with the 64-bit ``struct flock`` layout.
_OFD_SETLK: int | None = (getattr(fcntl, "F_OFD_SETLK", None)
                          if sys.platform == "linux" and struct.calcsize("P") == 8 else None)
SHARED_LOCK_FILE = "targets.lock"


def open_lock_file(path: Path) -> int:
    """The descriptor of a lock file, never following a symlink planted where it lives, and
    never truncating it."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
    os.unlink(path)
    return os.open(path, flags | os.O_EXCL, 0o644)


class TargetLock:
    """An exclusive lock on one target, across processes and across threads of one process.

    Where the platform has them, a one-byte open-file-description lock in the state dir's one
    shared lock file, at an offset named by the target: a cold start then creates no inode per
    file for its locks (creating one cost about an eighth of a 256-small-file download). An
    OFD lock, unlike ``lockf``'s, belongs to its descriptor, so two threads of one process
    exclude each other, and it dies with the descriptor. Elsewhere, a ``flock`` on one file per
    target. Written by hand rather than taken from ``filelock``: per file that library cost
    about 20% of the GIL time of a 256-small-file download (its re-entrancy levels, fork
    tracking and thread-locals), and the engine needs only try-lock and release.
    """

    def __init__(self, path: Path, offset: int | None = None) -> None:
        self.path = path
        self._offset = offset  # None: the whole file is this target's lock
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock if it is free now; never waits."""
        if self._fd is not None:
            return True
        fd = open_lock_file(self.path)
        try:
            if self._offset is None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:
                assert _OFD_SETLK is not None
                fcntl.fcntl(fd, _OFD_SETLK,
                            struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, self._offset, 1, 0))
        except (BlockingIOError, PermissionError):  # held elsewhere (EAGAIN, or EACCES)
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the only descriptor releases either kind of lock


def target_lock(state_dir: Path, target: Path) -> TargetLock:
    """Usable from any thread of the process (not thread-local)."""
    name = target_id(target)
    if _OFD_SETLK is None:
        return TargetLock(state_dir / LOCKS_DIR / f"{name}.lock")
    # 60 bits of the target's id: a shared byte between two targets of one code dir would only
    # make one wait for the other.
    return TargetLock(_shared_lock_file(state_dir), offset=int(name[:15], 16))


@functools.lru_cache(maxsize=64)
def _shared_lock_file(state_dir: Path) -> Path:
    return state_dir / LOCKS_DIR / SHARED_LOCK_FILE
