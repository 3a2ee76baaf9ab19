"""Memory the server gives back: fewer glibc malloc arenas, and free heap returned to the OS when idle.

glibc gives each thread that allocates its own arena (up to 8 per core), and an arena's freed pages
stay mapped: after bursts of requests, tokenizer, threadpool and engine threads leave many partly
used arenas, so the server's RSS climbs and never comes down. `limit_arenas(n)` caps the arenas for
threads started afterwards (mallopt M_ARENA_MAX, what the MALLOC_ARENA_MAX variable sets at start);
`IdleTrimmer` calls malloc_trim(0) once the engine has been idle for a while after serving requests.
On a C library other than glibc both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Callable

_M_ARENA_MAX = -8  # from glibc's malloc.h


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018  (glibc has both; musl and macOS do not)
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def limit_arenas(n: int) -> bool:
    """Cap glibc's malloc arenas at `n` for threads started from now on; False when not glibc."""
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(_M_ARENA_MAX, int(n)))


def trim() -> bool:
    """Return free heap memory to the OS (malloc_trim(0)); True when some was released."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))


class IdleTrimmer:
    """A daemon thread: trims the heap once per idle period, after `idle_s` seconds without work.

    `busy()` says whether requests are running or waiting; `served()` is a counter that grows with
    each finished request (a trim is due only when it moved since the last one).
    """

    def __init__(self, busy: Callable[[], bool], served: Callable[[], int], idle_s: float = 10.0) -> None:
        self.busy, self.served, self.idle_s = busy, served, idle_s
        self.trims = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dsv3-trim", daemon=True)

    def start(self) -> IdleTrimmer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        trimmed_at, idle_since_count, quiet = -1, -1, 0.0
        step = min(1.0, self.idle_s)
        while not self._stop.wait(step):
            count = self.served()
            if self.busy() or count != idle_since_count:
                idle_since_count, quiet = count, 0.0
                continue
            quiet += step
            if quiet >= self.idle_s and count != trimmed_at:
                trim()
                self.trims += 1
                trimmed_at = count
