"""Fixtures shared by the integration tests (see tests/helpers.py)."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

# The tests import their support module as a plain module.
sys.path.insert(0, str(Path(__file__).parent))

from helpers import Cleanup, Keys, make_keys, reactor_snapshot, wait_reactor_clean


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    """A PSK, a second (wrong) PSK and a self-signed certificate, made once per run."""
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest_twisted.async_yield_fixture
async def cleanup() -> AsyncIterator[Cleanup]:
    """Runs the test's teardown steps, then checks that nothing went wrong unseen.

    The reactor must be back where it was (no delayed call, socket or
    listener left), and nothing may have logged a failure: an exception in
    a protocol callback is only logged by Twisted ("Unhandled Error"), and
    the connection it kills can look like a deliberate close to a test.
    """
    baseline = reactor_snapshot()
    failures: list[str] = []

    def observer(event: LogEvent) -> None:
        # Legacy twisted.python.log.err events carry "failure"/"isError" instead.
        failure = event.get("log_failure", event.get("failure"))
        if failure is not None or event.get("isError"):
            traceback = failure.getTraceback() if failure is not None else ""
            failures.append(f"{formatEvent(event)}\n{traceback}")

    globalLogPublisher.addObserver(observer)
    steps = Cleanup()
    try:
        yield steps
        await steps.run()
        await wait_reactor_clean(baseline)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert not failures, "failures were logged:\n" + "\n".join(failures)


@pytest.fixture
def log_messages() -> Iterator[list[str]]:
    """Every message logged through twisted.logger during the test, formatted."""
    messages: list[str] = []

    def observer(event: LogEvent) -> None:
        messages.append(formatEvent(event) or "")

    globalLogPublisher.addObserver(observer)
    try:
        yield messages
    finally:
        globalLogPublisher.removeObserver(observer)
