"""One conversion on N torch.distributed ranks; a single process is the N = 1 case of the same calls.

Launched by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` /
``MASTER_PORT`` in the environment) the ranks join one process group: gloo for a CPU job, nccl for a CUDA
one (rank on ``cuda:LOCAL_RANK``). Without those variables, or with ``WORLD_SIZE=1``, every collective
is a no-op. A lost peer, or a collective that waits longer than ``EXL2_DIST_TIMEOUT`` seconds, raises
:class:`PeerLost`, which the command line prints as one line.
"""

from __future__ import annotations

import math
import os
import pickle
import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from exl2core.errors import Exl2Error

#: Seconds a collective may wait for the other ranks (a hung peer) before the job stops.
TIMEOUT_ENV = "EXL2_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 1800.0

T = TypeVar("T")


class PeerLost(Exl2Error):
    """Another rank died or stopped answering: this one stops too, and the job resumes from a rerun."""


class AgreedError(Exl2Error):
    """An error every rank raises together (:meth:`Ranks.agree`): rank 0 alone prints it."""


@dataclass
class Ranks:
    """This process's place among the ranks of a job, and the collectives the pipeline needs."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives run
    #: Bytes this rank has sent to the others (tensors and pickled objects), for the benchmarks.
    sent: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: it alone writes the job directory and shows progress."""
        return self.rank == 0

    def rows(self, count: int, rank: int | None = None) -> range:
        """The contiguous share of ``count`` calibration rows of this rank (or of ``rank``); earlier rows
        go to earlier ranks."""
        rank = self.rank if rank is None else rank
        return range(count * rank // self.world, count * (rank + 1) // self.world)

    def barrier(self) -> None:
        if self.world > 1:
            self._run(lambda: dist.barrier())

    def broadcast(self, obj: T, src: int = 0) -> T:
        """``obj`` of rank ``src`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj if self.rank == src else None]
        if self.rank == src:
            self.sent += _size(obj) * (self.world - 1)
        self._run(lambda: dist.broadcast_object_list(box, src=src, device=self.device))
        return box[0]

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order (small objects: settings, counts, per-row floats)."""
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        self.sent += _size(obj) * (self.world - 1)
        self._run(lambda: dist.all_gather_object(out, obj))
        return out

    def share(self, tensors: dict[Any, torch.Tensor],
              to: Callable[[Any], frozenset[int] | None] | None = None) -> dict[Any, torch.Tensor]:
        """The union of every rank's ``tensors`` (keys disjoint between ranks) on every rank, on
        ``device``, ordered by rank then key order. With ``to``, a key for which ``to(key)`` names ranks
        goes only to those (point to point; its sender keeps it too), a key it maps to None to all."""
        if self.world == 1:
            return dict(tensors)
        out: dict[Any, torch.Tensor] = {}
        for src, key, shape, dtype in self._listing(tensors):
            ranks = None if to is None else to(key)
            if ranks is None:
                if src == self.rank:
                    buf = _as_bytes(tensors[key].to(self.device))
                    self.sent += buf.numel() * (self.world - 1)
                else:
                    buf = torch.empty(_nbytes(shape, dtype), dtype=torch.uint8, device=self.device)
                self._run(lambda: dist.broadcast(buf, src=src))
            elif src == self.rank:
                buf = _as_bytes(tensors[key].to(self.device))
                for dst in sorted(ranks - {src}):
                    self.sent += buf.numel()
                    self._run(lambda: dist.send(buf, dst=dst))
            elif self.rank in ranks:
                buf = torch.empty(_nbytes(shape, dtype), dtype=torch.uint8, device=self.device)
                self._run(lambda: dist.recv(buf, src=src))
            else:
                continue
            out[key] = buf.view(dtype).reshape(shape)
        return out

    def gather(self, tensors: dict[Any, torch.Tensor]) -> dict[Any, torch.Tensor] | None:
        """Every rank's ``tensors`` on rank 0 (in host memory), None elsewhere: a checkpoint's rows."""
        if self.world == 1:
            return dict(tensors)
        out: dict[Any, torch.Tensor] = {}
        for src, key, shape, dtype in self._listing(tensors):
            if src == self.rank == 0:
                out[key] = tensors[key].cpu()
            elif src == self.rank:
                buf = _as_bytes(tensors[key].to(self.device))
                self.sent += buf.numel()
                self._run(lambda: dist.send(buf, dst=0))
            elif self.main:
                buf = torch.empty(_nbytes(shape, dtype), dtype=torch.uint8, device=self.device)
                self._run(lambda: dist.recv(buf, src=src))
                out[key] = buf.view(dtype).reshape(shape).cpu()
        return out if self.main else None

    def _listing(self, tensors: dict[Any, torch.Tensor]) -> list[tuple[int, Any, tuple[int, ...], torch.dtype]]:
        """``(rank, key, shape, dtype)`` of every rank's tensors, the same list on every rank."""
        listed = self.all_gather([(key, tuple(t.shape), t.dtype) for key, t in tensors.items()])
        return [(src, *entry) for src, entries in enumerate(listed) for entry in entries]

    def agree(self, work: Callable[[], T], *, everywhere: bool = True) -> T | None:
        """Run ``work`` (on every rank, or with ``everywhere=False`` on rank 0 only, None elsewhere) and
        make an :class:`Exl2Error` it raises on any rank the same :class:`AgreedError` on all ranks, instead
        of the others waiting for a rank that has gone."""
        result, failure = None, None
        if everywhere or self.main:
            try:
                result = work()
            except PeerLost:
                raise
            except Exl2Error as e:
                if self.world == 1:
                    raise
                failure = str(e)
        for rank, message in enumerate(self.all_gather(failure)):
            if message is not None:
                raise AgreedError(message if rank == 0 else f"rank {rank}: {message}")
        return result

    def _run(self, collective: Callable[[], object]) -> None:
        try:
            collective()
        except (RuntimeError, dist.DistError) as e:
            raise PeerLost(peer_lost_message(self.rank, e)) from None


def peer_lost_message(rank: int, e: BaseException) -> str:
    """One line for a failed collective: a timeout, or a lost peer, with the backend's first words."""
    text = " ".join(re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\]", "", str(e)).split())
    timeout = "timeout" in text.lower() or "timed out" in text.lower()
    why = "no answer from another rank within the collective timeout" if timeout else "another rank was lost"
    return (f"rank {rank} stopped ({why}: {text[:100]}); rerun the same command, with any number of ranks, "
            "to resume")


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as a flat uint8 tensor: the backends do not all carry every dtype (gloo: int16)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _size(obj: object) -> int:
    """Bytes ``obj`` pickles to (what an object collective sends)."""
    return len(pickle.dumps(obj))


SINGLE = Ranks()


def join(device: str) -> Ranks:
    """This process's ranks: the process group torchrun's environment describes (joined here, with the
    threads set to this rank's share of the cores), or a single rank without one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // local_world))
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)
    try:
        timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
    except ValueError:
        raise Exl2Error(f"{TIMEOUT_ENV} must be a number of seconds, not {os.environ[TIMEOUT_ENV]!r}") from None
    try:
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout))
    except (RuntimeError, ValueError, dist.DistError) as e:
        raise Exl2Error(f"rank {rank} could not join the other {world - 1} ranks ({e})") from None
    return Ranks(rank, world, torch.device("cuda", local_rank) if cuda else torch.device("cpu"))


def leave(ranks: Ranks) -> None:
    """Leave the process group (after the job, whether it finished or failed on this rank)."""
    if ranks.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
