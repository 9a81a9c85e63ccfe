"""Index tables that let a CUDA thread find its group without walking ``q_groups``.

The kernels address codes by (permuted row, column) or by (packed word row, column). These tables map
each of those rows, and each 32-row chunk the matmul walks, to its group's width and start offsets,
all as int32 tensors on the target device (built once per call from the host-side group layout);
``prepare_matrix`` builds them, with the validated tensors, once per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from exl2core.errors import Exl2Error

#: Above this many rows of ``x`` the fused matmul stops paying off: ``exl2_matmul`` then rebuilds the
#: fp16 weight once (dequantize kernel) and uses a dense GEMM, as exllamav2 does for long inputs.
FUSED_MATMUL_MAX_ROWS = 64

_WORD = 32
#: Rows per chunk of the matmul kernel: every group size is a multiple of 32, so a chunk never straddles
#: two groups and its codes fill exactly ``bits`` words per column.
CHUNK_ROWS = 32


@dataclass
class GroupTables:
    """Per-group starts and per-row / per-word / per-chunk group indices (all int32, one device)."""

    bits: torch.Tensor  # [G] bit width
    row_start: torch.Tensor  # [G] first permuted row
    qrow_start: torch.Tensor  # [G] first packed row of q_weight
    row_group: torch.Tensor  # [K] group of each permuted row
    word_group: torch.Tensor  # [Q] group of each packed row
    rows: int
    packed_rows: int

    def chunk_group(self) -> torch.Tensor | None:
        """Group of each 32-row chunk, or None unless every group is a multiple of 32 rows (the fused
        matmul's requirement, which every layout the 0.3.2 loader accepts meets)."""
        if self.rows % CHUNK_ROWS or torch.any(self.row_start % CHUNK_ROWS).item():
            return None
        return self.row_group[::CHUNK_ROWS].contiguous()


def group_tables(group_bits: list[int], group_rows: list[int], device: torch.device) -> GroupTables:
    """Tables for a layout given as group widths and row counts (the form ``pack.group_layout`` returns)."""
    bits = torch.tensor(group_bits, dtype=torch.int64)
    rows = torch.tensor(group_rows, dtype=torch.int64)
    qrows = rows * bits // _WORD
    index = torch.arange(len(group_bits))
    tables = {
        "bits": bits,
        "row_start": torch.cumsum(rows, 0) - rows,
        "qrow_start": torch.cumsum(qrows, 0) - qrows,
        "row_group": torch.repeat_interleave(index, rows),
        "word_group": torch.repeat_interleave(index, qrows),
    }
    on_device = {name: t.to(device=device, dtype=torch.int32) for name, t in tables.items()}
    return GroupTables(**on_device, rows=int(rows.sum()), packed_rows=int(qrows.sum()))


@dataclass
class PreparedMatrix:
    """One EXL2 layer's device-side tables, built once for repeated ``exl2_matmul``/``dequantize`` calls."""

    tensors: dict[str, torch.Tensor]
    tables: GroupTables
    invperm: torch.Tensor  # int32 [K]
    perm: torch.Tensor  # int32 [K], argsort(invperm)
    scale_max: torch.Tensor  # fp16 [G], q_scale_max · prescale / 256 (the loader's fp16 multiply)
    prescale: float


def prepare_matrix(tensors: dict[str, torch.Tensor], prescale: float = 1.0) -> PreparedMatrix:
    """Validate an EXL2 tensor set (as the 0.3.2 loader would) and build its tables on its device."""
    from exl2core.quant.pack import check_tensors, group_layout

    check_tensors(tensors)
    q_weight = tensors["q_weight"]
    device = q_weight.device
    group_bits, group_rows = group_layout(tensors["q_groups"], q_weight.shape[0])
    tables = group_tables(group_bits, group_rows, device)
    invperm = tensors["q_invperm"].to(device=device, dtype=torch.int64)
    if invperm.numel() != tables.rows or not torch.equal(invperm.sort().values,
                                                         torch.arange(tables.rows, device=device)):
        raise Exl2Error(f"q_invperm is not a permutation of the {tables.rows} rows described by q_groups")
    scale_max = tensors["q_scale_max"].to(device) * (prescale / 256)
    return PreparedMatrix(tensors, tables, invperm.to(torch.int32), torch.argsort(invperm).to(torch.int32),
                          scale_max.contiguous(), prescale)
