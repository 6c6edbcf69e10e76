"""Processes the tests start: stop whole process groups, and find any the suite left behind.

pytest makes itself a child subreaper (``PR_SET_CHILD_SUBREAPER``), so a grandchild whose parent
died (a gunicorn orphaned by a killed demo, say) is re-parented to pytest instead of init, and
the session-end check still sees it as ours.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state) from ``/proc/<pid>/stat``; None once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[0].decode()


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:160]
    except OSError:
        return "?"


def live_descendants(root: int | None = None) -> dict[int, str]:
    """Every live (not zombie) process below ``root`` (default: this one), with its command."""
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None and stat[1] != "Z":
            children.setdefault(stat[0], []).append(int(entry))
    found: dict[int, str] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found[pid] = _cmdline(pid)
        todo.extend(children.get(pid, []))
    return found


def reap_zombies() -> None:
    """Collect exited orphans that were re-parented to us (we are their subreaper)."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def stop_group(proc: subprocess.Popen[bytes] | subprocess.Popen[str], grace: float = 20.0) -> None:
    """SIGTERM a process started with ``start_new_session=True``, wait, then SIGKILL whatever
    is left of its group (workers included), so nothing outlives the test, failed or not."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait(10)


def kill_leftovers(grace: float = 5.0) -> dict[int, str]:
    """Wait up to ``grace`` for our descendants to exit; SIGKILL and return those that do not."""
    deadline = time.monotonic() + grace
    while (left := live_descendants()) and time.monotonic() < deadline:
        reap_zombies()
        time.sleep(0.1)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    reap_zombies()
    return left
