"""One readiness state per process: download, then load the model, then serve.

Every adapter (Flask, FastAPI, Gunicorn hooks, the CLI) goes through the same ``ReadinessState``
so a download done by ``post_fork`` is not repeated by the app, and ``/health/`` tells one story.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import platform
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

from lazy_loading import LazyLoadingError, LazyLoadingHandler, bridge

from . import metrics
from .contract import DRUM_COMPAT_VERSION, TARGET_TYPE
from .model import ModelHooks
from .settings import ReadinessMode, ServerSettings
from .stats import PredictionTimes

logger = logging.getLogger("drum_servers")

BACKGROUND_STOP_SECONDS = 10.0


class Phase(str, Enum):
    STARTING = "starting"
    DOWNLOADING = "downloading"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class ModelNotReady(Exception):
    """Raised to the web layer when a prediction arrives before the model is loaded."""


class ReadinessState:
    """Owns the handler, the model, and the phase of this process."""

    def __init__(self, settings: ServerSettings, environ: Mapping[str, str] | None = None,
                 handler: LazyLoadingHandler | None = None) -> None:
        self.settings = settings
        self.code_dir = Path(os.path.realpath(settings.code_dir))
        self.handler = handler or LazyLoadingHandler(code_dir=self.code_dir, environ=environ)
        self.phase = Phase.STARTING
        self.error: str | None = None
        self.model: Any = None
        self.hooks: ModelHooks | None = None
        self.pid = os.getpid()
        self.server_name = "flask"  # the FastAPI adapter says "fastapi"
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._ready_after: float | None = None
        self._background: threading.Thread | None = None
        self.prediction_times = PredictionTimes()
        self._background_run: tuple[asyncio.AbstractEventLoop, asyncio.Task[Any]] | None = None
        self._background_stopped = False
        self._background_lock = threading.Lock()
        if _error_to_serve is not None and settings.with_error_server:  # the master's failure
            self.error, self.phase = _error_to_serve, Phase.FAILED

    @property
    def mode(self) -> ReadinessMode:
        return self.settings.mode

    @property
    def ready(self) -> bool:
        return self.phase is Phase.READY

    # ----------------------------------------------------------------- steps
    def download(self) -> None:
        """Make every artifact present (a no-op once done in this process or, for a forked
        worker, once done by its master with every file still intact)."""
        if not self._needs_download():
            return
        results = self.handler.download_lazy_loading_files()
        metrics.record_download(results, self.handler.progress())

    async def download_async(self) -> None:
        if not self._needs_download():
            return
        results = await self.handler.download_lazy_loading_files_async()
        metrics.record_download(results, self.handler.progress())

    def _needs_download(self) -> bool:
        if self.handler.results is not None or self.handler.adopt_parent_download():
            return False
        ModelHooks.check(self.code_dir)
        if self.handler.is_lazy_loading_available:
            self._set(Phase.DOWNLOADING)
        return True

    def load_model(self) -> None:
        """Run the user's ``init`` and ``load_model`` exactly once per process."""
        with self._lock:
            if self.phase is Phase.READY:
                return
            self._set(Phase.LOADING)
            hooks = ModelHooks.load(self.code_dir, self.settings.max_concurrent_predictions)
            hooks.init()
            self.model = hooks.load_model()
            self.hooks = hooks
            self._ready_after = time.monotonic() - self._started
            self._set(Phase.READY)
            self._mark_ready()
        logger.info("model ready in %.2f s (pid %d)", self._ready_after, os.getpid())

    def prepare(self) -> None:
        """Blocking path: download, then load (sync servers and worker hooks)."""
        if self.ready:
            return
        self.download()
        self.load_model()

    async def prepare_async(self) -> None:
        """Async path: await the download, load the model off the event loop."""
        import anyio.to_thread

        if self.ready:
            return
        await self.download_async()
        await anyio.to_thread.run_sync(self.load_model)

    @property
    def serving_error(self) -> str | None:
        """The start-up error answered with 513 on DRUM's routes (``WITH_ERROR_SERVER``)."""
        if self.settings.with_error_server and self.phase is Phase.FAILED:
            return self.error
        return None

    def fail_or_serve_error(self, exc: BaseException) -> bool:
        """Record a start-up failure; ``True`` when the server should keep running to report
        it (``WITH_ERROR_SERVER``, DRUM's ``--with-error-server``), else the caller stops."""
        global _error_to_serve
        self.fail(exc)
        if not self.settings.with_error_server:
            return False
        _error_to_serve = self.error
        if isinstance(exc, LazyLoadingError):
            logger.error("%s", self.error)
        else:
            logger.error("model failed to load", exc_info=exc)
        logger.error("serving this error with 513 on every prediction route (WITH_ERROR_SERVER)")
        return True

    def fail(self, exc: BaseException) -> None:
        self.error = str(exc) if isinstance(exc, LazyLoadingError) else f"{type(exc).__name__}: {exc}"
        self._set(Phase.FAILED)

    def _set(self, phase: Phase) -> None:
        if phase is not self.phase:
            logger.info("%s -> %s", self.phase.value, phase.value)
        self.phase = phase
        metrics.set_ready(phase is Phase.READY)

    # ----------------------------------------------------------------- background mode
    def start_background_thread(self) -> None:
        """Background mode for threaded servers: prepare in a thread, exit the process on failure."""
        if self._background is not None or self.ready:
            return

        def run() -> None:
            try:
                bridge.run_sync(self._prepare_until_stopped)
            except asyncio.CancelledError:
                logger.info("background download stopped")
            except BaseException as exc:
                self.fail_and_exit(exc)

        self._background = threading.Thread(target=run, name="drum-servers-prepare", daemon=True)
        self._background.start()

    async def _prepare_until_stopped(self) -> None:
        with self._background_lock:
            if self._background_stopped:
                raise asyncio.CancelledError
            task = asyncio.current_task()
            assert task is not None
            self._background_run = (asyncio.get_running_loop(), task)
        await self.prepare_async()

    def stop_background(self, timeout: float = BACKGROUND_STOP_SECONDS) -> None:
        """Cancel a background download and wait for its cleanup: a worker exiting mid-download
        (a daemon thread dies with the interpreter) would leave its temp files behind."""
        with self._background_lock:
            self._background_stopped = True
            run = self._background_run
        if self._background is None or not self._background.is_alive():
            return
        if run is not None:
            loop, task = run
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(task.cancel)
        self._background.join(timeout)

    def fail_and_exit(self, exc: BaseException) -> None:
        """Background failure: one clear line, ``/health/`` shows it briefly, then exit non-zero.

        Exit code 3 is gunicorn's "worker failed to boot", which stops the whole server instead
        of respawning a worker that would fail the same way; the orchestrator then restarts it.
        """
        if self.fail_or_serve_error(exc):
            return
        if isinstance(exc, LazyLoadingError):
            logger.error("%s", self.error)
        else:
            logger.error("model failed to load", exc_info=exc)
        delay = self.settings.failure_exit_delay
        logger.error("exiting in %.0f s", delay)
        timer = threading.Timer(delay, os._exit, (3,))
        timer.daemon = True
        timer.start()

    # ----------------------------------------------------------------- sibling workers
    def _mark_ready(self) -> None:
        siblings = _siblings_dir
        if siblings is None or self.settings.workers <= 1:
            return
        try:
            (siblings / str(os.getpid())).touch()
        except OSError as exc:
            logger.error("cannot record this worker as ready in %s (%s): /health/ will answer "
                         "503 until it can", siblings, exc.strerror)

    def workers_ready(self) -> int:
        """Live sibling workers (this one included) whose model is loaded."""
        if _siblings_dir is None:
            return 1 if self.ready else 0
        try:
            names = os.listdir(_siblings_dir)
        except OSError:
            return 0
        return sum(1 for name in names if name.isdigit() and _alive(int(name)))

    # ----------------------------------------------------------------- views
    def health(self) -> tuple[int, dict[str, Any]]:
        """Ready when this process is, and, under several workers, when all of them are: a
        balancer that saw 200 must not then meet a sibling worker still loading."""
        if self.ready:
            expected = self.settings.workers if _siblings_dir is not None else 1
            if expected <= 1:
                return 200, {"status": "ready"}
            ready = self.workers_ready()
            if ready >= expected:
                return 200, {"status": "ready"}
            return 503, {"status": "loading", "workers_ready": ready, "workers": expected}
        body: dict[str, Any] = {"status": self.phase.value}
        body["progress"] = self.handler.progress().as_dict()
        if self.error:
            body["error"] = self.error
        return 503, body

    def info(self) -> dict[str, Any]:
        """DRUM's ``/info/``; what else we know (artifacts, pid, versions) only with
        ``INFO_DETAILS``, since ``/info/`` answers anyone who can reach the port."""
        body: dict[str, Any] = {
            "codeDir": str(self.code_dir),
            "drumServer": self.server_name,
            "drumVersion": DRUM_COMPAT_VERSION,
            "language": "python",
            "modelMetadata": _model_metadata(self.code_dir),
            "predictor": None,
            "targetType": TARGET_TYPE,
        }
        if self.settings.info_details:
            body["drumServers"] = self._details()
        return body

    def _details(self) -> dict[str, Any]:
        from importlib.metadata import PackageNotFoundError, version

        def pkg(name: str) -> str | None:
            try:
                return version(name)
            except PackageNotFoundError:
                return None

        results = self.handler.results or []
        return {
            "status": self.phase.value,
            "mode": self.mode.value,
            "pid": os.getpid(),
            "readyAfterSeconds": (None if self._ready_after is None
                                  else round(self._ready_after, 3)),
            "artifacts": [r.as_dict() for r in results],
            "versions": {name: pkg(name) for name in ("drum-lazy-loading", "boto3", "flask",
                                                      "fastapi", "gunicorn", "uvicorn")}
            | {"python": platform.python_version()},
        }


