"""The signed requests' own header parser reads every response exactly as http.client does."""

from __future__ import annotations

import http.client
import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lazy_loading.connections import parse_headers

_NAME = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters=":"),
                min_size=0, max_size=12)
_VALUE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=20)
_LINE = st.one_of(
    st.builds(lambda n, v, sp: f"{n}:{sp}{v}", _NAME, _VALUE, st.sampled_from(["", " ", "\t "])),
    st.builds(lambda v, lead: f"{lead}{v}", _VALUE, st.sampled_from([" ", "\t"])),  # folded
    st.builds(lambda v: f"From {v}", _VALUE),  # an envelope line
    _VALUE,  # anything else, e.g. a line without a colon
)


def _both(block: bytes) -> tuple[list[tuple[str, str]], list[tuple[str, str]], bytes, bytes]:
    theirs_fp, ours_fp = io.BytesIO(block), io.BytesIO(block)
    theirs = http.client.parse_headers(theirs_fp)
    ours = parse_headers(ours_fp)
    for name in {*(name for name, _ in theirs.items()), "absent"}:
        for spelled in (name, name.lower(), name.upper()):
            assert ours.first.get(spelled.lower()) == theirs.get(spelled), spelled
            assert ours.get(spelled) == theirs.get(spelled), spelled
    return list(ours.items()), list(theirs.items()), ours_fp.read(), theirs_fp.read()


@settings(max_examples=400, deadline=None)
@given(st.lists(_LINE, max_size=8), st.sampled_from(["\r\n", "\n"]))
def test_every_header_block_parses_as_http_client_parses_it(lines: list[str], eol: str) -> None:
    block = "".join(line + eol for line in lines) + eol + "body"
    ours, theirs, ours_rest, theirs_rest = _both(block.encode("iso-8859-1"))
    assert ours == theirs
    assert ours_rest == theirs_rest, "the same lines are consumed"


def test_an_s3_response_and_its_lookups() -> None:
    block = (b"x-amz-id-2: abc\r\nETag: \"9b2cf535f27731c974343645a3985328\"\r\n"
             b"Content-Length: 262144\r\ncontent-length: 1\r\nLast-Modified: Fri, 27 Nov 2026 "
             b"00:00:00 GMT\r\nX-Folded: one\r\n two\r\n\r\n")
    ours, theirs, _, _ = _both(block)
    assert ours == theirs
    message = parse_headers(io.BytesIO(block))
    assert isinstance(message, http.client.HTTPMessage)
    assert message.get("etag") == '"9b2cf535f27731c974343645a3985328"'
    assert message.get_all("Content-Length") == ["262144", "1"]


@pytest.mark.parametrize("block, error", [
    (b"A: " + b"x" * 70_000 + b"\r\n\r\n", http.client.LineTooLong),
    (b"".join(b"H%d: v\r\n" % i for i in range(101)) + b"\r\n", http.client.HTTPException),
])
def test_limits_on_header_lines_and_count_are_http_clients(block: bytes, error: type) -> None:
    with pytest.raises(error):
        parse_headers(io.BytesIO(block))
