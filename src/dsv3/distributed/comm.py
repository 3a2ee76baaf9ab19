"""The collectives the parallel wrappers use, each counting the bytes this rank sends.

`CommStats` is the one ledger: `apply_tp` / `apply_ep` hand the same instance to every wrapper, so
`stats.reset()` before a decode step and `stats.report()` after it give the bytes moved per step.

What "bytes sent" means, per rank (the payload only; headers and the transport's own copies aside):
- all_reduce of n bytes over R ranks: 2 (R-1)/R * n, what a ring all-reduce sends (reduce-scatter
  then all-gather); gloo and NCCL both use rings or trees of about that volume for large tensors;
- all_gather of a local chunk of n bytes: (R-1) * n (the chunk reaches every other rank);
- all_to_all: the rows this rank sends to the OTHER ranks (its own rows never leave it).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


class CommStats:
    """Bytes sent and calls made by this rank, per kind of collective (e.g. "tp.all_reduce")."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes[kind] += int(nbytes)
        self.calls[kind] += 1

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {k: {"bytes": self.bytes[k], "calls": self.calls[k]} for k in sorted(self.bytes)}

    def report(self) -> str:
        """One line per kind: bytes sent by this rank and the number of calls, then the total."""
        rows = [f"{k:<22} {self.bytes[k]:>14,} bytes in {self.calls[k]:>5} calls" for k in sorted(self.bytes)]
        rows.append(f"{'total':<22} {self.total_bytes:>14,} bytes")
        return "\n".join(rows)


def group_size(group: ProcessGroup | None) -> int:
    return dist.get_world_size(group) if group is not None else 1


def group_rank(group: ProcessGroup | None) -> int:
    return dist.get_rank(group) if group is not None else 0


def all_reduce_(t: torch.Tensor, group: ProcessGroup, stats: CommStats | None, kind: str) -> torch.Tensor:
    """Sum `t` over the group in place and return it."""
    R = dist.get_world_size(group)
    if R == 1:
        return t
    if stats is not None:
        stats.add(kind, 2 * (R - 1) * t.numel() * t.element_size() // R)
    dist.all_reduce(t, group=group)
    return t


def all_gather_cat(t: torch.Tensor, dim: int, group: ProcessGroup, stats: CommStats | None, kind: str) -> torch.Tensor:
    """Every rank's `t` (same shape on all ranks) concatenated along `dim`, in rank order."""
    R = dist.get_world_size(group)
    if R == 1:
        return t
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(R)]
    if stats is not None:
        stats.add(kind, (R - 1) * t.numel() * t.element_size())
    dist.all_gather(parts, t, group=group)
    return torch.cat(parts, dim=dim)


def all_to_all_rows(
    send: torch.Tensor,
    send_counts: list[int],
    recv_counts: list[int],
    group: ProcessGroup,
    stats: CommStats | None,
    kind: str,
) -> torch.Tensor:
    """Rows send[sum(send_counts[:r]) : ...] go to rank r; returns the rows received, in rank order."""
    me = dist.get_rank(group)
    recv = send.new_empty((sum(recv_counts), *send.shape[1:]))
    if stats is not None:
        row = math.prod(send.shape[1:]) * send.element_size()
        stats.add(kind, row * (sum(send_counts) - send_counts[me]))
    dist.all_to_all_single(recv, send.contiguous(), recv_counts, send_counts, group=group)
    return recv
