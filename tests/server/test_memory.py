"""The server's memory helpers: the idle trimmer trims once per idle period after work, never while busy."""

from __future__ import annotations

import time

from dsv3.server import memory


def wait_until(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_idle_trimmer_trims_once_per_idle_period(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "trim", lambda: calls.append(time.monotonic()) or True)
    state = {"busy": True, "served": 0}
    trimmer = memory.IdleTrimmer(lambda: state["busy"], lambda: state["served"], idle_s=0.2).start()
    try:
        time.sleep(0.6)
        assert calls == []  # busy: never
        state.update(busy=False, served=3)
        assert wait_until(lambda: len(calls) == 1)
        time.sleep(0.8)
        assert len(calls) == 1  # nothing served since: no second trim
        state["served"] = 4
        assert wait_until(lambda: len(calls) == 2)
    finally:
        trimmer.close()


def test_glibc_calls_work_here():
    # The test machines run glibc: the calls must exist and not fail.
    assert memory._glibc() is not None
    assert memory.limit_arenas(8) is True
    memory.trim()
