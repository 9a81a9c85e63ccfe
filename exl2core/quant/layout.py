"""Group layouts of one linear at a fixed storage size: which act-order rows get which bit width.

A setting's layout (exl2-format §2.4) fixes the groups' widths and sizes from its proportions. The format allows
any layout with non-increasing widths and groups of whole 32-row units, and its size (exl2-format §3.3) is
``N·Σ_g r_g·b_g + G·(48 + 4N) + 32K``: any layout with the same number of groups ``G`` and the same
``Σ_g r_g·b_g`` takes exactly the same bits. Within that set, the ``hessian`` layout trades rows between
the setting's widths (32 rows at 8 bits for 160 at 4 instead of 3, say) and resizes the groups of each
width, choosing the layout with the least expected GPTQ loss: each row ``i`` is charged GPTQ's weight
``1/U_ii²`` times the rounding noise ``step²/12`` of its group, ``step = 2·max|w|/(2^b − 1)`` per column.
"""

from __future__ import annotations

import itertools

import torch

from exl2core.quant.qparams import LAYOUTS, QParams

UNIT = 32  # rows per layout unit: every group is a whole number of them (exl2-format §2.10)
#: Values tried per free group count; bounds the enumeration for wide layers.
MAX_COUNT_VALUES = 12


def choose_layout(w: torch.Tensor, qparams: QParams, layout: str,
                  row_weights: torch.Tensor | None = None) -> list[tuple[int, int]]:
    """``[(bits, rows)]`` per group over the rows of the permuted weight ``w`` ``[K, N]``.

    ``row_weights`` is GPTQ's per-row error charge (None: equal). The ``table`` layout, or one whose
    rows are not whole units, is returned unchanged.
    """
    table = qparams.groups(w.shape[0])
    if layout == "table" or w.shape[0] % UNIT:
        return table
    model = _NoiseModel(w, row_weights)
    best, best_err = table, model.layout_error(table)
    for candidate in _same_size_layouts(table, qparams.bits):
        err = model.layout_error(candidate)
        if err < best_err:
            best, best_err = candidate, err
    return best


def _same_size_layouts(table: list[tuple[int, int]], widths: tuple[int, ...]):
    """Layouts over the table's widths with its group count and its ``Σ r·b``: rows per width, then
    groups per width (each width's rows split as evenly as whole units allow, smaller groups first)."""
    units = sum(r for _, r in table) // UNIT
    low = widths[-1]
    budget = sum(r // UNIT * (b - low) for b, r in table)
    count = len(table)
    for upper in _rows_per_width(budget, [b - low for b in widths[:-1]]):
        rest = units - sum(upper)
        if rest < 0:
            continue
        rows = [*upper, rest]
        used = [j for j, r in enumerate(rows) if r > 0]
        if len(used) > count or sum(rows[j] for j in used) < count:
            continue
        for counts in _group_counts([rows[j] for j in used], count):
            groups = []
            for j, n in zip(used, counts):
                size, extra = divmod(rows[j], n)
                groups += [(widths[j], size * UNIT)] * (n - extra) + [(widths[j], (size + 1) * UNIT)] * extra
            yield groups


def _rows_per_width(budget: int, excess: list[int]):
    """Units per width above the lowest, ``Σ u_j·excess_j = budget`` (each width's bits above the lowest)."""
    if not excess:
        if budget == 0:
            yield []
        return
    head, tail = excess[0], excess[1:]
    for u in range(budget // head + 1):
        for rest in _rows_per_width(budget - u * head, tail):
            yield [u, *rest]


def _group_counts(rows: list[int], total: int):
    """Group counts ``n_j`` with ``1 ≤ n_j ≤ rows_j`` and ``Σ n_j = total``, the free ones on a grid
    of at most ``MAX_COUNT_VALUES`` values each."""
    free = []
    for r in rows[:-1]:
        hi = min(r, total - len(rows) + 1)
        step = max(1, -(-hi // MAX_COUNT_VALUES))
        free.append(sorted(set(range(1, hi + 1, step)) | {hi}))
    for head in itertools.product(*free):
        last = total - sum(head)
        if 1 <= last <= rows[-1]:
            yield [*head, last]


class _NoiseModel:
    """Expected GPTQ loss of a group under uniform rounding noise, cached per (first unit, units, bits)."""

    def __init__(self, w: torch.Tensor, row_weights: torch.Tensor | None):
        k, n = w.shape
        weights = torch.ones(k, device=w.device) if row_weights is None else row_weights.to(w.device)
        self.unit_max = w.abs().view(k // UNIT, UNIT, n).amax(1).double()  # [U, N]
        self.weight_prefix = torch.cat([weights.new_zeros(1), weights.view(-1, UNIT).sum(1).cumsum(0)]).double()
        self.by_start: dict[int, list[float]] = {}

    def _max_energy(self, start: int, units: int) -> float:
        """``Σ_n (max over the units' rows of |w|)²`` for the group of ``units`` units from ``start``."""
        if start not in self.by_start:
            running = self.unit_max[start:].cummax(0).values
            self.by_start[start] = running.square().sum(1).tolist()
        return self.by_start[start][units - 1]

    def layout_error(self, groups: list[tuple[int, int]]) -> float:
        total, start = 0.0, 0
        for bits, rows in groups:
            units = rows // UNIT
            weight = (self.weight_prefix[start + units] - self.weight_prefix[start]).item()
            total += weight * self._max_energy(start, units) / (3 * ((1 << bits) - 1) ** 2)
            start += units
        return total
