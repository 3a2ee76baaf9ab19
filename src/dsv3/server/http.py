"""The HTTP server's connection limits: uvicorn's settings plus a header timeout uvicorn lacks.

uvicorn closes an idle keep-alive connection after `timeout_keep_alive`, but any byte received resets
that timer and a fresh connection has none: a client that opens connections and sends nothing, or
trickles its headers a byte at a time (slowloris), holds them forever. `HeaderTimeoutH11Protocol`
closes a connection whose request headers have not all arrived within `header_timeout_s` of its
opening (or of the previous response, plus the keep-alive allowance). The body has its own limit in
the app (`ServerLimits.body_timeout_s`, 408), and `max_connections` caps open connections (uvicorn's
`limit_concurrency`: past it, requests are answered 503).
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .app import ServerLimits


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections that do not finish a request's headers in time."""

    header_timeout_s = 10.0  # set per server by `uvicorn_config` (a subclass per config)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer(self.header_timeout_s)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self._cancel_header_timer()  # a request's headers are in: the app (and its body timeout) takes over

    def on_response_complete(self) -> None:
        # Armed before the base class looks for a pipelined request, whose arrival cancels it again.
        self._arm_header_timer(self.timeout_keep_alive + self.header_timeout_s)
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self, seconds: float) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(seconds, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        busy = self.cycle is not None and not self.cycle.response_complete
        if not busy and not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(app: Any, limits: ServerLimits, **kwargs: Any) -> uvicorn.Config:
    """A uvicorn.Config for `app` with `limits`' timeouts and connection cap (h11, the header timeout on)."""
    protocol = type("HeaderTimeoutH11", (HeaderTimeoutH11Protocol,), {"header_timeout_s": limits.header_timeout_s})
    return uvicorn.Config(
        app,
        http=protocol,
        limit_concurrency=limits.max_connections,
        timeout_keep_alive=limits.keep_alive_s,
        **kwargs,
    )
