"""Measurement: the output error of every measured block at every row of its candidate table.

Each distinct setting of each linear is quantized once (Adaptive GPTQ on the block's own Hessians);
each table row is then evaluated by swapping the pre-quantized weights into the block and comparing
the block's output (residual included) with the unquantized output over all calibration rows; a slot
with its own ``output`` (a parallel decoder's branch) is compared on that activation instead. The
records are exllamav2's ``measurement.json`` schema, so files are interchangeable.
"""

from __future__ import annotations

from typing import Callable

import torch

from exl2core.plan import Module, Slot
from exl2core.pipeline.hidden import HiddenStates
from exl2core.pipeline.runner import forward_rows, prepare_hessians, relative_error
from exl2core.quant.gptq import quantize_linear
from exl2core.quant.qparams import TABLES, pad32, table_setting


def measure_module(fwd: Callable, module: Module, weights: dict[str, torch.Tensor],
                   states: HiddenStates, on_candidate: Callable[[], None] | None = None,
                   search: str = "hessian") -> tuple[object, list[torch.Tensor]]:
    """Return ``(record, reference outputs)``; the record is None for modules without slots.
    ``search`` is the scale search the candidates are quantized with (``gptq.SCALE_SEARCHES``)."""
    hessians = {} if module.slots else None
    targets = forward_rows(fwd, module, weights, states, hessians)
    if not module.slots:
        return None, targets
    prepared = prepare_hessians(module, hessians, states.device)
    records = {slot.table: _measure_slot(fwd, module, slot, weights, prepared, states, targets, on_candidate,
                                         search) for slot in module.slots}
    if len(module.slots) == 1:
        return records[module.slots[0].table], targets
    return records, targets


def _measure_slot(fwd, module: Module, slot: Slot, weights, prepared, states, targets, on_candidate, search):
    linears = [lin for lin in module.linears if lin.role in slot.roles]
    if slot.output is not None:
        targets = forward_rows(fwd, module, weights, states, output=slot.output)
    rows = [{lin.name: table_setting(slot.table, row, lin.role) for lin in linears}
            for row in range(len(TABLES[slot.table]))]
    last_use = {(name, qp.desc): row for row, chosen in enumerate(rows) for name, qp in chosen.items()}
    # Each distinct setting is quantized once and kept (fp16, as quantized) only until the last row that
    # uses it: holding every setting of a wide MLP at once would take many times the layer's own size.
    quantized: dict[tuple[str, str], tuple[torch.Tensor, int]] = {}
    records = []
    for row, chosen in enumerate(rows):
        trial = dict(weights)
        total_bits = 0
        record: dict = {}
        for lin in linears:
            qp = chosen[lin.name]
            key = (lin.name, qp.desc)
            if key not in quantized:
                q = quantize_linear(weights[lin.name], prepared[lin.name], qp,
                                    bias=weights.get(lin.name + ".bias"), search=search)
                bits = qp.total_bits(lin.in_features, pad32(lin.out_features), lin.bias)
                quantized[key] = (q.weight[: lin.out_features], bits)
            fake, bits = quantized[key]
            trial[lin.name] = fake.to(weights[lin.name])
            total_bits += bits
            record.setdefault(lin.role, qp.to_dict())
        outputs = forward_rows(fwd, module, trial, states, output=slot.output)
        accuracy = max(1e-6, 1.0 - relative_error(outputs, targets))
        records.append({"accuracy": accuracy, "total_bits": total_bits,
                        **{role: record[role] for role in slot.roles if role in record}})
        for key in [k for k, last in last_use.items() if last == row]:
            del quantized[key]
        if on_candidate:
            on_candidate()
    return records


def candidates_of(module: Module) -> int:
    """Number of table rows measured for ``module`` (for progress reporting)."""
    return sum(len(TABLES[s.table]) for s in module.slots)
