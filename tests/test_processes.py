"""Several processes on one host, and processes killed mid-download."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lazy_loading import cache
from lazy_loading.cache import SHARED_LOCK_FILE, ResumeJournal, target_id
from tests.conftest import S3Store, kill_9_once_journaled, lazy_env, no_debris, payload
from tests.faults import Rule

MiB = 1024 * 1024


def _download_cmd(code_dir: Path) -> list[str]:
    return [sys.executable, "-m", "drum_servers.cli", "download", "--code-dir", str(code_dir)]


def test_eight_processes_at_once_fetch_each_object_once(s3: S3Store, tmp_path: Path) -> None:
    bucket = s3.bucket()
    objects = {f"shard-{i}.bin": payload(3 * MiB + i, seed=i) for i in range(3)}
    objects["small.json"] = b'{"a": 1}'
    for key, body in objects.items():
        s3.put(bucket, key, body)
    env = lazy_env(s3.url, bucket, {k: f"art/{k}" for k in objects},
                   LAZY_LOADING_PART_SIZE="1MiB")
    procs = [subprocess.Popen(_download_cmd(tmp_path), env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(8)]
    outputs = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, outputs
    for key, body in objects.items():
        assert (tmp_path / "art" / key).read_bytes() == body
        assert s3.faults.ledger.body_bytes[key] == len(body), f"{key} fetched more than once"
    assert sum("cached" in out for out in outputs) >= 7, "the other processes reused the file"
    assert no_debris(tmp_path) == []
    locks = sorted(p.name for p in (tmp_path / ".lazy_loading" / "locks").iterdir())
    assert locks == [SHARED_LOCK_FILE], "a lock file created per target costs an inode per file"


_HOLD_A_LOCK = """
import sys
from pathlib import Path
from lazy_loading import cache
if sys.argv[3] == "flock":
    cache._OFD_SETLK = None
