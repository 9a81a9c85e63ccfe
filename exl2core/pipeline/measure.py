"""Measurement: the error of every measured block at every row of its candidate table.

Each distinct setting of each linear is quantized once (Adaptive GPTQ on the block's own Hessians).
Two modes score the table rows (``MEASURE_MODES``):

* ``exact`` (exllamav2's method): swap the pre-quantized weights into the block and compare the block's
  output (residual included) with the unquantized output over all calibration rows; a slot with its own
  ``output`` (a parallel decoder's branch) is compared on that activation instead. One block forward
  per table row.
* ``fast``: no candidate forward. Each linear's weight error ``ΔW`` is scored on the Hessian GPTQ already
  collected: ``(ΔW H ΔWᵀ)_oo`` per output channel gives its output error, and weighted by the channel's
  output sensitivity (``pipeline.sensitivity``) its predicted contribution to the model's KL divergence.
  The record's accuracy is ``1 − sqrt(Σ tr(ΔW H ΔWᵀ) / Σ tr(W H Wᵀ))`` over the slot's linears.

The records are exllamav2's ``measurement.json`` schema either way, so files are interchangeable; the
predicted KL of the fast mode is returned beside them.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch

from exl2core.plan import Linear, Module, Slot
from exl2core.pipeline.hidden import HiddenStates
from exl2core.pipeline.runner import forward_rows, prepare_hessians, relative_error
from exl2core.pipeline.sensitivity import Sensitivity
from exl2core.quant.gptq import Hessian, quantize_linear
from exl2core.quant.qparams import TABLES, pad32, table_setting

#: ``exact``: one block forward per candidate (exllamav2's); ``fast``: Hessian and sensitivity estimate.
MEASURE_MODES = ("exact", "fast")


def measure_module(fwd: Callable, module: Module, weights: dict[str, torch.Tensor],
                   states: HiddenStates, on_candidate: Callable[[], None] | None = None,
                   search: str = "hessian") -> tuple[object, list[torch.Tensor]]:
    """``exact`` mode: return ``(record, reference outputs)``; the record is None for modules without
    slots. ``search`` is the scale search the candidates are quantized with (``gptq.SCALE_SEARCHES``)."""
    hessians = {} if module.slots else None
    targets = forward_rows(fwd, module, weights, states, hessians)
    if not module.slots:
        return None, targets
    prepared = prepare_hessians(module, hessians, states.device)
    records = {slot.table: _measure_slot(fwd, module, slot, weights, prepared, states, targets, on_candidate,
                                         search) for slot in module.slots}
    return _per_module(module, records), targets


def estimate_module(fwd: Callable, module: Module, weights: dict[str, torch.Tensor], states: HiddenStates,
                    sensitivity: Sensitivity, on_candidate: Callable[[], None] | None = None,
                    search: str = "hessian") -> tuple[object, object, list[torch.Tensor]]:
    """``fast`` mode: return ``(record, predicted KL, reference outputs)``; the predicted KL has the
    record's shape (a list per slot, in table order; a dict of lists for several slots)."""
    hessians: dict[str, Hessian] | None = {} if module.slots else None
    targets = forward_rows(fwd, module, weights, states, hessians)
    if not module.slots:
        return None, None, targets
    prepared = prepare_hessians(module, hessians, states.device)
    tokens = sum(t.numel() // t.shape[-1] for t in targets)
    records, kls = {}, {}
    for slot in module.slots:
        records[slot.table], kls[slot.table] = _estimate_slot(module, slot, weights, prepared, hessians, tokens,
                                                              sensitivity, on_candidate, search)
    return _per_module(module, records), _per_module(module, kls), targets


def _per_module(module: Module, per_slot: dict):
    """A single slot's value is stored bare, several keyed by table (exllamav2's record shapes)."""
    return per_slot[module.slots[0].table] if len(module.slots) == 1 else per_slot


def _candidates(module: Module, slot: Slot, weights, prepared, search: str
                ) -> Iterator[tuple[dict, dict[str, tuple[str, torch.Tensor, int]]]]:
    """Per table row: the record's settings by role, and each linear's setting (``QParams.desc``),
    quantized weight and size in bits.

    Each distinct setting is quantized once and kept (fp16, as quantized) only until the last row that
    uses it: holding every setting of a wide MLP at once would take many times the layer's own size."""
    linears = _slot_linears(module, slot)
    rows = [{lin.name: table_setting(slot.table, row, lin.role) for lin in linears}
            for row in range(len(TABLES[slot.table]))]
    last_use = {(name, qp.desc): row for row, chosen in enumerate(rows) for name, qp in chosen.items()}
    quantized: dict[tuple[str, str], tuple[torch.Tensor, int]] = {}
    for row, chosen in enumerate(rows):
        settings: dict = {}
        per_linear: dict[str, tuple[str, torch.Tensor, int]] = {}
        for lin in linears:
            qp = chosen[lin.name]
            key = (lin.name, qp.desc)
            if key not in quantized:
                q = quantize_linear(weights[lin.name], prepared[lin.name], qp,
                                    bias=weights.get(lin.name + ".bias"), search=search)
                bits = qp.total_bits(lin.in_features, pad32(lin.out_features), lin.bias)
                quantized[key] = (q.weight[: lin.out_features], bits)
            per_linear[lin.name] = (qp.desc, *quantized[key])
            settings.setdefault(lin.role, qp.to_dict())
        yield {role: settings[role] for role in slot.roles if role in settings}, per_linear
        for key in [k for k, last in last_use.items() if last == row]:
            del quantized[key]


def _slot_linears(module: Module, slot: Slot) -> list[Linear]:
    return [lin for lin in module.linears if lin.role in slot.roles]


def _measure_slot(fwd, module: Module, slot: Slot, weights, prepared, states, targets, on_candidate, search):
    if slot.output is not None:
        targets = forward_rows(fwd, module, weights, states, output=slot.output)
    records = []
    for settings, per_linear in _candidates(module, slot, weights, prepared, search):
        trial = dict(weights)
        for name, (_, fake, _) in per_linear.items():
            trial[name] = fake.to(weights[name])
        outputs = forward_rows(fwd, module, trial, states, output=slot.output)
        accuracy = max(1e-6, 1.0 - relative_error(outputs, targets))
        records.append({"accuracy": accuracy, "total_bits": sum(bits for _, _, bits in per_linear.values()),
                        **settings})
        if on_candidate:
            on_candidate()
    return records


def _estimate_slot(module: Module, slot: Slot, weights, prepared, hessians: dict[str, Hessian], tokens: int,
                   sensitivity: Sensitivity, on_candidate, search) -> tuple[list[dict], list[float]]:
    linears = _slot_linears(module, slot)
    h = {lin.name: _input_hessian(hessians, lin) for lin in linears}
    signal = math.fsum(_channel_errors(weights[lin.name], h[lin.name]).sum().item() for lin in linears)
    scores: dict[tuple[str, str], tuple[float, float]] = {}
    records, kls = [], []
    for settings, per_linear in _candidates(module, slot, weights, prepared, search):
        noise = kl = 0.0
        for lin in linears:
            desc, fake, _ = per_linear[lin.name]
            key = (lin.name, desc)
            if key not in scores:
                errors = _channel_errors(fake.to(torch.float32) - weights[lin.name].to(torch.float32),
                                         h[lin.name])
                g = sensitivity.of(module, lin.name).to(errors)
                scores[key] = (errors.sum().item(), 0.5 * (g * errors).sum().item() / max(tokens, 1))
            noise += scores[key][0]
            kl += scores[key][1]
        accuracy = max(1e-6, 1.0 - math.sqrt(noise / signal)) if signal > 0 else 1e-6
        records.append({"accuracy": accuracy, "total_bits": sum(bits for _, _, bits in per_linear.values()),
                        **settings})
        kls.append(kl)
        if on_candidate:
            on_candidate()
    return records, kls


def _input_hessian(hessians: dict[str, Hessian], lin: Linear) -> torch.Tensor | None:
    """The raw ``Σ x xᵀ`` of ``lin``'s input (None when no token reached it, e.g. an idle expert)."""
    hessian = hessians.get(lin.input)
    return None if hessian is None else hessian.matrix


def _channel_errors(dw: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
    """``diag(ΔW H ΔWᵀ)``: the squared output error of each channel summed over the tokens (the product
    in float32, the sums in float64)."""
    if h is None:
        return torch.zeros(dw.shape[0], dtype=torch.float64, device=dw.device)
    dw = dw.to(torch.float32)
    return ((dw @ h.to(dw)) * dw).sum(dim=1, dtype=torch.float64)


def candidates_of(module: Module) -> int:
    """Number of table rows measured for ``module`` (for progress reporting)."""
    return sum(len(TABLES[s.table]) for s in module.slots)
