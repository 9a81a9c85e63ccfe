"""Coordinate descent over GPTQ's codes (QuantEase, arXiv 2309.01885), at the group scales GPTQ chose.

GPTQ visits each row of ``W_p`` once and never revisits a choice after later rows moved to compensate.
Here every row in turn is given, per output column, the code nearest its exact minimiser of
``tr((Q − W)ᵀ H (Q − W))`` with all other rows held: the loss is a separable quadratic in that row
(``H_ii (q − c)²`` per column), so the nearest grid point is the row's exact optimum and a sweep never
raises the loss. Codes change, nothing else does: scales, group layout and sizes stay as packed, so the
result is the same EXL2 tensors with other codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from exl2core.quant.rounding import quantize_rows


@dataclass(frozen=True)
class GroupGrid:
    """Rows ``start:end`` of ``W_p`` and the grid they round to: column scales and bit width."""

    start: int
    end: int
    bits: int
    scale: torch.Tensor
    divisor: torch.Tensor


def refine_codes(target: torch.Tensor, hessian: torch.Tensor, grids: list[GroupGrid], codes: torch.Tensor,
                 fake: torch.Tensor, sweeps: int) -> None:
    """``sweeps`` passes of coordinate descent over the rows of ``codes``/``fake`` (``[K, N]``, in place).

    ``target`` is the weight GPTQ fitted (``W_p``, or ``W*`` of the asymmetric fit) and ``hessian`` the
    damped, permuted ``H_p`` it used. Each group's rows are updated one by one against a running gradient
    ``G = H (Q − W)`` restricted to the group; the rest of ``G`` follows with one product per group."""
    delta = fake - target
    for _ in range(sweeps):
        grad = hessian @ delta  # recomputed per sweep so rounding drift cannot accumulate
        for grid in grids:
            s, e = grid.start, grid.end
            before = delta[s:e].clone()
            zero, maxq = 1 << (grid.bits - 1), (1 << grid.bits) - 1
            for row in range(s, e):
                h = hessian[row, row]
                optimum = target[row] - (grad[row] - h * delta[row]) / h
                quantize_rows(optimum, grid.scale, zero, maxq, divisor=grid.divisor,
                              out=(codes[row], fake[row], None))
                step = fake[row] - target[row] - delta[row]
                delta[row] += step
                grad[s:e].addr_(hessian[s:e, row], step)
            moved = delta[s:e] - before
            grad[:s].addmm_(hessian[:s, s:e], moved)
            grad[e:].addmm_(hessian[e:, s:e], moved)
