"""One bounded poll for every wait in the tests: no open-ended loops, no fixed sleeps."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 30.0,
    what: str = "condition",
    *,
    interval: float = 0.05,
    ignore: tuple[type[Exception], ...] = (),
    details: Callable[[], str] | None = None,
) -> T:
    """Poll `predicate` until it returns something truthy, and return that; fail after `timeout` seconds.

    Exceptions of the `ignore` types count as "not yet" (a port that does not answer yet); any other
    exception, e.g. an AssertionError raised because the process under test has exited, ends the wait at
    once. `details` is called only on failure, to add e.g. the logs of what was waited for.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            result = predicate()
        except ignore as err:
            last = err
        else:
            if result:
                return result
            last = result
        if time.monotonic() > deadline:
            message = f"timed out after {timeout} s waiting for {what} (last: {last!r})"
            if details is not None:
                message += "\n" + details()
            raise AssertionError(message)
        time.sleep(interval)
