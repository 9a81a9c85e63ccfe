"""Compare the exact allocator with exllamav2's annealer on one measurement.

    python bench/bench_optimize.py                                  # synthetic Llama-2-70B-shaped table
    python bench/bench_optimize.py measurement.json --numel N       # a real measurement
    python bench/bench_optimize.py measurement.json --model DIR     # numel from the model's plan

For each target bpw it prints, for ``solve`` and ``anneal_exllamav2``: achieved bpw, Σ err, Σ err²,
max err and wall time. The annealer runs 100 moves per temperature step unless ``--full-anneal``
(exllamav2's 1000, several minutes per target in numpy).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from exl2core.pipeline.optimize import anneal_exllamav2, options_of, solve_detailed
from exl2core.pipeline.records import by_slot
from exl2core.quant.qparams import ATTN_TABLE, MLP_TABLE

TARGETS = (2.5, 3.0, 4.0, 5.0, 6.0)


def synthetic_measurement(
    layers: int = 80, hidden: int = 8192, intermediate: int = 28672, kv: int = 1024, seed: int = 0
) -> tuple[dict[str, Any], int]:
    """A measurement dict (exl2-format §5.5) with real table costs and errors falling like 2^(−bpw), plus numel."""
    rng = np.random.default_rng(seed)
    shapes = {
        "self_attn": (ATTN_TABLE, {"q_proj": (hidden, hidden), "k_proj": (hidden, kv),
                                   "v_proj": (hidden, kv), "o_proj": (hidden, hidden)}),
        "mlp": (MLP_TABLE, {"gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate),
                            "down_proj": (intermediate, hidden)}),
    }
    measurement: dict[str, Any] = {}
    numel = 0
    for layer in range(layers):
        for mode, (table, roles) in shapes.items():
            block_numel = sum(r * c for r, c in roles.values())
            numel += block_numel
            scale = rng.lognormal(-2.5, 0.6)
            records = []
            for row in table:
                bits = sum(row[role].total_bits(r, c) for role, (r, c) in roles.items())
                err = min(0.9, scale * 2.0 ** (-1.1 * (bits / block_numel - 2.0)) * rng.lognormal(0.0, 0.08))
                record = {"accuracy": 1.0 - err, "total_bits": bits}
                record.update({role: row[role].to_dict() for role in roles})
                records.append(record)
            measurement[f"model.layers.{layer}.{mode}"] = records
    return measurement, numel


def numel_from_model(model_dir: str) -> int:
    from exl2core.model.config import ModelConfig
    from exl2core.plugins import resolve_plan

    return resolve_plan(ModelConfig.load(model_dir)).blocks_numel()


def _row(name: str, slots, choice, numel: int, seconds: float) -> str:
    errs = [slot[k].err for slot, k in zip(slots, choice)]
    bpw = sum(slot[k].cost for slot, k in zip(slots, choice)) / numel
    return (f"{name:>8} {bpw:8.4f} {math.fsum(errs):10.5f} {math.fsum(e * e for e in errs):11.3e} "
            f"{max(errs):9.5f} {seconds:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("measurement", nargs="?", help="measurement.json (synthetic if omitted)")
    parser.add_argument("--numel", type=int, help="weights counted against the budget (exl2-format §6.1)")
    parser.add_argument("--model", help="model directory to take numel from")
    parser.add_argument("--layers", type=int, default=80, help="synthetic layers (2 slots each)")
    parser.add_argument("--targets", type=float, nargs="+", default=TARGETS)
    parser.add_argument("--anneal-iterations", type=int, default=100)
    parser.add_argument("--anneal-runs", type=int, default=80, help="runs per stage (exllamav2: 80)")
    parser.add_argument("--full-anneal", action="store_true", help="exllamav2's 1000 moves per step")
    args = parser.parse_args()

    if args.measurement:
        measurement = json.loads(Path(args.measurement).read_text())["measurement"]
        numel = args.numel or (numel_from_model(args.model) if args.model else None)
        if not numel:
            parser.error("a real measurement needs --numel or --model")
        source = args.measurement
    else:
        measurement, numel = synthetic_measurement(args.layers)
        source = f"synthetic, {args.layers} layers of Llama-2-70B shape"
    slots = [options_of(r) for r in by_slot(measurement).values()]  # file order: module order, exl2-format §5.5
    iterations = 1000 if args.full_anneal else args.anneal_iterations
    print(f"{source}: {len(slots)} slots, numel {numel}, annealer {args.anneal_runs} runs/stage × "
          f"{iterations} moves/step")
    header = ("target", "method", "bpw", "Σ err", "Σ err²", "max err", "time s")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (6, 8, 8, 10, 11, 9, 8))))
    for target in args.targets:
        budget = int(numel * target)
        start = time.perf_counter()
        result = solve_detailed(slots, budget, numel=numel)
        solved = time.perf_counter() - start
        start = time.perf_counter()
        annealed = anneal_exllamav2(slots, budget, numel=numel, runs_per_stage=args.anneal_runs,
                                    iterations=iterations)
        annealing = time.perf_counter() - start
        proof = "optimal" if result.exact else f"gap ≤ {result.objective - result.lower_bound:.2e}"
        print(f"{target:6.3f} {_row('solve', slots, result.choice, numel, solved)}  ({proof})")
        print(f"{'':6} {_row('anneal', slots, annealed, numel, annealing)}")


if __name__ == "__main__":
    main()
