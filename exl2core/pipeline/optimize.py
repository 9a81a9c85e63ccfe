"""Bit allocation (exl2-format §6): pick one measured option per block so the model fits a bit budget.

This is a multiple-choice knapsack. ``solve`` answers it exactly by depth-first branch and bound,
with two lower bounds per branch: a dynamic programme over costs rounded *down* to a coarse unit
(rounding down can only overstate what fits, so it never cuts off the optimum) and the linear
relaxation (each slot's convex hull, filled greedily). Branches are always checked against the true
integer costs, so an answer never exceeds the budget. An exact-cost local search (best single move
or two-slot exchange) polishes the first dive so pruning starts from a good solution. A node limit
bounds the time; when it is hit, the best solution found is returned with a proven lower bound on
the optimum (``Solution.lower_bound``; ``Solution.exact`` says whether optimality was proven).

``anneal_exllamav2`` restates exllamav2's annealer (exl2-format §6.2–6.3) for comparison.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from exl2core.errors import Exl2Error
from exl2core.pipeline.records import SlotKey, slot_name, slot_records


@dataclass(frozen=True)
class Option:
    """One measured table row of a block: its size in bits and its error (1 − accuracy)."""

    cost: int
    err: float


@dataclass(frozen=True)
class Solution:
    """A choice of option index per slot, with the objective it reaches and a proven lower bound."""

    choice: list[int]
    cost: int
    objective: float
    lower_bound: float
    exact: bool
    nodes: int


def _sq(err: np.ndarray) -> np.ndarray:
    return err * err


def _lin(err: np.ndarray) -> np.ndarray:
    return err.copy()


def _neg_log_accuracy(err: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return -np.log1p(-err)


#: What ``solve`` minimises, summed over slots: a function of each slot's error.
OBJECTIVES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "sq": _sq,
    "lin": _lin,
    "log": _neg_log_accuracy,
}

#: Cost units of the bounding dynamic programme; its table holds (slots + 1) × (RESOLUTION + 1) floats.
RESOLUTION = 1 << 15
#: Branch-and-bound nodes visited before settling for the best solution found (with its bound).
MAX_NODES = 20000


def bpw_range(slots: Sequence[Sequence[Option]], numel: int) -> tuple[float, float]:
    """The smallest and largest bits per weight any choice of options reaches."""
    low = sum(min(o.cost for o in slot) for slot in slots)
    high = sum(max(o.cost for o in slot) for slot in slots)
    return low / numel, high / numel


def _check_slots(slots: Sequence[Sequence[Option]], budget: int, numel: int | None) -> None:
    if not slots:
        raise Exl2Error("nothing to optimize: no measured blocks")
    for i, slot in enumerate(slots):
        if not slot:
            raise Exl2Error(f"measured block {i} has no options")
        for o in slot:
            if o.cost < 0 or not math.isfinite(o.err):
                raise Exl2Error(f"measured block {i} has an invalid option {o}")
    cheapest = sum(min(o.cost for o in slot) for slot in slots)
    if cheapest > budget:
        if numel:
            low, high = bpw_range(slots, numel)
            raise Exl2Error(
                f"target {budget / numel:.4f} bpw is below the minimum reachable {low:.4f} bpw "
                f"(reachable range {low:.4f}–{high:.4f} bpw)"
            )
        raise Exl2Error(f"budget of {budget} bits is below the smallest possible size of {cheapest} bits")


class _Problem:
    """The slots after dropping dominated options, as padded arrays.

    Costs are stored above each slot's cheapest option and the budget above the cheapest total, so
    the bounding programme spends its resolution on the part of the budget that is a real choice.
    Padding has an infinite value and a cost above the budget.
    """

    def __init__(self, slots: Sequence[Sequence[Option]], budget: int, objective: str):
        if objective not in OBJECTIVES:
            raise Exl2Error(f"unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")
        f = OBJECTIVES[objective]
        base = [min(o.cost for o in slot) for slot in slots]
        self.base = sum(base)
        self.budget = budget - self.base
        kept: list[list[tuple[int, float, int]]] = []
        for slot, low in zip(slots, base):
            values = f(np.array([o.err for o in slot], dtype=np.float64))
            if not np.all(np.isfinite(values)):
                raise Exl2Error(f"objective {objective!r} is undefined for an error of 1 or more")
            order = sorted(range(len(slot)), key=lambda k: (slot[k].cost, values[k], k))
            front: list[tuple[int, float, int]] = []
            for k in order:
                extra = slot[k].cost - low
                if extra <= self.budget and (not front or values[k] < front[-1][1]):
                    front.append((extra, float(values[k]), k))
            kept.append(front)
        # Deciding the slots with the most at stake first lets the bounds prune early.
        at_stake = [front[0][1] - front[-1][1] for front in kept]
        self.slot_of = sorted(range(len(kept)), key=lambda i: (-at_stake[i], i))
        n, width = len(kept), max(len(front) for front in kept)
        self.n = n
        self.cost = np.full((n, width), self.budget + 1, dtype=np.int64)
        self.value = np.full((n, width), np.inf)
        self.index = np.zeros((n, width), dtype=np.int64)
        for row, i in enumerate(self.slot_of):
            for k, (c, v, orig) in enumerate(kept[i]):
                self.cost[row, k], self.value[row, k], self.index[row, k] = c, v, orig

    def value_of(self, choice: Sequence[int]) -> float:
        return float(sum(self.value[i, k] for i, k in enumerate(choice)))

    def cost_of(self, choice: Sequence[int]) -> int:
        return self.base + int(sum(int(self.cost[i, k]) for i, k in enumerate(choice)))

    def original(self, choice: Sequence[int]) -> list[int]:
        """The choice as option indices of the caller's slots, in the caller's slot order."""
        out = [0] * self.n
        for row, k in enumerate(choice):
            out[self.slot_of[row]] = int(self.index[row, k])
        return out


class _Bounds:
    """Lower bounds on the best value of slots i.. given a remaining true budget."""

    def __init__(self, p: _Problem, resolution: int):
        self.unit = max(1, -(-p.budget // resolution))
        width = p.budget // self.unit
        units = p.cost // self.unit  # rounded down: a choice that truly fits also fits here
        table = np.empty((p.n + 1, width + 1))
        table[p.n] = 0.0
        for i in range(p.n - 1, -1, -1):
            row = np.full(width + 1, np.inf)
            for c, v in zip(units[i], p.value[i]):
                if c <= width and np.isfinite(v):
                    np.minimum(row[c:], table[i + 1, : width + 1 - c] + v, out=row[c:])
            table[i] = row
        self.table = table
        self.hull_cost, self.hull_gain, self.start = self._relaxation(p)

    @staticmethod
    def _relaxation(p: _Problem) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
        """Per suffix of slots, the linear relaxation as a function of the budget.

        With fractional choices allowed, the optimum walks the segments of every slot's lower convex
        hull in order of steepness; the cumulative (cost, gain) of that walk, interpolated, gives the
        relaxation's value for any remaining budget.
        """
        seg_slot, seg_cost, seg_gain = [], [], []
        for i in range(p.n):
            hull: list[tuple[int, float]] = []
            for c, v in zip(p.cost[i].tolist(), p.value[i].tolist()):
                if not math.isfinite(v):
                    break
                while len(hull) >= 2:
                    (c0, v0), (c1, v1) = hull[-2], hull[-1]
                    if (v1 - v0) * (c - c0) >= (v - v0) * (c1 - c0):
                        hull.pop()
                    else:
                        break
                hull.append((c, v))
            for (c0, v0), (c1, v1) in zip(hull, hull[1:]):
                seg_slot.append(i)
                seg_cost.append(c1 - c0)
                seg_gain.append(v1 - v0)
        slot_of = np.array(seg_slot, dtype=np.int64)
        cost = np.array(seg_cost, dtype=np.float64)
        gain = np.array(seg_gain, dtype=np.float64)
        steep = np.lexsort((slot_of, gain / np.maximum(cost, 1.0)))
        slot_of, cost, gain = slot_of[steep], cost[steep], gain[steep]
        hull_cost, hull_gain = [], []
        for i in range(p.n + 1):
            take = slot_of >= i
            hull_cost.append(np.concatenate(([0.0], np.cumsum(cost[take]))))
            hull_gain.append(np.concatenate(([0.0], np.cumsum(gain[take]))))
        start = np.zeros(p.n + 1)
        start[: p.n] = np.cumsum(p.value[::-1, 0])[::-1]
        return hull_cost, hull_gain, start

    def suffix(self, i: int, left: np.ndarray) -> np.ndarray:
        """A lower bound on the best value of slots i.. for each remaining budget in ``left``."""
        dp = self.table[i][left // self.unit]
        relaxed = self.start[i] + np.interp(left, self.hull_cost[i], self.hull_gain[i])
        return np.maximum(dp, relaxed)


class _Search:
    """Depth-first branch and bound over slots in order, children tried best bound first."""

    def __init__(self, p: _Problem, bounds: _Bounds, max_nodes: int):
        self.p, self.b, self.max_nodes = p, bounds, max_nodes
        self.best_value = math.inf
        self.best_choice: list[int] | None = None
        self.nodes = 0
        self.path = [0] * p.n
        self.cost_rows = p.cost.tolist()
        self.value_rows = p.value.tolist()

    def run(self, i: int, rem: int, acc: float) -> None:
        self.nodes += 1
        p, b = self.p, self.b
        if i == p.n:
            if acc < self.best_value:
                self.best_value, self.best_choice = acc, list(self.path)
            return
        left = rem - p.cost[i]
        fits = left >= 0
        left = np.where(fits, left, 0)
        bounds = np.where(fits, acc + p.value[i] + b.suffix(i + 1, left), np.inf)
        order = np.argsort(bounds, kind="stable").tolist()
        for k, bound in zip(order, bounds[order].tolist()):
            if bound >= self.best_value or (self.nodes >= self.max_nodes and self.best_choice is not None):
                return
            self.path[i] = k
            self.run(i + 1, rem - self.cost_rows[i][k], acc + self.value_rows[i][k])

    def improve(self, choice: list[int]) -> list[int]:
        """Exact-cost local search: apply the best single move or two-slot exchange until none helps."""
        p = self.p
        choice = list(choice)
        rows = np.arange(p.n)
        while True:
            cur_c, cur_v = p.cost[rows, choice], p.value[rows, choice]
            slack = p.budget - int(cur_c.sum())
            dc = p.cost - cur_c[:, None]
            dv = np.where(np.isfinite(p.value), p.value - cur_v[:, None], np.inf)
            single = np.where(dc <= slack, dv, np.inf)
            best = (float(single.min()), int(np.argmin(single)), -1)
            flat_c, flat_v = dc.ravel(), dv.ravel()
            for i in range(p.n):
                pair = dv[i][:, None] + flat_v[None, :]
                pair[:, i * dc.shape[1] : (i + 1) * dc.shape[1]] = np.inf
                pair[dc[i][:, None] + flat_c[None, :] > slack] = np.inf
                j = int(np.argmin(pair))
                if pair.flat[j] < best[0]:
                    best = (float(pair.flat[j]), i * dc.shape[1] + j // flat_c.size, j % flat_c.size)
            if not best[0] < 0:
                return choice
            for move in best[1:]:
                if move >= 0:
                    choice[move // dc.shape[1]] = move % dc.shape[1]


def solve_detailed(
    slots: Sequence[Sequence[Option]],
    budget: int,
    *,
    objective: str = "sq",
    numel: int | None = None,
    resolution: int = RESOLUTION,
    max_nodes: int = MAX_NODES,
) -> Solution:
    """Minimise Σ f(err) subject to Σ cost ≤ budget (f from ``OBJECTIVES``); see the module doc.

    ``numel`` only improves the error message of an infeasible budget (it is then stated in bpw).
    """
    _check_slots(slots, budget, numel)
    p = _Problem(slots, budget, objective)
    bounds = _Bounds(p, resolution)
    search = _Search(p, bounds, max_nodes=p.n + 1)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, p.n + 100))
    try:
        search.run(0, p.budget, 0.0)
        assert search.best_choice is not None  # the cheapest choice fits, so the first dive ends in a leaf
        seed = search.improve(search.best_choice)
        search.best_choice, search.best_value = seed, p.value_of(seed)
        search.max_nodes = search.nodes + max_nodes
        search.run(0, p.budget, 0.0)
    finally:
        sys.setrecursionlimit(limit)
    chosen = search.best_choice
    value = p.value_of(chosen)
    exact = search.nodes < search.max_nodes
    return Solution(
        choice=p.original(chosen),
        cost=p.cost_of(chosen),
        objective=value,
        lower_bound=value if exact else min(value, float(bounds.suffix(0, np.array([p.budget]))[0])),
        exact=exact,
        nodes=search.nodes,
    )


def solve(
    slots: Sequence[Sequence[Option]], budget: int, *, objective: str = "sq", numel: int | None = None
) -> list[int]:
    """The option index per slot minimising Σ f(err) within the budget (see ``solve_detailed``)."""
    return solve_detailed(slots, budget, objective=objective, numel=numel).choice


def _padded(slots: Sequence[Sequence[Option]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Costs (int64), errors (float32) and option counts of the slots, padded to one width."""
    width = max(len(slot) for slot in slots)
    cost = np.zeros((len(slots), width), dtype=np.int64)
    err = np.ones((len(slots), width), dtype=np.float32)
    for i, slot in enumerate(slots):
        cost[i, : len(slot)] = [o.cost for o in slot]
        err[i, : len(slot)] = [o.err for o in slot]
    return cost, err, np.array([len(slot) for slot in slots], dtype=np.int64)


