"""The process mesh from torchrun's environment: rank, world size, device, and the TP / EP groups.

`torchrun --nproc-per-node N` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
`init_mesh` joins the process group (gloo on CPU, nccl on CUDA) and builds the groups. Layouts:
tensor parallel over T ranks and expert parallel over E ranks, T and E each 1 or N (T = E = N is
the official layout: heads and experts split over the same ranks). Without WORLD_SIZE (or with 1)
the mesh is a single process and nothing is initialised.

A rank that fails must not leave the others waiting in a collective: `run_or_exit` prints the
error and ends the process at once (`os._exit`), so its sockets close and every peer's pending
collective fails in turn (and torchrun tears the group down); the process group's timeout
(`DSV3_DIST_TIMEOUT`, seconds) bounds the wait for a rank that hangs instead of failing.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from ..errors import ConfigError, DsV3Error

DEFAULT_TIMEOUT_S = 1800.0  # long enough for a rank to read its shards of a large checkpoint
_CONFIG_ERROR_GRACE_S = 3.0


@dataclass(frozen=True)
class Mesh:
    """Where this process sits: its rank, the device it computes on, and its TP / EP groups (None = size 1)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    tp: int
    ep: int
    tp_group: ProcessGroup | None
    ep_group: ProcessGroup | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def check_layout(world_size: int, tp: int, ep: int) -> None:
    """Raise ConfigError unless tp and ep are each 1 or the world size."""
    for name, value in (("tp", tp), ("ep", ep)):
        if not isinstance(value, int) or isinstance(value, bool) or value not in (1, world_size):
            raise ConfigError(f"--{name} must be 1 or the number of processes ({world_size}), got {value!r}")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def launched_world_size() -> int:
    """How many processes torchrun launched (WORLD_SIZE); 1 without torchrun. Read before any group exists."""
    return _env_int("WORLD_SIZE", 1)


def timeout_from_env() -> float:
    value = os.environ.get("DSV3_DIST_TIMEOUT", "")
    try:
        return float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ConfigError(f"DSV3_DIST_TIMEOUT={value!r} is not a number of seconds") from None


def init_mesh(
    tp: int | None = None,
    ep: int | None = None,
    device: str | torch.device | None = None,
    timeout_s: float | None = None,
) -> Mesh:
    """Join the process group described by torchrun's environment and build the TP / EP groups.

    tp / ep default to the world size (the official layout). `device` defaults to cuda:LOCAL_RANK
    when CUDA is available, else cpu; the backend follows it (nccl for CUDA, gloo for CPU).
    Already initialised (a test's own `init_process_group`) is fine: the existing group is used.
    """
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    else:
        world, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    tp = world if tp is None else tp
    ep = world if ep is None else ep
    check_layout(world, tp, ep)
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s if timeout_s is not None else timeout_from_env())
        dist.init_process_group(backend=backend, timeout=timeout)
    # T and E are each 1 or N, so a group is either the whole world or absent: no sub-groups to build.
    whole = dist.group.WORLD if world > 1 else None
    return Mesh(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        device=device,
        tp=tp,
        ep=ep,
        tp_group=whole if tp > 1 else None,
        ep_group=whole if ep > 1 else None,
    )


def _is_peer_failure(e: BaseException) -> bool:
    """A collective that failed because another rank went away or timed out (not this rank's own fault)."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset", "Timed out", "timed out", "gloo", "NCCL")
    )


def run_or_exit(fn: Callable[[], int], prog: str) -> int:
    """Run one rank's command; in a multi-process run, any error ends this process at once with a message.

    Single process (WORLD_SIZE unset or 1): just `fn()`, errors propagate to the CLI as usual.
    Otherwise a DsV3Error is one line (for a ConfigError, which every rank hits identically, ranks
    other than 0 wait a moment first, so under torchrun it is said once), a failed collective is one
    line naming the likely cause, anything else a traceback; then `os._exit` (exit code 2 for user
    errors, 1 otherwise) without the interpreter's shutdown, which could wait on a process group
    whose peers are gone. Success waits for every rank (a barrier) and ends the same way: in a
    multi-process run this function does not return.
    """
    # Before init_process_group the environment says whether this is one rank of many.
    world = dist.get_world_size() if dist.is_initialized() else _env_int("WORLD_SIZE", 1)
    if world == 1:
        return fn()
    rank = dist.get_rank() if dist.is_initialized() else _env_int("RANK", 0)
    try:
        code = fn()
    except BaseException as e:  # every failure must end the rank, KeyboardInterrupt included
        if isinstance(e, DsV3Error):
            if rank != 0 and isinstance(e, ConfigError):
                # Every rank hits a config error the same way: give rank 0 a moment to say it once
                # (torchrun ends the others when it exits); say it anyway if still here.
                time.sleep(_CONFIG_ERROR_GRACE_S)
            print(f"{prog}: error: {'' if rank == 0 else f'[rank {rank}] '}{e}", file=sys.stderr)
            code = 2
        elif _is_peer_failure(e):
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(
                f"{prog}: error: [rank {rank}] a collective failed, another rank has probably failed "
                f"(see its message): {first}",
                file=sys.stderr,
            )
            code = 1
        else:
            print(f"{prog}: error: [rank {rank}] {type(e).__name__}: {e}", file=sys.stderr)
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    # Success: wait for every rank, then leave the same way. Tearing the group down in the
    # interpreter's shutdown can abort ("terminate called without an active exception") when the
    # rank hosting the store has already gone.
    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