lock = cache.target_lock(Path(sys.argv[1]), Path(sys.argv[2]))
print(lock.try_acquire(), flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("kind", ["ofd", "flock"])
def test_a_target_lock_excludes_other_processes_and_threads_and_dies_with_its_holder(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if kind == "flock":
        monkeypatch.setattr(cache, "_OFD_SETLK", None)
    elif cache._OFD_SETLK is None:
        pytest.skip("no open-file-description locks on this platform")
    state = tmp_path / ".lazy_loading"
    (state / "locks").mkdir(parents=True)
    held, free = tmp_path / "held.bin", tmp_path / "free.bin"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_A_LOCK, str(state), str(held), kind],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "True"
        assert not cache.target_lock(state, held).try_acquire(), "another process holds it"
        mine = cache.target_lock(state, free)
        assert mine.try_acquire(), "another target's lock is independent"
        assert not cache.target_lock(state, free).try_acquire(), "another thread's holder"
        mine.release()
        assert cache.target_lock(state, free).try_acquire()
        holder.kill()
        holder.wait(timeout=10)
        assert cache.target_lock(state, held).try_acquire(), "a killed holder's lock is gone"
    finally:
        holder.kill()
        holder.communicate(timeout=10)


def test_kill_9_then_resume_fetches_only_missing_ranges(s3: S3Store, tmp_path: Path) -> None:
    bucket = s3.bucket()
    body = payload(8 * MiB, seed=42)
    s3.put(bucket, "big.bin", body, ChecksumAlgorithm="CRC64NVME")
    env = lazy_env(s3.url, bucket, {"big.bin": "big.bin"}, LAZY_LOADING_PART_SIZE="1MiB",
                   LAZY_LOADING_MAX_CONNECTIONS="2")
    s3.faults.add(Rule("throttle", key="big.bin", times=None, rate=2 * MiB))
    journal_dir = tmp_path / ".lazy_loading" / "journal"
    proc = subprocess.Popen(_download_cmd(tmp_path), env=env, stderr=subprocess.DEVNULL)
    done = kill_9_once_journaled(proc, journal_dir, 3)
    assert len(done) >= 3, "the first process made progress before it was killed"
    assert not (tmp_path / "big.bin").exists(), "nothing is published before it is complete"
    found = ResumeJournal.read(next(journal_dir.glob("*.log")))
    assert found is not None
    journal_done = found[1]
    assert no_debris(tmp_path), "the killed process left its temp file for the resume"
    from lazy_loading.cache import Manifest

    assert Manifest(tmp_path / ".lazy_loading").lookup(tmp_path / "big.bin") is None

    s3.faults.reset()
    result = subprocess.run(_download_cmd(tmp_path), env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "big.bin").read_bytes() == body
    # Count what the second run asked for; the killed run's sockets may still drain bytes.
    requested = {int(rng.split("=")[1].split("-")[0]) // MiB
                 for method, key, rng, _ in s3.faults.ledger.requests
                 if method == "GET" and key == "big.bin" and rng}
    assert requested == set(range(8)) - journal_done
    assert "resuming big.bin" in result.stderr
    assert no_debris(tmp_path) == []
    assert list(journal_dir.glob("*.log")) == []


def test_temp_files_of_dead_processes_are_removed(s3: S3Store, tmp_path: Path) -> None:
    bucket = s3.bucket()
    s3.put(bucket, "a.bin", b"fresh")
    mine, other = target_id(tmp_path / "a.bin"), target_id(tmp_path / "other.bin")
    debris = tmp_path / f".a.bin.{mine[:12]}.99999-deadbeef.partial"
    debris.write_bytes(b"junk from a crashed run")
    # A process killed between writing a record's temp file and renaming it.
    state = tmp_path / ".lazy_loading"
    records = [state / "journal" / f".{mine}.log.99999.deadbeef.tmp",
               state / "manifest" / f".{mine}.json.99999.deadbeef.tmp"]
    not_ours = state / "manifest" / f".{other}.json.99999.deadbeef.tmp"
    for path in [*records, not_ours]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{")
    env = lazy_env(s3.url, bucket, {"a.bin": "a.bin"})
    result = subprocess.run(_download_cmd(tmp_path), env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert not debris.exists()
    assert [p for p in records if p.exists()] == []
    assert not_ours.exists(), "only the records of a target held under its lock are swept"
    assert (tmp_path / "a.bin").read_bytes() == b"fresh"


def test_kill_9_at_random_moments_never_corrupts(s3: S3Store, tmp_path: Path) -> None:
    import random

    from lazy_loading.cache import Manifest

    rng = random.Random(20261127)
    bucket = s3.bucket()
    objects = {f"f{i}.bin": payload(3 * MiB + 1000 * i, seed=100 + i) for i in range(3)}
    for key, body in objects.items():
        s3.put(bucket, key, body)
    env = lazy_env(s3.url, bucket, {k: f"m/{k}" for k in objects}, LAZY_LOADING_PART_SIZE="1MiB",
                   LAZY_LOADING_MAX_CONNECTIONS="3")
    for key in objects:
        s3.faults.add(Rule("throttle", key=key, times=None, rate=1 * MiB))
    manifest = Manifest(tmp_path / ".lazy_loading")
    for _ in range(3):
        proc = subprocess.Popen(_download_cmd(tmp_path), env=env, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 1.5))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        for key, body in objects.items():
            target = tmp_path / "m" / key
            if manifest.lookup(target) is not None:
                assert target.read_bytes() == body, "the manifest only claims complete files"
            if target.exists():
                assert target.read_bytes() == body, "a published file is always complete"
    s3.faults.reset()
    result = subprocess.run(_download_cmd(tmp_path), env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    for key, body in objects.items():
        assert (tmp_path / "m" / key).read_bytes() == body
    assert no_debris(tmp_path) == []
    assert list((tmp_path / ".lazy_loading" / "journal").glob("*")) == []


def test_forked_child_adopts_the_parents_download_without_requests(
    s3: S3Store, tmp_path: Path
) -> None:
    import multiprocessing

    from lazy_loading import LazyLoadingHandler

    bucket = s3.bucket()
    s3.put(bucket, "a.bin", b"verified by the parent")
    env = lazy_env(s3.url, bucket, {"a.bin": "a.bin"})
    handler = LazyLoadingHandler(code_dir=tmp_path, environ=env)
    handler.download_lazy_loading_files()
    before = len(s3.faults.ledger.requests)

    def child(queue: multiprocessing.Queue, tamper: bool) -> None:  # type: ignore[type-arg]
        if tamper:
            (tmp_path / "a.bin").write_bytes(b"changed on disk!!!!!!!")
        queue.put(handler.adopt_parent_download())

    ctx = multiprocessing.get_context("fork")
    outcomes = []
    for tamper in (False, True):
        queue = ctx.Queue()
        proc = ctx.Process(target=child, args=(queue, tamper))
        proc.start()
        proc.join(30)
        outcomes.append(queue.get(timeout=5))
    assert outcomes == [True, False]
    assert len(s3.faults.ledger.requests) == before


def test_cli_download_from_a_values_file(s3: S3Store, tmp_path: Path) -> None:
    bucket = s3.bucket()
    s3.put(bucket, "models/m.bin", b"from the values file")
    values = tmp_path / "values.yaml"
    values.write_text(
        "files:\n"
        "  - {remotePath: models/m.bin, localPath: art/m.bin, repositoryId: repo1}\n"
        "repositories:\n"
        f"  - {{repositoryId: repo1, bucketName: {bucket}, credentialId: cred1, "
        f"endpointUrl: '{s3.url}'}}\n"
        "credentials:\n"
        "  - {id: cred1, credentialType: s3, awsAccessKeyId: AKIAX, "
        "awsSecretAccessKey: values-file-secret}\n"
    )
    code = tmp_path / "code"
    result = subprocess.run(
        [*_download_cmd(code), "--lazy-loading-file", str(values)],
        env={"PATH": os.environ["PATH"]}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert (code / "art" / "m.bin").read_bytes() == b"from the values file"
    assert "values-file-secret" not in result.stderr + result.stdout


@pytest.mark.parametrize("how", ["checked by its CRC", "written before a restart"])
def test_a_resumed_part_whose_bytes_never_reached_the_disk_is_fetched_again(
    how: str, s3: S3Store, tmp_path: Path
) -> None:
    """A power cut can leave a journal record on disk while its part's bytes are not (zeros).
    An object with a checksum its parts' CRCs combine into gets those CRCs journaled, and
    resumed parts are checked against them. Without one, parts journaled before the machine
    restarted, and never synced, are fetched again; this boot's are trusted (the page cache
    holds their bytes whatever happened to the process)."""
    bucket = s3.bucket()
    body = payload(6 * MiB, seed=43)
    s3.put(bucket, "big.bin", body)  # single-part upload: CRC32, combinable
    crc = how == "checked by its CRC"
    env = lazy_env(s3.url, bucket, {"big.bin": "big.bin"}, LAZY_LOADING_PART_SIZE="1MiB",
                   LAZY_LOADING_MAX_CONNECTIONS="1",
                   LAZY_LOADING_VERIFY_CHECKSUMS="true" if crc else "false")
    s3.faults.add(Rule("throttle", key="big.bin", times=None, rate=2 * MiB))
    journal_dir = tmp_path / ".lazy_loading" / "journal"
    proc = subprocess.Popen(_download_cmd(tmp_path), env=env, stderr=subprocess.DEVNULL)
    done = kill_9_once_journaled(proc, journal_dir, 2)
    assert 0 in done, "the first part was journaled before the kill"
    (partial,) = no_debris(tmp_path)
    with open(partial, "r+b") as fh:  # part 0's bytes "lost": zeros, as after a power cut
        fh.write(b"\0" * MiB)
    (journal,) = journal_dir.glob("*.log")
    header, _, rest = journal.read_text().partition("\n")
    fields = json.loads(header)
    assert (fields["crc"] is not None) == crc, fields
    if not crc:  # as the journal of the machine's previous boot reads
        fields["boot"] = "an earlier boot"
        journal.write_text(json.dumps(fields) + "\n" + rest)
    s3.faults.reset()
    result = subprocess.run(_download_cmd(tmp_path), env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "big.bin").read_bytes() == body, "no zeroed part is ever published"
    assert "resumed part(s) of" in result.stderr
    assert ("failed their check" if crc else "before this machine restarted") in result.stderr
    requested = {int(rng.split("=")[1].split("-")[0]) // MiB
                 for method, key, rng, _ in s3.faults.ledger.requests
                 if method == "GET" and key == "big.bin" and rng}
    assert 0 in requested
