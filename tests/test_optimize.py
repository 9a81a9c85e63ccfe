"""Bit allocation: exactness against brute force and an independent DP, budgets, the annealer, the plan."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from exl2core.errors import Exl2Error
from exl2core.pipeline.optimize import (
    OBJECTIVES,
    Option,
    anneal_exllamav2,
    bpw_range,
    greedy_fill,
    plan_strategy,
    solve,
    solve_detailed,
)
from exl2core.pipeline.records import by_slot, entry_lists, slot_name, slot_records
from exl2core.quant.qparams import ATTN_TABLE, MLP_TABLE


def _objective(slots, choice, objective):
    errs = np.array([slot[k].err for slot, k in zip(slots, choice)])
    return float(OBJECTIVES[objective](errs).sum())


def _cost(slots, choice):
    return sum(slot[k].cost for slot, k in zip(slots, choice))


def _brute_force(slots, budget, objective):
    """The optimum by enumerating every choice (numpy over the full product)."""
    grids = np.meshgrid(*[np.arange(len(s)) for s in slots], indexing="ij")
    cost = sum(np.array([o.cost for o in s], dtype=np.int64)[g] for s, g in zip(slots, grids))
    value = sum(OBJECTIVES[objective](np.array([o.err for o in s]))[g] for s, g in zip(slots, grids))
    return float(value[cost <= budget].min())


def _random_small(rng, n_slots=6, n_options=5):
    """Unordered options with big costs (so rounding matters), repeated costs and dominated options."""
    slots = []
    for _ in range(n_slots):
        costs = rng.integers(10**7, 10**9, size=n_options)
        costs[rng.integers(n_options)] = costs[rng.integers(n_options)]
        errs = rng.uniform(0.001, 0.4, size=n_options)
        slots.append([Option(int(c), float(e)) for c, e in zip(costs, errs)])
    low = sum(min(o.cost for o in s) for s in slots)
    high = sum(max(o.cost for o in s) for s in slots)
    return slots, int(rng.integers(low, high + 1))


def _table_instance(layers, seed, hidden=4096, intermediate=11008, kv=4096):
    """Llama-shaped slots: real table costs, errors falling like 2^(−bpw) with noise."""
    rng = np.random.default_rng(seed)
    attn_shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
                   "o_proj": (hidden, hidden)}
    mlp_shapes = {"gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate),
                  "down_proj": (intermediate, hidden)}
    tables = []
    for table, shapes in ((ATTN_TABLE, attn_shapes), (MLP_TABLE, mlp_shapes)):
        numel = sum(r * c for r, c in shapes.values())
        costs = [sum(row[role].total_bits(r, c) for role, (r, c) in shapes.items()) for row in table]
        tables.append((costs, numel))
    slots = []
    for _ in range(layers):
        for costs, numel in tables:
            scale = rng.lognormal(-2.5, 0.6)
            bpw = np.array(costs) / numel
            errs = scale * 2.0 ** (-1.1 * (bpw - 2.0)) * rng.lognormal(0.0, 0.08, len(costs))
            slots.append([Option(c, float(min(e, 0.9))) for c, e in zip(costs, errs)])
    return slots, layers * sum(numel for _, numel in tables)


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_solve_matches_brute_force(objective):
    rng = np.random.default_rng(1234)
    for _ in range(25):
        slots, budget = _random_small(rng)
        choice = solve(slots, budget, objective=objective)
        assert _cost(slots, choice) <= budget
        assert _objective(slots, choice, objective) == pytest.approx(
            _brute_force(slots, budget, objective), rel=1e-12
        )


def test_exact_even_with_a_coarse_bounding_grid():
    """With 8 units the rounded-down DP is a loose bound; the search must still reach the optimum."""
    rng = np.random.default_rng(7)
    for _ in range(15):
        slots, budget = _random_small(rng, n_slots=7, n_options=4)
        result = solve_detailed(slots, budget, resolution=8, max_nodes=10**6)
        assert result.exact and result.cost <= budget
        assert result.objective == pytest.approx(_brute_force(slots, budget, "sq"), rel=1e-12)


def _exact_dp_value(slots, budget):
    """Optimum of Σ err² by a plain DP over every integer cost (only for small integer costs)."""
    best = np.zeros(budget + 1)
    for slot in slots:
        nxt = np.full(budget + 1, np.inf)
        for o in slot:
            if o.cost <= budget:
                np.minimum(nxt[o.cost:], best[: budget + 1 - o.cost] + o.err**2, out=nxt[o.cost:])
        best = nxt
    return float(best[budget])


@pytest.mark.parametrize("target", [2.5, 3.3, 4.125, 5.5])
def test_solve_is_optimal_on_a_table_shaped_instance(target):
    """Costs scaled to small integers keep an independent full DP cheap; solve bounds on a coarser grid."""
    slots, numel = _table_instance(layers=20, seed=3)
    unit = 2**20
    small = [[Option(math.ceil(o.cost / unit), o.err) for o in s] for s in slots]
    budget = int(numel * target) // unit
    result = solve_detailed(small, budget, resolution=1024, max_nodes=10**6)
    assert result.exact and result.cost <= budget
    assert result.objective == pytest.approx(_exact_dp_value(small, budget), rel=1e-12)


@pytest.mark.parametrize("layers", [30, 80])
@pytest.mark.parametrize("target", [2.5, 3.0, 4.0, 5.0, 6.0])
def test_realistic_budget_bpw_and_better_than_annealer(layers, target):
    slots, numel = _table_instance(layers, seed=layers)
    budget = int(numel * target)
    result = solve_detailed(slots, budget)
    assert result.cost <= budget
    assert result.cost == _cost(slots, result.choice)
    assert abs(result.cost / numel - target) < 0.02
    assert result.lower_bound <= result.objective
    annealed = anneal_exllamav2(slots, budget, seed=1, runs_per_stage=6, iterations=20, cooling=0.95)
    assert _cost(slots, annealed) <= budget
    assert result.objective <= _objective(slots, annealed, "sq") + 1e-15


def test_realistic_instances_are_usually_proven_optimal():
    proven = [solve_detailed(*_budgeted(layers, t)).exact for layers in (30, 80) for t in (2.5, 4.0, 6.0)]
    assert sum(proven) >= 5


def _budgeted(layers, target):
    slots, numel = _table_instance(layers, seed=layers)
    return slots, int(numel * target)


def test_infeasible_budget_names_the_minimum_bpw():
    slots, numel = _table_instance(layers=4, seed=0)
    low, high = bpw_range(slots, numel)
    assert 2.0 < low < 2.3 and 7.9 < high < 8.1
    with pytest.raises(Exl2Error, match=f"minimum reachable {low:.4f} bpw"):
        solve(slots, int(numel * (low - 0.01)), numel=numel)
    with pytest.raises(Exl2Error, match="below the smallest possible size"):
        solve(slots, int(numel * (low - 0.01)))
    with pytest.raises(Exl2Error, match="minimum reachable"):
        anneal_exllamav2(slots, int(numel * (low - 0.01)), numel=numel, iterations=1, cooling=0.5)


def test_budget_at_the_extremes():
    slots, numel = _table_instance(layers=4, seed=0)
    cheapest = sum(min(o.cost for o in s) for s in slots)
    assert _cost(slots, solve(slots, cheapest)) == cheapest
    most = sum(max(o.cost for o in s) for s in slots)
    best = solve(slots, most + 12345)
    assert all(s[k].err == min(o.err for o in s) for s, k in zip(slots, best))


def test_bad_inputs_raise():
    slots = [[Option(10, 0.1), Option(20, 0.05)]]
    with pytest.raises(Exl2Error, match="unknown objective"):
        solve(slots, 20, objective="cube")
    with pytest.raises(Exl2Error, match="no options"):
        solve([[]], 20)
    with pytest.raises(Exl2Error, match="no measured blocks"):
        solve([], 20)
    with pytest.raises(Exl2Error, match="undefined"):
        solve([[Option(10, 1.0)]], 20, objective="log")


def test_deterministic():
    slots, numel = _table_instance(layers=10, seed=5)
    budget = int(numel * 3.7)
    assert solve(slots, budget) == solve(slots, budget)
    kwargs = dict(runs_per_stage=4, iterations=10, cooling=0.9)
    first = anneal_exllamav2(slots, budget, seed=9, **kwargs)
    assert first == anneal_exllamav2(slots, budget, seed=9, **kwargs)


def test_annealer_finds_an_obvious_optimum():
    """Two slots with one clearly best affordable pair; the annealer and the greedy fill must land on it."""
    slots = [[Option(1, 0.5), Option(2, 0.1), Option(3, 0.05)],
             [Option(1, 0.6), Option(2, 0.2), Option(9, 0.0)]]
    choice = anneal_exllamav2(slots, 5, runs_per_stage=4, iterations=50, cooling=0.9)
    assert choice == [2, 1] == solve(slots, 5)


def test_greedy_fill_is_maximal_and_only_moves_up():
    rng = np.random.default_rng(11)
    for _ in range(20):
        slots, budget = _random_small(rng, n_slots=8, n_options=6)
        start = [int(np.argmin([o.cost for o in s])) for s in slots]
        filled = greedy_fill(slots, start, budget)
        assert all(f >= s for f, s in zip(filled, start))
        total = _cost(slots, filled)
        assert total <= budget
        for s, k in zip(slots, filled):
            assert k + 1 == len(s) or total + s[k + 1].cost - s[k].cost > budget


def _measurement(slots, parallel=False):
    """A measurement dict (exl2-format §5.5) with records whose extra fields must come back untouched."""
    def records(slot, tag):
        return [{"accuracy": 1.0 - o.err, "total_bits": o.cost, "q_proj": {"tag": f"{tag}.{k}"}}
                for k, o in enumerate(slot)]

    measurement, keys = {}, []
    for layer in range(len(slots) // 2):
        attn, mlp = records(slots[2 * layer], f"a{layer}"), records(slots[2 * layer + 1], f"m{layer}")
        if parallel:
            key = f"model.layers.{layer}.parallel_decoder"
            measurement[key] = {"attn": attn, "mlp": mlp}
            keys += [(key, "attn"), (key, "mlp")]
        else:
            measurement[f"model.layers.{layer}.self_attn"] = attn
            measurement[f"model.layers.{layer}.mlp"] = mlp
            keys += [(f"model.layers.{layer}.self_attn", None), (f"model.layers.{layer}.mlp", None)]
    measurement["model.norm.norm"] = None
    return measurement, keys


@pytest.mark.parametrize("parallel", [False, True])
def test_plan_strategy_returns_verbatim_records_and_summary(parallel):
    slots, numel = _table_instance(layers=6, seed=2)
    measurement, keys = _measurement(slots, parallel)
    choices, summary = plan_strategy(measurement, keys, numel, 4.125)
    expected = solve(slots, int(numel * 4.125))
    for i, (key, sub) in enumerate(keys):
        records = slot_records(measurement[key], sub)
        assert choices[i] is records[expected[i]]
    chosen = [choices[i] for i in range(len(keys))]
    errs = [1.0 - r["accuracy"] for r in chosen]
    assert summary["bpw"] == sum(r["total_bits"] for r in chosen) / numel <= 4.125
    assert summary["target_bpw"] == 4.125
    assert summary["sum_err"] == pytest.approx(sum(errs))
    assert summary["max_err"] == max(errs)
    assert summary["sum_log_err"] == pytest.approx(sum(math.log(e) for e in errs))


def test_plan_strategy_reports_missing_records():
    slots, numel = _table_instance(layers=1, seed=2)
    measurement, keys = _measurement(slots)
    with pytest.raises(Exl2Error, match="model.layers.7.mlp"):
        plan_strategy(measurement, keys + [("model.layers.7.mlp", None)], numel, 4.0)
    with pytest.raises(Exl2Error, match="model.norm.norm"):
        plan_strategy(measurement, [("model.norm.norm", None)], numel, 4.0)
    measurement["model.layers.0.mlp"][3] = {"accuracy": 0.9}
    with pytest.raises(Exl2Error, match="total_bits"):
        plan_strategy(measurement, keys, numel, 4.0)


def test_brute_force_helper_agrees_with_enumeration():
    """Guard the reference itself: the vectorised brute force equals a plain loop on a tiny case."""
    rng = np.random.default_rng(0)
    slots, budget = _random_small(rng, n_slots=3, n_options=3)
    plain = min(
        sum(s[k].err ** 2 for s, k in zip(slots, c))
        for c in itertools.product(range(3), repeat=3)
        if _cost(slots, c) <= budget
    )
    assert _brute_force(slots, budget, "sq") == pytest.approx(plain, rel=1e-12)


def test_records_accessor_reads_both_entry_shapes():
    """A module of one slot stores a bare list, one of several a dict keyed by table (exl2-format §5.5)."""
    attn, mlp = [{"accuracy": 0.9, "total_bits": 1}], [{"accuracy": 0.8, "total_bits": 2}]
    measurement = {"model.layers.0": {"attn": attn, "mlp": mlp}, "model.layers.1.mlp": mlp, "model.norm": None}
    assert slot_records(measurement["model.layers.0"], "mlp") is mlp
    assert slot_records(measurement["model.layers.1.mlp"], None) is mlp
    assert slot_records(measurement["model.layers.0"], None) is None  # the other shape is refused
    assert slot_records(measurement["model.layers.1.mlp"], "attn") is None
    assert slot_records(None, None) is None
    assert entry_lists(measurement["model.layers.0"]) == [attn, mlp] and entry_lists(None) == []
    assert list(by_slot(measurement)) == [("model.layers.0", "attn"), ("model.layers.0", "mlp"),
                                          ("model.layers.1.mlp", None)]
    assert slot_name(("model.layers.0", "attn")) == "model.layers.0[attn]"
