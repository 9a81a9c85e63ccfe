"""A float sum whose bits do not depend on how its terms are split between processes.

Float addition is not associative, so a running sum over calibration rows depends on their order and on
how the rows are divided between ranks. Here each term belongs to a *leaf* (``LEAF_ROWS`` consecutive
calibration rows, summed in row order), and leaves are combined by one fixed binary tree over leaf
indices: node ``(level, start)`` covers leaves ``[start, start + 2^level)`` and is its two halves added
(a half without leaves is skipped). A process that sees a contiguous run of leaves streams them like a
binary counter, holding O(log n) finished nodes; any set of such nodes that tiles the leaves combines to
the very same root value, so one process and N processes give identical sums.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Callable

import torch

#: Calibration rows per leaf: the unit rows are shared out in between ranks, summed in order within it.
LEAF_ROWS = 1

Node = tuple[int, int]  # (level, start leaf)


class TreeSum:
    """Streams terms leaf by leaf (increasing leaf indices) into finished tree nodes."""

    def __init__(self) -> None:
        self._stack: list[tuple[int, int, torch.Tensor | None]] = []
        self._next: int | None = None  # the first leaf after those pushed onto the stack
        self._leaf: int | None = None
        self._value: torch.Tensor | None = None

    def leaf(self, index: int, zeros: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The accumulator of leaf ``index`` (new from ``zeros()``), to add that leaf's terms into in order."""
        if self._leaf != index:
            self._finish_leaf()
            if self._next is not None:
                if index < self._next:
                    raise ValueError(f"leaf {index} after leaf {self._next - 1}: leaves must come in order")
                for gap in range(self._next, index):  # leaves without terms keep the tree's shape
                    self._push(0, gap, None)
            self._leaf, self._value = index, zeros()
        return self._value

    def _finish_leaf(self) -> None:
        if self._leaf is not None:
            self._push(0, self._leaf, self._value)
            self._next, self._leaf, self._value = self._leaf + 1, None, None

    def _push(self, level: int, start: int, value: torch.Tensor | None) -> None:
        self._stack.append((level, start, value))
        while len(self._stack) >= 2:
            (l1, s1, v1), (l2, s2, v2) = self._stack[-2:]
            if l1 != l2 or s1 % (2 << l1) or s2 != s1 + (1 << l1):
                break
            del self._stack[-2:]
            with torch.inference_mode(v1 is not None and v1.is_inference()):  # leaves made in inference mode
                self._stack.append((l1 + 1, s1, _add(v1, v2, in_place=True)))

    def nodes(self) -> dict[Node, torch.Tensor]:
        """The finished nodes, the current leaf merged in (it takes no more terms): disjoint, aligned,
        together all terms seen, as few as the leaves' range allows."""
        self._finish_leaf()
        return {(level, start): value for level, start, value in self._stack if value is not None}


def tree_total(nodes: dict[Node, torch.Tensor]) -> torch.Tensor | None:
    """The root of the tree tiled by ``nodes`` (disjoint aligned nodes, e.g. every process's ``nodes()``),
    None if there are none. The inputs are left unchanged."""
    if not nodes:
        return None
    starts = sorted(start for _, start in nodes)
    end = max(start + (1 << level) for level, start in nodes)

    def value(level: int, start: int) -> torch.Tensor | None:
        if (level, start) in nodes:
            return nodes[(level, start)]
        first = bisect_left(starts, start)
        if level == 0 or first == len(starts) or starts[first] >= start + (1 << level):
            return None  # no node below
        half = 1 << (level - 1)
        return _add(value(level - 1, start), value(level - 1, start + half), in_place=False)

    return value(max(0, (end - 1).bit_length()), 0)


def _add(a: torch.Tensor | None, b: torch.Tensor | None, *, in_place: bool) -> torch.Tensor | None:
    if a is None or b is None:
        return b if a is None else a
    return a.add_(b) if in_place else a + b
