"""The HEAD stage: what each object is in the store now, before anything is planned.

Signed HEADs without botocore's pipeline come first (``revalidate``); whatever they cannot
settle (an error status, a refused connection) goes through the boto3 client, with its retries
and messages. A warm start, where every file is published and intact, is settled by HEADs alone,
without the I/O pool or a boto3 client.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from .aio import in_own_thread, to_thread
from .client import S3ClientFactory, describe_endpoint
from .lanes import LaneLimit, Lanes
from .local import LocalCopies
from .plan import FileTransfer
from .progress import ProgressTracker
from .results import FileResult
from .retry import Retrier
from .revalidate import NEARBY_SECONDS, SignedRequests, head_without_client
from .s3io import RemoteObject, TransferFailure, TransientFailure, head_object
from .settings import LazyLoadingSettings

Submit = Callable[..., Future[Any]]


class RemoteLookup:
    def __init__(self, transfers: list[FileTransfer], clients: S3ClientFactory,
                 settings: LazyLoadingSettings, retrier: Retrier, local: LocalCopies,
                 tracker: ProgressTracker, cancel: threading.Event) -> None:
        self._transfers = transfers
        self._clients = clients
        self._settings = settings
        self._retrier = retrier
        self._local = local
        self._tracker = tracker
        self._cancel = cancel
        self.signed: SignedRequests | None = None
        # Every failure was the store not answering: intact local copies may then be served.
        self.unreachable = False
        # The fastest signed HEAD, in seconds (None: none was answered).
        self.fastest_head: float | None = None
        self._timing = threading.Lock()

    def close(self) -> None:
        if self.signed is not None:
            self.signed.close()

    async def all_cached(self) -> list[FileResult] | None:
        """Warm start: every file is published and intact, so one HEAD each, sent without a
        boto3 client or the I/O pool, settles it when nothing changed in the store."""
        entries = []
        for transfer in self._transfers:
            entry = self._local.published(transfer, remote=None)
            if entry is None:
                return None
            entries.append(entry)
        remotes = await in_own_thread(head_without_client, self._transfers, self._clients,
                                      self._settings, self._timed)
        if remotes is None:
            return None
        for transfer, remote in zip(self._transfers, remotes, strict=True):
            transfer.remote = remote  # kept for the normal path if anything changed
        self._tracker.start(len(remotes), sum(r.size for r in remotes))
        results = []
        for transfer, remote, entry in zip(self._transfers, remotes, entries, strict=True):
            result = self._local.cached(transfer, remote, entry)
            if result is None:  # replaced on disk meanwhile: the normal path re-checks under lock
                return None
            results.append(result)
        return results

    async def head_all(self, submit: Submit, limit: LaneLimit) -> dict[str, str]:
        """Set every transfer's ``remote``; returns what failed, by file."""
        # Build each client before the first request: construction takes ~60 ms of GIL, and
        # every I/O thread would otherwise queue behind it on the factory's lock.
        repositories = {t.repository.repository_id: t.repository for t in self._transfers}
        for repository in repositories.values():
            if repository.endpoint_url is None:  # custom endpoints need no client unless asked
                await to_thread(self._clients.get, repository)
        quick = self.signed = SignedRequests(self._transfers, self._clients, self._settings)
        # A warm start that found a change already knows every object.
        results: list[RemoteObject | BaseException | None] = [t.remote for t in self._transfers]
        unknown = [i for i, found in enumerate(results) if found is None]
        lanes = Lanes([self._transfers[i] for i in unknown], self._timed(quick.head), limit,
                      lambda lane: submit((-1,), lane), self._cancel)
        answers = await asyncio.wrap_future(lanes.start())
        for i, found in zip(unknown, answers, strict=True):
            results[i] = found
        retry = [i for i, found in enumerate(results) if found is None]
        slow = await asyncio.gather(
            *(asyncio.wrap_future(submit((-1, i), self.head, self._transfers[i]))
              for i in retry),
            return_exceptions=True,
        )
        for i, outcome in zip(retry, slow, strict=True):
            results[i] = outcome
        failures: dict[str, str] = {}
        self.unreachable = True
        for transfer, result in zip(self._transfers, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, TransferFailure):
                    raise result
                failures[transfer.display] = result.message
                if not isinstance(result, TransientFailure):
                    self.unreachable = False
                continue
            assert result is not None  # every None was asked again
            transfer.remote = result
            expected = transfer.spec.size
            if expected is not None and expected != result.size:
                self.unreachable = False
                failures[transfer.display] = (
                    f"files[{transfer.index}].size is {expected} but {result.where} has "
                    f"{result.size} bytes"
                )
        return failures

    @property
    def nearby(self) -> bool:
        """Whether a HEAD came back within ``NEARBY_SECONDS``: the store is on this machine or
        next to it (its time includes our own work and any wait for the GIL, and a first
        request's connection set-up, all well under that over loopback)."""
        return self.fastest_head is not None and self.fastest_head < NEARBY_SECONDS

    def _timed(self, head: Callable[[FileTransfer], Any]) -> Callable[[FileTransfer], Any]:
        """``head``, keeping the fastest answer's time in ``fastest_head``."""
        def timed(transfer: FileTransfer) -> Any:
            started = time.monotonic()
            found = head(transfer)
            if isinstance(found, RemoteObject):
                took = time.monotonic() - started
                with self._timing:
                    if self.fastest_head is None or took < self.fastest_head:
                        self.fastest_head = took
            return found

        return timed

    def head(self, transfer: FileTransfer) -> RemoteObject:
        """One HEAD through the client, with retries (blocking)."""
        repo = transfer.repository
        client = self._clients.get(repo)
        return self._retrier.call(
            lambda: head_object(client, describe_endpoint(repo), repo.bucket_name,
                                transfer.spec.remote_path),
            self._cancel,
        )
