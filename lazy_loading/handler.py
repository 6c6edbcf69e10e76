"""``LazyLoadingHandler``: DRUM's entry point, rebuilt on the verified parallel engine."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from . import bridge
from .cache import LOCKS_DIR, SHARED_LOCK_FILE, Manifest, open_lock_file
from .client import S3ClientFactory
from .config import (
    DATA_ENV,
    VALUES_FILE_ENV,
    LazyLoadingConfig,
    load_config,
    load_values_file,
    secret_env_name,
)
from .engine import FileResult, TransferEngine
from .environ import warn_about_environ
from .errors import ConfigError, DownloadError, LazyLoadingError
from .paths import (
    STATE_DIR_NAME,
    place_targets,
    prepare_state_dir,
    resolve_code_dir,
    resolve_targets,
)
from .plan import FileTransfer
from .progress import (
    DownloadState,
    ProgressCallback,
    ProgressSnapshot,
    ProgressTracker,
    format_bytes,
)
from .redact import one_line
from .settings import LazyLoadingSettings

if TYPE_CHECKING:
    from .nodecache import NodeCache

logger = logging.getLogger("lazy_loading")


class LazyLoadingHandler:
    """Reads DRUM's lazy-loading contract and makes every artifact present, verified, once.

    ``download_lazy_loading_files()`` is safe from sync code with or without a running event
    loop; inside a loop prefer ``await download_lazy_loading_files_async()``. After a success,
    later calls in the same process return at once.
    """

    def __init__(
        self,
        code_dir: str | os.PathLike[str] | None = None,
        environ: Mapping[str, str] | None = None,
        *,
        values_file: str | os.PathLike[str] | None = None,
        settings: LazyLoadingSettings | None = None,
        progress_callback: ProgressCallback | None = None,
    ) -> None:
        self._environ: Mapping[str, str] = os.environ if environ is None else environ
        self._code_dir_arg = code_dir
        self._values_file = values_file
        self._settings = settings
        self._tracker = ProgressTracker()
        if progress_callback is not None:
            self._tracker.subscribe(progress_callback)
        self._results: list[FileResult] | None = None
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"LazyLoadingHandler(code_dir={str(self.code_dir)!r})"

    # ----------------------------------------------------------------- inputs
    @property
    def code_dir(self) -> Path:
        return resolve_code_dir(self._code_dir_arg, self._environ)

    @property
    def state_dir(self) -> Path:
        return self.code_dir / STATE_DIR_NAME

    @property
    def is_lazy_loading_available(self) -> bool:
        return bool(
            self._values_file
            or self._environ.get(VALUES_FILE_ENV)
            or self._environ.get(DATA_ENV, "").strip()
        )

    @property
    def settings(self) -> LazyLoadingSettings:
        if self._settings is None:
            self._settings = LazyLoadingSettings.from_environ(self._environ)
        return self._settings

    def load_config(self) -> LazyLoadingConfig:
        """Validate everything (config, credentials, paths) without touching the network."""
        config = load_config(self._environ, self._values_file, self.settings.scrub_env)
        if config is None:
            raise ConfigError(
                f"lazy loading is not configured: set {DATA_ENV} or {VALUES_FILE_ENV}"
            )
        resolve_targets(config.data, self.code_dir, self.settings.allowed_roots, config.source,
                        self.settings.replace_model_code)
        return config

    def subscribe(self, callback: ProgressCallback) -> None:
        self._tracker.subscribe(callback)

    def progress(self) -> ProgressSnapshot:
        return self._tracker.snapshot()

    @property
    def results(self) -> list[FileResult] | None:
        """Per-file outcomes of the successful download in this process, else ``None``."""
        return self._results if self._pid == os.getpid() else None

    def adopt_parent_download(self) -> bool:
        """In a forked child: take over the parent's completed download if every file is still
        exactly what the parent published (manifest ETag, size and mtime), without any request.

        Workers forked by a gunicorn master that just verified everything gain nothing from
        asking S3 again, and a worker recycled hours later must serve the same version as its
        siblings rather than whatever the bucket holds now.
        """
        if self._results is None or self._pid == os.getpid():
            return False
        manifest = Manifest(self.state_dir)
        for result in self._results:
            entry = manifest.lookup(result.target)
            if entry is None or entry.etag != result.etag or not entry.intact(result.target):
                return False
        self._pid = os.getpid()
        logger.info("%d files verified by the parent process are intact; no request needed",
                    len(self._results))
        return True

    # ----------------------------------------------------------------- downloads
    def download_lazy_loading_files(self) -> list[FileResult]:
        """Blocking entry point (DRUM's name); works inside or outside a running event loop."""
        if self.results is not None:
            return self.results
        return bridge.run_sync(self.download_lazy_loading_files_async)

    async def download_lazy_loading_files_async(self) -> list[FileResult]:
        """Native async entry point: never blocks the caller's event loop."""
        if self.results is not None:
            return self.results
        warn_about_environ(self._environ)
        if not self.is_lazy_loading_available:
            if DATA_ENV in self._environ:
                logger.warning("%s is set but empty: lazy loading is off", DATA_ENV)
            else:
                logger.info("lazy loading is not configured (neither %s nor %s is set): no "
                            "artifacts to download", DATA_ENV, VALUES_FILE_ENV)
            self._results, self._pid = [], os.getpid()
            return []
        started = time.monotonic()
        try:
            try:
                results = await self._download()
            except OSError as exc:  # a local resource ran out where no step expected it
                raise DownloadError(_local_failure(exc)) from None
        except LazyLoadingError as exc:
            self._tracker.set_state(DownloadState.FAILED, str(exc))
            raise
        except BaseException as exc:
            self._tracker.set_state(DownloadState.FAILED, type(exc).__name__)
            raise
        self._results, self._pid = results, os.getpid()
        self._tracker.set_state(DownloadState.DONE)
        fetched = sum(r.bytes_fetched for r in results)
        logger.info(
            "%d files ready in %.2f s (%s fetched, %d from cache)",
            len(results), time.monotonic() - started, format_bytes(fetched),
            sum(r.status in ("cached", "offline") for r in results),
        )
        return results

    async def _download(self) -> list[FileResult]:
        self._tracker.set_state(DownloadState.PLANNING)
        config = load_config(self._environ, self._values_file, self.settings.scrub_env)
        assert config is not None
        settings = self.settings
        code_dir = self.code_dir
        targets = resolve_targets(config.data, code_dir, settings.allowed_roots, config.source,
                                  settings.replace_model_code)
        transfers = [
            FileTransfer(
                index=index,
                spec=spec,
                repository=config.data.repository(spec.repository_id),
                target=target,
                root=root,
                display=display,
            )
            for index, (spec, target, (root, display)) in enumerate(zip(
                config.data.files, targets,
                place_targets(targets, code_dir, settings.allowed_roots), strict=True))
        ]
        _check_writable(code_dir)
        clients = S3ClientFactory(config, settings, self._environ)
        try:
            if settings.cache_dir is not None:  # imported only for a run that has one
                from .nodecache import NodeCache

                store = NodeCache.open(settings.cache_dir, settings.cache_max_bytes)
                results = (await self._through_store(store, transfers, clients)
                           if store is not None else None)
                if results is not None:
                    return results
            engine = TransferEngine(transfers, clients, settings, code_dir / STATE_DIR_NAME,
                                    self._tracker)
            return await _within_deadline(engine)
        finally:
            clients.close()

    async def _through_store(self, store: NodeCache, transfers: list[FileTransfer],
                             clients: S3ClientFactory) -> list[FileResult] | None:
        """Fill the node cache, then link each artifact into the code dir; ``None`` when the
        store itself fails (full, unwritable), so the caller downloads into the code dir."""
        from .nodecache import Tampered

        stored = [store.for_store(t) for t in transfers]
        store_manifest, manifest = Manifest(store.state_dir), Manifest(self.state_dir)
        for attempt in (1, 2):
            engine = TransferEngine(stored, clients, self.settings, store.state_dir,
                                    self._tracker)
            try:
                results = await _within_deadline(engine)
            except DownloadError as exc:
                if not any(map(store.is_local_failure, [str(exc), *exc.failures.values()])):
                    raise
                logger.warning("node cache %s failed (%s); downloading into the code dir "
                               "instead", store.root, one_line(str(exc), 300))
                return None
            tampered = False
            for kept, target, result in zip(stored, transfers, results, strict=True):
                theirs = store_manifest.lookup(kept.target)
                mine = manifest.lookup(target.target)
                if (mine is not None and theirs is not None and mine.matches_entry(theirs)
                        and mine.intact(target.target)):
                    continue  # a restart finds its link (or copy) of this very object intact
                try:
                    store.link(kept, target, check_sha256=result.status in ("cached", "offline"))
                except Tampered as exc:
                    if attempt == 2:
                        raise DownloadError(str(exc)) from None
                    logger.warning("%s; fetching it again", exc)
                    store.forget(kept)
                    tampered = True
                except OSError as exc:
                    raise DownloadError(_local_failure(exc)) from None
                else:
                    # The code dir's manifest vouches for the link as the store's does for the
                    # object, so forked workers and restarts recognise it without a request.
                    if theirs is not None:
                        manifest.record(target.target, theirs)
            if not tampered:
                break
        store.evict(keep={kept.target for kept in stored})
        return [replace(result, target=target.target, display=target.display)
                for result, target in zip(results, transfers, strict=True)]

    # ----------------------------------------------------------------- DRUM compatibility
    @staticmethod
    def setup_environment_variables_from_values_file(
        values_file: str | os.PathLike[str],
        environ: MutableMapping[str, str] | None = None,
    ) -> None:
        """DRUM's helper: turn a values YAML into ``MLOPS_*`` environment variables."""
        env = os.environ if environ is None else environ
        data, credentials = load_values_file(values_file)
        env[DATA_ENV] = data.to_json()
        for cred_id, cred in credentials.items():
            env[secret_env_name(cred_id)] = cred.to_env_json()


def _local_failure(exc: OSError) -> str:
    where = f"{exc.filename}: " if exc.filename else ""
    hint = {errno.EMFILE: "; raise the open-files limit (ulimit -n) or lower "
                          "LAZY_LOADING_MAX_CONNECTIONS",
            errno.ENOSPC: "; free some space or give the code dir a larger volume"}
    return f"local I/O error: {where}{exc.strerror or exc}{hint.get(exc.errno or 0, '')}"


async def _within_deadline(engine: TransferEngine) -> list[FileResult]:
    """Run the engine until it is done or its deadline (which it may move once it knows how
    many bytes it must fetch) has passed; then cancel it, letting its cleanup run."""
    task = asyncio.ensure_future(engine.run())
    try:
        while (remaining := engine.deadline - time.monotonic()) > 0:
            done, _ = await asyncio.wait({task}, timeout=remaining)
            if done:
                return task.result()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    raise DownloadError(engine.deadline_passed())


def _check_writable(code_dir: Path) -> None:
    """The cache, locks and journal live under the code dir: fail before any request if they
    cannot, with the fix rather than a traceback."""
    state_dir = code_dir / STATE_DIR_NAME
    try:
        prepare_state_dir(code_dir)
        # The shared lock file is the probe: opened for writing (created on a first start), it
        # is needed anyway, so the check costs no inode of its own.
        os.close(open_lock_file(state_dir / LOCKS_DIR / SHARED_LOCK_FILE))
    except OSError as exc:
        raise ConfigError(
            f"{state_dir}: not writable ({exc.strerror}); the code dir must be writable, since "
            "artifacts and the download cache live there (mount a volume such as an emptyDir)"
        ) from None
