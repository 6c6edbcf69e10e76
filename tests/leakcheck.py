"""A pytest plugin: the session fails when a process any test started outlives it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.procs import become_subreaper, kill_leftovers


def pytest_configure(config: pytest.Config) -> None:
    become_subreaper()


@pytest.fixture(scope="session", autouse=True)
def _no_process_left_behind() -> Iterator[None]:
    yield
    left = kill_leftovers()
    assert not left, f"processes left running by the tests (now killed): {left}"
