"""Against a store that checks SigV4 signatures (moto with IAM enforced, in its own process).

The embedded test store accepts any signature, so only here can a wrongly signed request fail;
this matters most for the warm start, which signs its HEADs itself instead of using boto3.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock
from urllib.parse import quote

import boto3
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lazy_loading import DownloadError, LazyLoadingHandler
from lazy_loading.client import S3ClientFactory
from tests.conftest import payload
from tests.procs import stop_group
from tests.servers import free_port

BUCKET = "signed-bucket"
OBJECTS = {"model/a.bin": payload(3 * 1024 * 1024, seed=7), "model/b c+d.json": b'{"k": 1}'}


@pytest.fixture(scope="module")
def signed_store() -> Iterator[tuple[str, str, str]]:
    """(url, access key id, secret) of a moto server that enforces IAM after setup."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)
        iam = boto3.client("iam", endpoint_url=url, aws_access_key_id="setup",
                           aws_secret_access_key="setup", region_name="us-east-1")
        iam.create_user(UserName="drum")
        iam.put_user_policy(UserName="drum", PolicyName="s3", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="drum")["AccessKey"]
        s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id=key["AccessKeyId"],
                          aws_secret_access_key=key["SecretAccessKey"], region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        for name, body in OBJECTS.items():
            s3.put_object(Bucket=BUCKET, Key=name, Body=body)
        yield url, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        stop_group(proc)


def _env(url: str, key_id: str, secret: str) -> dict[str, str]:
    data = {
        "files": [{"remotePath": name, "localPath": f"artifacts/{i}.bin", "repositoryId": "r"}
                  for i, name in enumerate(OBJECTS)],
        "repositories": [{"repositoryId": "r", "bucketName": BUCKET, "credentialId": "c",
                          "endpointUrl": url}],
    }
    return {"MLOPS_LAZY_LOADING_DATA": json.dumps(data),
            "MLOPS_REPOSITORY_SECRET_C": json.dumps(
                {"credentialType": "s3", "awsAccessKeyId": key_id, "awsSecretAccessKey": secret}),
            "LAZY_LOADING_PART_SIZE": "1MiB"}


def _no_client(*args: object) -> None:
    raise AssertionError("a warm start must not need a boto3 client")


def test_downloads_and_warm_start_are_accepted_by_a_signature_checking_store(
    signed_store: tuple[str, str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = _env(*signed_store)
    cold = LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert [r.status for r in cold] == ["fetched", "fetched"]
    for i, body in enumerate(OBJECTS.values()):
        assert (tmp_path / f"artifacts/{i}.bin").read_bytes() == body

    monkeypatch.setattr(S3ClientFactory, "_create", _no_client)
    warm = LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert [r.status for r in warm] == ["cached", "cached"]


def test_rejected_warm_start_falls_back_and_reports_the_store_error(
    signed_store: tuple[str, str, str], tmp_path: Path
) -> None:
    url, key_id, secret = signed_store
    LazyLoadingHandler(code_dir=tmp_path, environ=_env(url, key_id, secret)
                       ).download_lazy_loading_files()
    with pytest.raises(DownloadError, match=r"403|[Dd]enied|[Ff]orbidden") as info:
        LazyLoadingHandler(code_dir=tmp_path, environ=_env(url, key_id, "not-the-secret")
                           ).download_lazy_loading_files()
    assert "not-the-secret" not in str(info.value)


_KEYS = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40)
_VALUES = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=30)


@settings(max_examples=200, deadline=None)
@given(key=_KEYS, secret=_VALUES, token=st.none() | _VALUES,
       region=st.sampled_from(["us-east-1", "eu-west-3", "auto"]),
       url=st.sampled_from(["http://127.0.0.1:9000", "https://minio.example:443",
                            "http://store.local", "https://[::1]:8443"]),
       headers=st.dictionaries(st.sampled_from(["If-Match", "Range", "x-amz-checksum-mode"]),
                               _VALUES, max_size=3),
       when=st.integers(0, 4_000_000_000), method=st.sampled_from(["GET", "HEAD"]))
