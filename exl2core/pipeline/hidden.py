"""Calibration state: the hidden states of every calibration row between two modules.

The first ``gpu_rows`` rows stay on the compute device, the rest in host memory and move over one
at a time (``-gr``), trading speed for device memory. On several ranks each holds its own contiguous
share of the rows (``RowShard``); a checkpoint gathers them into one file that any number of ranks reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from exl2core.distributed import SINGLE, Ranks
from exl2core.pipeline.job import save_tensors


@dataclass(frozen=True)
class RowShard:
    """Which calibration rows a rank holds: ``first`` … ``first + len - 1`` of ``total``, shared among ``ranks``."""

    ranks: Ranks
    first: int
    total: int


class HiddenStates:
    def __init__(self, rows: list[torch.Tensor], device: torch.device, gpu_rows: int | None = None,
                 shard: RowShard | None = None):
        self.device = torch.device(device)
        self.gpu_rows = len(rows) if gpu_rows is None else gpu_rows
        self.rows = [self._place(i, r) for i, r in enumerate(rows)]
        self.shard = shard or RowShard(SINGLE, 0, len(rows))

    def _place(self, i: int, row: torch.Tensor) -> torch.Tensor:
        return row.to(self.device if i < self.gpu_rows else "cpu")

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def first(self) -> int:
        """The calibration row index of ``rows[0]`` (0 unless the rows are shared among ranks)."""
        return self.shard.first

    def row(self, i: int) -> torch.Tensor:
        """Row ``i`` as ``[1, T, ...]`` on the compute device."""
        return self.rows[i].to(self.device).unsqueeze(0)

    def replaced(self, outputs: list[torch.Tensor]) -> "HiddenStates":
        return HiddenStates([o.squeeze(0) for o in outputs], self.device, self.gpu_rows, self.shard)

    def save(self, path: str | Path, reference: "HiddenStates | None" = None) -> None:
        """Save the rows, and ``reference`` (the unquantized model's states, asymmetric fit) beside them;
        on several ranks every rank calls this and rank 0 writes all rows."""
        streams = {"hidden": self} if reference is None else {"hidden": self, "reference": reference}
        gathered = self.shard.ranks.gather({(name, s.first + i): r for name, s in streams.items()
                                            for i, r in enumerate(s.rows)})
        if gathered is not None:
            save_tensors(path, {name: torch.stack([gathered[(name, i)] for i in range(self.shard.total)])
                                for name in streams})

    @classmethod
    def load(cls, path: str | Path, device: torch.device, gpu_rows: int | None = None,
             ranks: Ranks = SINGLE) -> "HiddenStates":
        """This rank's share of the rows saved in ``path``."""
        return cls.load_with_reference(path, device, gpu_rows, ranks)[0]

    @classmethod
    def load_with_reference(cls, path: str | Path, device: torch.device, gpu_rows: int | None = None,
                            ranks: Ranks = SINGLE) -> "tuple[HiddenStates, HiddenStates | None]":
        """This rank's share of the saved rows and of the reference rows saved beside them (None if none)."""
        with safe_open(str(path), "pt") as f:
            total = f.get_slice("hidden").get_shape()[0]
            share = ranks.rows(total)
            shard = RowShard(ranks, share.start, total)

            def read(name: str) -> HiddenStates:
                rows = f.get_slice(name)[share.start:share.stop]
                return cls(list(rows.unbind(0)), device, gpu_rows, shard)

            return read("hidden"), read("reference") if "reference" in f.keys() else None
