"""TLS verification per repository against a loopback https S3 endpoint (self-signed)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import urllib3

from lazy_loading import DownloadError, LazyLoadingHandler
from tests.conftest import lazy_env


def _self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def https_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    cert, key = _self_signed(tmp_path_factory.mktemp("tls"))
    server = make_server("127.0.0.1", 0, DomainDispatcherApplication(create_backend_app),
                         threaded=True, request_handler=MotoRequestHandler,
                         ssl_context=(str(cert), str(key)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"https://127.0.0.1:{server.server_port}"
    client = boto3.client("s3", endpoint_url=url, verify=str(cert), region_name="us-east-1",
                          aws_access_key_id="a", aws_secret_access_key="b")
    client.create_bucket(Bucket="tls-bucket")
    client.put_object(Bucket="tls-bucket", Key="m.bin", Body=b"secure bytes")
    yield url, cert
    server.shutdown()


def _env(url: str, **repo: object) -> dict[str, str]:
    env = lazy_env(url, "tls-bucket", {"m.bin": "m.bin"})
    data = json.loads(env["MLOPS_LAZY_LOADING_DATA"])
    data["repositories"][0].update(repo)
    env["MLOPS_LAZY_LOADING_DATA"] = json.dumps(data)
    return env


def test_verification_is_on_by_default_and_fails_clearly(
    https_s3: tuple[str, Path], tmp_path: Path
) -> None:
    url, _ = https_s3
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"TLS error: .*CERTIFICATE_VERIFY_FAILED.*caBundle"):
        LazyLoadingHandler(code_dir=tmp_path, environ=_env(url)).download_lazy_loading_files()
    assert time.monotonic() - started < 5, "a TLS failure is not retried"
    assert not (tmp_path / "m.bin").exists()


@pytest.mark.parametrize("key", ["verifyCertificate", "verify_certificate"])
def test_verification_off_for_this_repository_only(
    https_s3: tuple[str, Path], tmp_path: Path, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    url, _ = https_s3
    with warnings.catch_warnings(record=True) as caught, \
            caplog.at_level(logging.WARNING, logger="lazy_loading"):
        warnings.simplefilter("always")
        for _ in range(2):  # a cold start, then a warm one (HEADs sent without a boto3 client)
            LazyLoadingHandler(code_dir=tmp_path,
                               environ=_env(url, **{key: False})).download_lazy_loading_files()
    assert (tmp_path / "m.bin").read_bytes() == b"secure bytes"
    assert not [w for w in caught if issubclass(w.category,
                                                urllib3.exceptions.InsecureRequestWarning)]
    assert caplog.text.count("TLS certificate verification is off for repository") == 2
    import ssl

    assert ssl._create_default_https_context is ssl.create_default_context, \
        "no process-wide TLS patching"


def test_ca_bundle_per_repository(https_s3: tuple[str, Path], tmp_path: Path) -> None:
    url, cert = https_s3
    LazyLoadingHandler(code_dir=tmp_path,
                       environ=_env(url, caBundle=str(cert))).download_lazy_loading_files()
    assert (tmp_path / "m.bin").read_bytes() == b"secure bytes"


def test_aws_ca_bundle_env(https_s3: tuple[str, Path], tmp_path: Path) -> None:
    url, cert = https_s3
    env = {**_env(url), "AWS_CA_BUNDLE": str(cert)}
    LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert (tmp_path / "m.bin").read_bytes() == b"secure bytes"


def test_a_certificate_for_another_host_is_one_short_line(
    https_s3: tuple[str, Path], tmp_path: Path
) -> None:
    url, cert = https_s3
    other_name = url.replace("127.0.0.1", "localhost")  # the certificate names 127.0.0.1 only
    with pytest.raises(DownloadError) as info:
        LazyLoadingHandler(code_dir=tmp_path, environ=_env(other_name, caBundle=str(cert))
                           ).download_lazy_loading_files()
    message = str(info.value)
    assert "TLS error" in message and "\n" not in message and len(message) < 400, message
    assert "subjectAltName" not in message and "notAfter" not in message
    assert "the certificate does not name this host" in message
