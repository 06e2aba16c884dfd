"""Loaded by every Python process of a shifted-clock run (tests/calendar puts
this folder on PYTHONPATH), before anything else.

libfaketime 0.9.10 (Debian 12), with the monotonic clock left real
(`FAKETIME_DONT_FAKE_MONOTONIC=1`, without which every timed wait on a
thread lock hangs), fails `clock_nanosleep` on the monotonic clock with
EINVAL, and that is what `time.sleep` calls. A timed wait on an event that
is never set sleeps as long and is not intercepted.
"""

import os
import threading
import time

if "FAKETIME" in os.environ:
    def _sleep_by_waiting(seconds: float) -> None:
        threading.Event().wait(seconds)

    time.sleep = _sleep_by_waiting
