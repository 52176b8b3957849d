"""Waiting in tests: on a readiness signal (an event, a printed line, a state the code reports), never on the
clock. Each wait has a ceiling, so that a hung process fails the test instead of hanging the suite; the
ceiling is one a slow or busy machine never reaches, so it cannot turn slowness into a failure."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")

CEILING_S = 900.0  # a quarter of an hour: only a hung process or thread takes this long
CEILING_MS = int(CEILING_S * 1000)  # the same, for Playwright


def wait_until(predicate: Callable[[], T], what: str, poll_s: float = 0.01) -> T:
    """Return ``predicate()``'s first true value; fail naming ``what`` if it is still false at the ceiling."""
    end = time.monotonic() + CEILING_S
    while not (value := predicate()):
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what} after {CEILING_S:.0f} s: something hung")
        time.sleep(poll_s)
    return value