def _anneal_runs(
    cost: np.ndarray,
    err: np.ndarray,
    counts: np.ndarray,
    budget: int,
    norms: np.ndarray,
    schedule: tuple[float, float, float, int],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Independent annealing runs (exl2-format §6.2), one per entry of ``norms``, stepped together.

    Returns each run's option indices, its Σ err^ν and its largest error (float32, as exllamav2).
    """
    initial_temp, cooling, min_temp, iterations = schedule
    runs, n = len(norms), len(counts)
    powered = np.power(err[None, :, :], norms.astype(np.float32)[:, None, None])
    # Flat views: the state of run r, slot i lives at r·n + i; its options at (r·n + i)·width + k.
    width = cost.shape[1]
    flat_cost = np.tile(cost.ravel(), runs)
    flat_powered = powered.ravel()
    run_base = (np.arange(runs) * n)[None, :]
    choice = np.zeros(runs * n, dtype=np.int64)
    cur_cost = np.tile(cost[:, 0], runs)
    cur_powered = powered[:, :, 0].ravel().copy()
    total = np.full(runs, int(cost[:, 0].sum()), dtype=np.int64)
    sums = powered[:, :, 0].sum(axis=1, dtype=np.float32)
    temp = np.float32(initial_temp)
    for _ in range(int(math.log(min_temp / initial_temp) / math.log(cooling))):
        slot = rng.integers(0, n, size=(iterations, runs))
        new = (rng.random((iterations, runs)) * counts[slot]).astype(np.int64)
        state = run_base + slot
        new_cost = flat_cost[state * width + new]
        new_powered = flat_powered[state * width + new]
        # u < exp(−Δ/T) is Δ < −T·ln(u); that limit is ≥ 0, so it also passes every Δ < 0.
        with np.errstate(divide="ignore"):
            limit = -temp * np.log(rng.random((iterations, runs)).astype(np.float32))
        for t in range(iterations):
            at = state[t]
            d_cost = new_cost[t] - cur_cost[at]
            d_err = new_powered[t] - cur_powered[at]
            ok = (total + d_cost <= budget) & (d_err < limit[t])
            at = at[ok]
            choice[at] = new[t][ok]
            cur_cost[at] = new_cost[t][ok]
            cur_powered[at] = new_powered[t][ok]
            sums[ok] += d_err[ok]
            total[ok] += d_cost[ok]
        temp = np.float32(temp * np.float32(cooling))
    idx = choice.reshape(runs, n)
    max_err = err[np.arange(n)[None, :], idx].max(axis=1)
    return idx, sums, max_err


def greedy_fill(slots: Sequence[Sequence[Option]], choice: Sequence[int], budget: int) -> list[int]:
    """exl2-format §6.3: sweep the slots, moving each to its next table row while that still fits; repeat."""
    choice = list(choice)
    total = sum(slot[k].cost for slot, k in zip(slots, choice))
    changed = True
    while changed:
        changed = False
        for i, slot in enumerate(slots):
            k = choice[i]
            if k + 1 < len(slot) and total + slot[k + 1].cost - slot[k].cost <= budget:
                total += slot[k + 1].cost - slot[k].cost
                choice[i] = k + 1
                changed = True
    return choice


def anneal_exllamav2(
    slots: Sequence[Sequence[Option]],
    budget: int,
    *,
    seed: int = 0,
    runs_per_stage: int = 80,
    iterations: int = 1000,
    cooling: float = 0.995,
    initial_temp: float = 2.0,
    min_temp: float = 0.0001,
    numel: int | None = None,
) -> list[int]:
    """exllamav2's allocation (exl2-format §6.2–6.3): annealing over Σ err^ν with ν tuned for the max error.

    The defaults are exllamav2's (3 stages × 80 runs, 1000 moves per temperature step, T from 2 to
    1e-4 by ×0.995); they take minutes in numpy, so tests and benches pass smaller ``iterations``,
    ``runs_per_stage`` or a faster ``cooling``. The random stream is numpy's, seeded (exllamav2
    seeds from the hardware), so results match exllamav2 in distribution, not move for move.
    """
    _check_slots(slots, budget, numel)
    cost, err, counts = _padded(slots)
    rng = np.random.default_rng(seed)
    schedule = (initial_temp, cooling, min_temp, iterations)
    last = max(runs_per_stage - 1, 1)
    best_norm, best_max = 0.0, math.inf
    ramp = np.arange(runs_per_stage) / last
    _, _, max_err = _anneal_runs(cost, err, counts, budget, 1.5 + 2.0 * ramp, schedule, rng)
    for norm, m in zip(1.5 + 2.0 * ramp, max_err.tolist()):
        if m < best_max:
            best_norm, best_max = float(norm), m
    # Stage 2 sweeps ν* ± 0.075 with exllamav2's off-by-one t = i/79 − 1 for run i = 80..159.
    t = np.arange(runs_per_stage, 2 * runs_per_stage) / last - 1
    norms = (1 - t) * (best_norm - 0.075) + t * (best_norm + 0.075)
    _, _, max_err = _anneal_runs(cost, err, counts, budget, norms, schedule, rng)
    for norm, m in zip(norms.tolist(), max_err.tolist()):
        if m < best_max:
            best_norm, best_max = norm, m
    idx, sums, _ = _anneal_runs(cost, err, counts, budget, np.full(runs_per_stage, best_norm), schedule, rng)
    kept = int(np.argmin(sums))  # the first of equal sums, as the strict "<" of exllamav2
    return greedy_fill(slots, idx[kept].tolist(), budget)


def options_of(records: Sequence[dict[str, Any]]) -> list[Option]:
    """The options of one slot from its measurement records (exl2-format §5.5)."""
    options = []
    for r in records:
        try:
            options.append(Option(int(r["total_bits"]), 1.0 - float(r["accuracy"])))
        except (KeyError, TypeError, ValueError) as e:
            raise Exl2Error(f"malformed measurement record (needs accuracy and total_bits): {e}") from None
    return options


def measured_slots(measurement: dict[str, Any], slot_keys: Sequence[SlotKey]) -> list[list[dict[str, Any]]]:
    """The record list of each slot (``records.slot_records``), refusing a slot without records."""
    slots = []
    for key in slot_keys:
        records = slot_records(measurement.get(key[0]), key[1])
        if not records:
            raise Exl2Error(f"measurement has no option records for {slot_name(key)}; measure the model again")
        slots.append(records)
    return slots


def plan_strategy(
    measurement: dict[str, Any],
    slot_keys: Sequence[SlotKey],
    numel: int,
    bits: float,
    *,
    objective: str = "sq",
    predicted_kl: dict[str, Any] | None = None,
) -> tuple[dict[int, dict[str, Any]], dict[str, Any]]:
    """Choose a measured record per slot for ``bits`` bpw over ``numel`` weights (budget as exl2-format §6.1).

    With ``predicted_kl`` (a fast measurement's per-record KL, shaped like ``measurement``) the sum of
    the chosen records' predicted KL is minimised instead of ``objective`` over their errors: errors of
    different layers add up in the model's KL, not in Σ err². Returns the chosen record (verbatim) per
    slot index and a summary of what the choice reaches.
    """
    records = measured_slots(measurement, slot_keys)
    slots = [options_of(r) for r in records]
    if predicted_kl is not None:
        kls = measured_slots(predicted_kl, slot_keys)
        slots = [[Option(o.cost, float(kl)) for o, kl in zip(slot, kl_list)] for slot, kl_list in zip(slots, kls)]
        objective = "lin"
    budget = int(numel * bits)
    solution = solve_detailed(slots, budget, objective=objective, numel=numel)
    chosen = [slot[k] for slot, k in zip(slots, solution.choice)]
    errs = [o.err for o in chosen]
    choices = {i: records[i][k] for i, k in enumerate(solution.choice)}
    summary = {
        "target_bpw": bits,
        "bpw": solution.cost / numel,
        "budget_bits": budget,
        "total_bits": solution.cost,
        "sum_err": math.fsum(errs),
        "sum_sq_err": math.fsum(e * e for e in errs),
        "max_err": max(errs),
        "sum_log_err": math.fsum(math.log(e) if e > 0 else -math.inf for e in errs),
        "objective": objective,
        "objective_value": solution.objective,
        "lower_bound": solution.lower_bound,
        "exact": solution.exact,
    }
    if predicted_kl is not None:
        summary["predicted_kl"] = solution.objective
    return choices, summary
