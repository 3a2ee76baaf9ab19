"""Run a function on N gloo ranks (torch.multiprocessing's spawn) and collect each rank's JSON result.

`run(world, "module:function", *args)` starts N processes that join a fresh gloo group, call
`function(rank, world, *args)` and write its return value (JSON) to a file; a rank that raises
writes its traceback instead. The whole run is bounded by `timeout` seconds: a hang fails the test.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from datetime import timedelta

import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, target: str, args: tuple, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    sys.path.insert(0, HERE)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # N ranks share 2 cores
    out = os.path.join(out_dir, f"rank{rank}.json")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=90))
        module, fn = target.split(":")
        result = getattr(importlib.import_module(module), fn)(rank, world, *args)
        with open(out, "w") as f:
            json.dump({"ok": True, "result": result}, f)
        dist.destroy_process_group()
    except BaseException:  # report everything to the test, then end at once
        with open(out, "w") as f:
            json.dump({"ok": False, "error": traceback.format_exc()}, f)
        sys.stderr.flush()
        os._exit(1)


def run(world: int, target: str, *args, timeout: float = 150.0) -> list:
    """Each rank's result, in rank order; AssertionError naming the rank on an error or a hang."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        procs = [ctx.Process(target=_entry, args=(r, world, port, target, args, out_dir)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results, failures = [], []
        for r in range(world):
            path = os.path.join(out_dir, f"rank{r}.json")
            if not os.path.exists(path):
                failures.append((2, f"rank {r} wrote no result (hung: {hung}, exit code {procs[r].exitcode})"))
                continue
            with open(path) as f:
                data = json.load(f)
            if data["ok"]:
                results.append(data["result"])
            else:  # a rank whose peer crashed says so: show the crash first
                failures.append((int("by peer" in data["error"]), f"rank {r} failed:\n{data['error']}"))
        if failures:
            raise AssertionError(min(failures)[1])
        assert not hung, f"ranks {hung} did not finish within {timeout}s"
        return results
