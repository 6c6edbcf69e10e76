"""Property-based tests (hypothesis) over the range planner, in-order hashing and the config
parser."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from lazy_loading import ConfigError
from lazy_loading.config import load_config
from lazy_loading.plan import choose_part_size, parts_per_get, split_ranges
from tests.conftest import SECRET_CANARY

MiB = 1024 * 1024


@given(size=st.integers(0, 10**12), part=st.integers(1, 5 * 1024 * MiB))
def test_ranges_tile_the_object_exactly(size: int, part: int) -> None:
    if size // part > 100_000:
        part = -(-size // 100_000)
    ranges = split_ranges(size, part)
    assert sum(r.length for r in ranges) == size
    position = 0
    for index, r in enumerate(ranges):
        assert r.index == index
        assert r.start == position
        assert 1 <= r.length <= part
        position = r.end + 1
    assert position == size


@given(total=st.integers(0, 10**13), connections=st.integers(1, 256))
def test_auto_part_size_keeps_every_connection_busy(total: int, connections: int) -> None:
    part = choose_part_size([total], connections, None)
    assert 4 * MiB <= part <= 64 * MiB and part % MiB == 0
    parts = -(-total // part)
    planned = min(connections, 16)
    assert parts >= min(planned, -(-total // (4 * MiB))), "idle connections with work left"
    assert part == choose_part_size([total], planned, None), "parts cut for more than 16"


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _whole_mib(n: int) -> int:
    return _ceil_div(n, MiB) * MiB


def _busiest(sizes: list[int], part: int, connections: int) -> int:
    loads = [0] * connections
    for length in sorted((min(part, size - start) for size in sizes
                          for start in range(0, size, part)), reverse=True):
        loads[loads.index(min(loads))] += length
    return max(loads)


@settings(max_examples=300)
@given(sizes=st.lists(st.integers(0, 200 * MiB), min_size=1, max_size=40),
       connections=st.integers(1, 32))
def test_auto_part_size_keeps_files_whole_only_when_the_balance_holds(
        sizes: list[int], connections: int) -> None:
    """Files up to 64 MiB stay whole when they balance the connections as well as two rounds
    of parts would; never at the cost of a busier connection."""
    part = choose_part_size(sizes, connections, None)
    planned = min(connections, 16)
    wanted = max(4 * MiB, min(64 * MiB, _whole_mib(_ceil_div(sum(sizes), 2 * planned))))
    whole = max((s for s in sizes if s <= 64 * MiB), default=0)
    assert part in (wanted, _whole_mib(whole))
    assert _busiest(sizes, part, planned) <= _busiest(sizes, wanted, planned)


def test_as_many_equal_files_as_connections_are_fetched_whole() -> None:
    assert choose_part_size([32 * MiB] * 16, 16, None) == 32 * MiB
    assert choose_part_size([32 * MiB] * 3, 16, None) == 4 * MiB, "3 files keep 3 of 16 busy"
    assert choose_part_size([1024 * MiB], 16, None) == 32 * MiB, "1 GiB still in 2 rounds"
    assert choose_part_size([32 * MiB] * 20, 16, None) == 20 * MiB, "20 whole: 4 go twice"


def test_a_budget_above_16_connections_cuts_the_parts_it_would_for_16() -> None:
    """More connections pay only when the store caps each one, and then the GETs share the
    same parts; from a store that keeps up, more parts only cost requests."""
    assert choose_part_size([32 * MiB] * 16, 32, None) == 32 * MiB, "16 files cut in two"
    assert choose_part_size([1024 * MiB], 32, None) == 32 * MiB
    assert choose_part_size([1024 * MiB], 256, None) == 32 * MiB


@given(total=st.integers(0, 10**13), connections=st.integers(1, 256),
       configured=st.integers(MiB, 5 * 1024 * MiB))
def test_configured_part_size_is_used_as_is(total: int, connections: int, configured: int) -> None:
    assert choose_part_size([total], connections, configured) == configured


@settings(max_examples=60, deadline=None)
@given(data=st.data(), size=st.integers(1, 40_000), part=st.integers(1, 5_000),
       threads=st.integers(1, 4))
def test_parts_finishing_in_any_order_hash_to_the_whole_file(
    tmp_path_factory: Any, data: st.DataObject, size: int, part: int, threads: int
) -> None:
    import os
    import random
    import threading

    from lazy_loading.checksums import DigestSet
    from lazy_loading.verify import PrefixHasher

    body = random.Random(size).randbytes(size)
    path = tmp_path_factory.mktemp("h") / "f"
    path.write_bytes(bytes(size))  # parts not finished yet hold zeros, as in a fresh temp file
    ranges = split_ranges(size, part)
    indices = [r.index for r in ranges]
    resumed = set(data.draw(st.lists(st.sampled_from(indices), unique=True)))
    order = data.draw(st.permutations([i for i in indices if i not in resumed]))
    digests = DigestSet(["sha256"])
    fd = os.open(path, os.O_RDWR)

    def finish(index: int) -> None:
        r = ranges[index]
        os.pwrite(fd, body[r.start:r.end + 1], r.start)
        hasher.part_done(index)

    try:
        for index in resumed:
            r = ranges[index]
            os.pwrite(fd, body[r.start:r.end + 1], r.start)
        hasher = PrefixHasher(fd, ranges, digests, resumed, threading.Event())
        workers = [threading.Thread(target=lambda chunk=order[k::threads]: [
            finish(i) for i in chunk]) for k in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        os.close(fd)
    if order:  # with every part resumed nothing finishes here; the engine reads back instead
        assert hasher.complete
        expected = DigestSet(["sha256"])
        expected.update(body)
        assert digests.encoded("sha256") == expected.encoded("sha256")
    else:
        assert not hasher.complete


CREDENTIAL = json.dumps({"credentialType": "s3", "awsAccessKeyId": "AKIA",
                         "awsSecretAccessKey": SECRET_CANARY})

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)

FIELDS = ["remotePath", "localPath", "repositoryId", "sha256", "size", "bucketName",
          "credentialId", "endpointUrl", "verifyCertificate", "endpointURL", "remote_path"]


def _valid() -> dict[str, Any]:
    return {
        "files": [{"remotePath": "k", "localPath": "a/b.bin", "repositoryId": "r"}],
        "repositories": [{"repositoryId": "r", "bucketName": "bkt", "credentialId": "c",
                          "endpointUrl": "http://127.0.0.1:9"}],
    }


@st.composite
def mutated_documents(draw: st.DrawFn) -> Any:
    doc = _valid()
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from(["files", "repositories"]))
        target = doc[section][0]
        field = draw(st.sampled_from(FIELDS))
        if draw(st.booleans()):
            target.pop(field, None)
        else:
            target[field] = draw(json_values)
    if draw(st.booleans()):
        doc[draw(st.sampled_from(["files", "repositories"]))] = draw(json_values)
    return doc


def _check(payload: str) -> None:
    env = {"MLOPS_LAZY_LOADING_DATA": payload, "MLOPS_REPOSITORY_SECRET_C": CREDENTIAL}
    try:
        load_config(env)
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message
        assert SECRET_CANARY not in message
        assert message.startswith("MLOPS_")


@settings(max_examples=300, deadline=None)
@given(doc=mutated_documents())
def test_parser_never_crashes_on_mutated_documents(doc: Any) -> None:
    _check(json.dumps(doc))


@settings(max_examples=200, deadline=None)
@given(doc=json_values)
def test_parser_never_crashes_on_arbitrary_json(doc: Any) -> None:
    _check(json.dumps(doc))


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=60))
def test_parser_never_crashes_on_arbitrary_text(text: str) -> None:
    _check(text)


def _near_miss() -> st.SearchStrategy[str]:
    """A known name with a few characters inserted, dropped or replaced, or any short name."""
    from lazy_loading import environ

    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ_0123456789ab-."
    edit = st.tuples(st.sampled_from("idr"), st.integers(0, 40), st.sampled_from(alphabet))

    def apply(name: str, edits: list[tuple[str, int, str]]) -> str:
        chars = list(name)
        for op, at, char in edits:
            at = min(at, len(chars))
            if op == "i":
                chars.insert(at, char)
            elif chars:
                at = min(at, len(chars) - 1)
                if op == "d":
                    del chars[at]
                else:
                    chars[at] = char
        return "".join(chars)

    return st.one_of(
        st.builds(apply, st.sampled_from(sorted(environ._known)), st.lists(edit, max_size=6)),
        st.text(alphabet, max_size=40),
    )


@settings(max_examples=3000)
@given(word=_near_miss())
def test_the_misspelled_variable_check_suggests_what_difflib_suggests(word: str) -> None:
    """The check is our own loop for speed; its suggestion must stay difflib's."""
    import difflib

    from lazy_loading import environ

    expected = difflib.get_close_matches(word, sorted(environ._known), n=1, cutoff=0.8)
    found = environ._closest_known(word, environ._counted(frozenset(environ._known)))
    assert found == (expected[0] if expected else None)


