"""Calibration state: the hidden states of every calibration row between two modules.

The first ``gpu_rows`` rows stay on the compute device, the rest in host memory and move over one
at a time (``-gr``), trading speed for device memory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from exl2core.pipeline.job import load_tensors, save_tensors


class HiddenStates:
    def __init__(self, rows: list[torch.Tensor], device: torch.device, gpu_rows: int | None = None):
        self.device = torch.device(device)
        self.gpu_rows = len(rows) if gpu_rows is None else gpu_rows
        self.rows = [self._place(i, r) for i, r in enumerate(rows)]

    def _place(self, i: int, row: torch.Tensor) -> torch.Tensor:
        return row.to(self.device if i < self.gpu_rows else "cpu")

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, i: int) -> torch.Tensor:
        """Row ``i`` as ``[1, T, ...]`` on the compute device."""
        return self.rows[i].to(self.device).unsqueeze(0)

    def replaced(self, outputs: list[torch.Tensor]) -> "HiddenStates":
        return HiddenStates([o.squeeze(0) for o in outputs], self.device, self.gpu_rows)

    def save(self, path: str | Path, reference: "HiddenStates | None" = None) -> None:
        """Save the rows, and ``reference`` (the unquantized model's states, asymmetric fit) beside them."""
        tensors = {"hidden": torch.stack([r.cpu() for r in self.rows])}
        if reference is not None:
            tensors["reference"] = torch.stack([r.cpu() for r in reference.rows])
        save_tensors(path, tensors)

    @classmethod
    def load(cls, path: str | Path, device: torch.device, gpu_rows: int | None = None) -> "HiddenStates":
        return cls(list(load_tensors(path)["hidden"].unbind(0)), device, gpu_rows)

    @classmethod
    def load_with_reference(cls, path: str | Path, device: torch.device,
                            gpu_rows: int | None = None) -> "tuple[HiddenStates, HiddenStates | None]":
        """The saved rows and the reference rows saved beside them (None if there are none)."""
        tensors = load_tensors(path)
        reference = tensors.get("reference")
        return (cls(list(tensors["hidden"].unbind(0)), device, gpu_rows),
                None if reference is None else cls(list(reference.unbind(0)), device, gpu_rows))