def _model_metadata(code_dir: Path) -> Any:
    """``model-metadata.yaml`` as DRUM reads it for ``/info/`` (``None`` without one)."""
    import yaml

    path = code_dir / "model-metadata.yaml"
    try:
        with open(path, encoding="utf-8") as file:
            return yaml.safe_load(file)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        logger.warning("%s cannot be read: %s", path, type(exc).__name__)
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_state: ReadinessState | None = None
_state_lock = threading.Lock()

# Markers of this server instance's ready workers: a private directory the gunicorn master makes
# before forking, so a second server on the same code dir, or a read-only code dir, changes
# nothing. Without a gunicorn master there are no siblings to wait for.
_siblings_dir: Path | None = None

# A start-up failure being served (WITH_ERROR_SERVER): set in the gunicorn master, it reaches
# every worker through the fork.
_error_to_serve: str | None = None


def start_server_instance() -> None:
    """gunicorn's master, before any fork: a fresh directory for its workers' ready markers,
    removed when the master exits."""
    global _siblings_dir
    try:
        _siblings_dir = Path(tempfile.mkdtemp(prefix="drum-servers-ready-"))
    except OSError as exc:
        logger.error("cannot create a directory for worker readiness (%s); /health/ will "
                     "answer for each worker alone", exc.strerror)
        return
    master, made = os.getpid(), _siblings_dir

    def remove() -> None:
        if os.getpid() == master:
            shutil.rmtree(made, ignore_errors=True)

    atexit.register(remove)


def current_state(code_dir: str | os.PathLike[str] | None = None,
                  mode: ReadinessMode | str | None = None) -> ReadinessState:
    """The process's state, created on first use from the environment (new after a fork)."""
    global _state
    with _state_lock:
        wanted = Path(os.path.realpath(code_dir)) if code_dir is not None else None
        if _state is not None and wanted is not None and wanted != _state.code_dir:
            _state = None
        if _state is None:
            _state = ReadinessState(ServerSettings.from_environ(code_dir=code_dir, mode=mode))
        elif _state.pid != os.getpid():
            # A forked worker: fresh phase and model, but the master's handler (and with it the
            # download it verified) carries over.
            _state = ReadinessState(_state.settings, handler=_state.handler)
        return _state


def stop_background_download() -> None:
    """This process's background download, if any, cancelled and cleaned up (gunicorn's
    ``worker_exit``)."""
    state = _state
    if state is not None and state.pid == os.getpid():
        state.stop_background()


def reset_state() -> None:
    """Forget the process's state (tests and embedding)."""
    global _state, _error_to_serve
    with _state_lock:
        _state = None
        _error_to_serve = None