_CREDENTIAL_NAMES = ["X-Amz-Security-Token", "x-amz-security-token", "Signature",
                     "X-Amz-Signature", "signature", "aws_secret_access_key",
                     "AWS_SECRET_ACCESS_KEY", "awsSecretAccessKey", "awssecretaccesskey",
                     "awsSessionToken", "AwsSessionToken", "Sig"]
_CREDENTIAL_TEXT = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(_CREDENTIAL_NAMES), st.sampled_from(["", "", "'", '"']),
                  st.sampled_from(["=", "=", ":", " = "]), st.sampled_from(["", "", "'", "b'"]),
                  st.sampled_from(["0123456789abcdef0123", "0123456789abcdef0123",
                                   "wJalrXUtnFEMI", "}"])
                  ).map("".join),
        st.sampled_from([" ", ",", "}", "nature=", "x", "'"]),
    ), max_size=6).map("".join)


@settings(max_examples=500)
@given(text=_CREDENTIAL_TEXT)
def test_the_quick_check_before_the_credential_patterns_skips_no_match(text: str) -> None:
    """Log records are searched for credentials by six patterns only when one search finds
    what they all contain: that search must never skip a text any pattern would mask."""
    from lazy_loading.redact import _MASK, _PATTERNS, redact

    every_pattern = text
    for pattern in _PATTERNS:
        every_pattern = pattern.sub(lambda m: m.group(1) + _MASK, every_pattern)
    assert redact(text) == every_pattern


@given(part=st.integers(1, 5 * 1024).map(lambda n: n * MiB),
       waited=st.floats(0, 10), per_byte=st.floats(0, 1e-6))
def test_a_get_takes_at_most_64_mib_of_parts(part: int, waited: float, per_byte: float) -> None:
    most = parts_per_get(part, waited, per_byte)
    assert most >= 1
    if most > 1:
        assert most * part <= 64 * MiB
        assert waited > 0.1 * (waited + per_byte * part), "only where waiting weighs"


def test_parts_per_get_examples() -> None:
    per_byte = 0.030 / (13 * MiB)  # SeaweedFS: 13 MiB read in 30 ms, after 15 ms
    assert parts_per_get(13 * MiB, 0.015, per_byte) == 4  # up to 64 MiB
    assert parts_per_get(4 * MiB, 0.003, 0.1 / (4 * MiB)) == 1  # 3 ms of 103: kept
    assert parts_per_get(32 * MiB, 0.002, 0.8 / (32 * MiB)) == 1  # a capped connection
    assert parts_per_get(1 * MiB, 0.010, 0.010 / MiB) == 9  # a tenth: 9 × 10 ms of reading