def test_our_signatures_are_botocores(key: str, secret: str, token: str | None, region: str,
                                       url: str, headers: dict[str, str], when: int,
                                       method: str) -> None:
    """The signer the engine uses instead of botocore's signs exactly what botocore signs."""
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    from lazy_loading.sigv4 import SigV4Signer

    full = f"{url}/bucket/{quote(key, safe='/~')}"
    expected = AWSRequest(method=method, url=full, headers=dict(headers))
    moment = datetime.datetime.fromtimestamp(when, datetime.timezone.utc).replace(tzinfo=None)
    with mock.patch("botocore.auth.get_current_datetime", return_value=moment), \
            mock.patch.object(S3SigV4Auth, "_should_sha256_sign_payload", return_value=True):
        S3SigV4Auth(Credentials("AKIDEXAMPLE", secret, token), "s3", region).add_auth(expected)
    ours = SigV4Signer("AKIDEXAMPLE", secret, token, region).sign(method, full, headers, now=when)
    assert ours["Authorization"] == expected.headers["Authorization"]


_WEEKDAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


def _imf_fixdate(moment: datetime.datetime) -> str:
    return (f"{_WEEKDAYS[moment.weekday()]}, {moment.day:02d} {_MONTHS[moment.month - 1]} "
            f"{moment.year:04d} {moment:%H:%M:%S} GMT")


@settings(max_examples=400, deadline=None)
@given(value=st.datetimes(min_value=datetime.datetime(1, 1, 1)).map(_imf_fixdate)
       | st.builds("{}, {:02d} {} {:04d} {:02d}:{:02d}:{:02d} GMT".format,
                   st.sampled_from(_WEEKDAYS), st.integers(0, 99), st.sampled_from(_MONTHS),
                   st.sampled_from([0, 1900, 1999, 2000, 2024, 2026, 2100, 9999]),
                   st.integers(0, 99), st.integers(0, 99), st.integers(0, 99))
       | st.sampled_from(["Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994",
                          "Sun, 06 Nov 1994 08:49:37 +0200", "Sun, 06 Nov 1994 08:49:37 -0000",
                          "2026-11-29T19:00:00Z", "Sun, 6 Nov 1994 08:49:37 GMT", "yesterday"]))
@example("Thu, 29 Feb 1900 00:00:00 GMT").via("not a leap year")
@example("Tue, 29 Feb 2000 12:00:00 GMT").via("a leap year")
@example("Thu, 29 Feb 2024 12:00:00 GMT").via("a leap year")
@example("Mon, 29 Feb 2100 12:00:00 GMT").via("not a leap year")
@example("Thu, 31 Apr 2026 12:00:00 GMT").via("a 30-day month")
@example("Wed, 31 Dec 2026 23:59:60 GMT").via("a leap second")
@example("Wed, 31 Dec 2026 24:00:00 GMT").via("hour 24")
@example("Wed, 00 Dec 2026 12:00:00 GMT").via("day 0")
def test_last_modified_is_read_as_botocore_reads_it(value: str) -> None:
    """The signed requests compare ``Last-Modified`` as text of the datetime botocore parses
    from it (what the boto3 path compares) for the dates S3 servers send, impossible ones
    included; other forms as the ``email`` package reads them, in UTC when they name no zone,
    as before. A date neither can read is refused."""
    from email.utils import parsedate_to_datetime

    from botocore.utils import parse_timestamp

    from lazy_loading.revalidate import _http_date

    def read_as_before() -> str:
        try:
            parsed = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return str(parse_timestamp(value))
        return str(parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.timezone.utc))

    try:
        expected = read_as_before()
    except ValueError:
        with pytest.raises(ValueError):
            _http_date(value)
        return
    assert _http_date(value) == expected
    if value.endswith(" GMT") and value[3:5] == ", " and value[12] != "0":  # two-digit years
        assert expected == str(parse_timestamp(value))


def test_the_signer_never_shows_its_secret() -> None:
    from lazy_loading.sigv4 import SigV4Signer

    signer = SigV4Signer("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG", "session-token-value", "us-east-1")
    assert "wJalrXUtnFEMI" not in repr(signer) and "session-token-value" not in repr(signer)
