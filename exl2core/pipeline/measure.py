"""Measurement: the error of every measured block at every row of its candidate table.

Three modes score the table rows (``MEASURE_MODES``); the records are exllamav2's ``measurement.json``
schema in all of them, so files are interchangeable:

* ``exact`` (exllamav2's method): each distinct setting of each linear is quantized once (Adaptive GPTQ
  on the block's own Hessians) and swapped into the block, whose output (residual included) is compared
  with the unquantized output over all calibration rows; a slot with its own ``output`` (a parallel
  decoder's branch) is compared on that activation instead. One block forward per table row.
* ``hessian``: the same GPTQ quantizations, no candidate forward: each linear's output error is
  ``diag(ΔW H ΔWᵀ)`` on the Hessian GPTQ collected.
* ``fast``: neither GPTQ nor a forward per candidate: GPTQ's loss is ``Σ_i ‖e_i‖² / U_ii²`` for the rounding
  errors ``e_i`` of the rows it quantizes (``U`` the Cholesky factor of ``H⁻¹``), so each setting's error is
  expected from the rounding errors of the unquantized rows at that setting's group scales.

In the last two, each output channel's error is weighted by its output sensitivity
(``pipeline.sensitivity``) into a predicted contribution to the model's KL divergence, returned beside
the records; a record's accuracy is ``1 − sqrt(Σ tr(ΔW H ΔWᵀ) / Σ tr(W H Wᵀ))`` over the slot's linears.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, TypeVar

import torch

from exl2core.plan import Linear, Module, Slot
from exl2core.pipeline.hidden import HiddenStates
from exl2core.distributed import Ranks
from exl2core.pipeline.runner import (forward_rows, hessian_users, prepare_hessians, reduce_hessians, relative_error,
                                      share_linears)
from exl2core.pipeline.sensitivity import Sensitivity
from exl2core.quant.gptq import Hessian, PreparedHessian, quantize_linear, search_scales, search_scales_hessian
from exl2core.quant.qparams import TABLES, QParams, pad32, table_setting

#: ``exact``: a block forward per candidate (exllamav2's); ``hessian``: GPTQ per candidate scored on its
#: Hessian; ``fast``: GPTQ's expected error, no quantization per candidate. The last two allocate by
#: predicted KL.
MEASURE_MODES = ("exact", "hessian", "fast")

T = TypeVar("T")


def measure_module(fwd: Callable, module: Module, weights: dict[str, torch.Tensor],
                   states: HiddenStates, on_candidate: Callable[[], None] | None = None,
                   search: str = "hessian") -> tuple[object, list[torch.Tensor]]:
    """``exact`` mode: return ``(record, reference outputs)``; the record is None for modules without
    slots. ``search`` is the scale search the candidates are quantized with (``gptq.SCALE_SEARCHES``)."""
    hessians = {} if module.slots else None
    targets = forward_rows(fwd, module, weights, states, hessians)
    if not module.slots:
        return None, targets
    prepared = prepare_hessians(module, reduce_hessians(hessians, states), states.device)

    def quantized(lin: Linear, qp: QParams) -> torch.Tensor:
        q = quantize_linear(weights[lin.name], prepared[lin.name], qp, bias=weights.get(lin.name + ".bias"),
                            search=search)
        return q.weight[: lin.out_features]

    records = {slot.table: _measure_slot(fwd, module, slot, weights, states, targets, quantized, on_candidate)
               for slot in module.slots}
    return _per_module(module, records), targets


def estimate_module(fwd: Callable, module: Module, weights: dict[str, torch.Tensor], states: HiddenStates,
                    sensitivity: Sensitivity, mode: str = "fast", on_candidate: Callable[[], None] | None = None,
                    search: str = "hessian") -> tuple[object, object, list[torch.Tensor]]:
    """``hessian`` or ``fast`` mode: return ``(record, predicted KL, reference outputs)``; the predicted KL
    has the record's shape (a list per slot, in table order; a dict of lists for several slots)."""
    if mode not in ("hessian", "fast"):
        raise ValueError(f"estimate_module scores 'hessian' or 'fast', not {mode!r}")
    hessians: dict[str, Hessian] | None = {} if module.slots else None
    targets = forward_rows(fwd, module, weights, states, hessians)
    if not module.slots:
        return None, None, targets
    ranks = states.shard.ranks
    linears = [lin for slot in module.slots for lin in slot_linears(module, slot)]
    owners = share_linears(linears, ranks)
    hessians = reduce_hessians(hessians, states, hessian_users(module, owners))
    tokens = sum(ranks.all_gather(sum(t.numel() // t.shape[-1] for t in targets)))
    errors = _linear_errors(module, weights, hessians, mode, search, ranks, states.device, owners)
    records, kls = {}, {}
    for slot in module.slots:
        records[slot.table], kls[slot.table] = _estimate_slot(module, slot, errors, tokens, sensitivity,
                                                              lambda lin, qp: errors[(lin.name, qp.desc)],
                                                              on_candidate)
    return _per_module(module, records), _per_module(module, kls), targets


#: The setting key under which ``_linear_errors`` gives a linear's ``diag(W H Wᵀ)``, the scale of its errors.
SIGNAL = "signal"


def _linear_errors(module: Module, weights: dict[str, torch.Tensor], hessians: dict[str, Hessian], mode: str,
                   search: str, ranks: Ranks, device: torch.device,
                   owners: dict[str, int]) -> dict[tuple[str, str], torch.Tensor]:
    """``diag(ΔW H ΔWᵀ)`` of every measured linear at every setting its table rows use, keyed by
    ``(linear name, setting)``, and ``diag(W H Wᵀ)`` keyed by ``(linear name, SIGNAL)`` (absent for a
    linear no token reached). Each rank scores the linears ``owners`` gives it, on their Hessians, and
    every rank gets all (vectors of the output width)."""
    mine = [lin for lin in module.linears if owners.get(lin.name) == ranks.rank]
    prepared = prepare_hessians(module, hessians, device, {lin.name for lin in mine})
    errors: dict[tuple[str, str], torch.Tensor] = {}
    for lin in mine:
        w, bias, hessian = weights[lin.name], weights.get(lin.name + ".bias"), hessians.get(lin.input)
        if hessian is not None:
            errors[(lin.name, SIGNAL)] = channel_errors(w, hessian.matrix)
        rounding = _GroupRounding(w, prepared[lin.name], search) if mode == "fast" and hessian is not None else None
        slot = next(slot for slot in module.slots if lin.role in slot.roles)
        for row in range(len(TABLES[slot.table])):
            qp = table_setting(slot.table, row, lin.role)
            if (lin.name, qp.desc) in errors:
                continue
            if hessian is None:  # no token reached this linear (an idle expert)
                found = torch.zeros(lin.out_features, dtype=torch.float64, device=w.device)
            elif rounding is not None:
                found = rounding.expected_errors(qp) * hessian.num_batches
            else:
                fake = quantize_linear(w, prepared[lin.name], qp, bias=bias, search=search).weight[: lin.out_features]
                found = channel_errors(fake.to(torch.float32) - w.to(torch.float32), hessian.matrix)
            errors[(lin.name, qp.desc)] = found
    return ranks.share(errors)


def _per_module(module: Module, per_slot: dict):
    """A single slot's value is stored bare, several keyed by table (exllamav2's record shapes)."""
    return per_slot[module.slots[0].table] if len(module.slots) == 1 else per_slot


def _candidates(module: Module, slot: Slot, evaluate: Callable[[Linear, QParams], T]
                ) -> Iterator[tuple[dict, dict[str, tuple[T, int]]]]:
    """Per table row: the record's settings by role, and each linear's ``evaluate(lin, setting)`` with
    the setting's size in bits.

    Each distinct setting is evaluated once and kept only until the last row that uses it: holding every
    quantized setting of a wide MLP at once would take many times the layer's own size."""
    linears = slot_linears(module, slot)
    rows = [{lin.name: table_setting(slot.table, row, lin.role) for lin in linears}
            for row in range(len(TABLES[slot.table]))]
    last_use = {(name, qp.desc): row for row, chosen in enumerate(rows) for name, qp in chosen.items()}
    done: dict[tuple[str, str], tuple[T, int]] = {}
    for row, chosen in enumerate(rows):
        settings: dict = {}
        per_linear: dict[str, tuple[T, int]] = {}
        for lin in linears:
            qp = chosen[lin.name]
            key = (lin.name, qp.desc)
            if key not in done:
                done[key] = (evaluate(lin, qp), qp.total_bits(lin.in_features, pad32(lin.out_features), lin.bias))
            per_linear[lin.name] = done[key]
            settings.setdefault(lin.role, qp.to_dict())
        yield {role: settings[role] for role in slot.roles if role in settings}, per_linear
        for key in [k for k, last in last_use.items() if last == row]:
            del done[key]


def slot_linears(module: Module, slot: Slot) -> list[Linear]:
    return [lin for lin in module.linears if lin.role in slot.roles]


def _measure_slot(fwd, module: Module, slot: Slot, weights, states, targets, quantized, on_candidate):
    if slot.output is not None:
        targets = forward_rows(fwd, module, weights, states, output=slot.output)
    records = []
    for settings, per_linear in _candidates(module, slot, quantized):
        trial = dict(weights)
        for name, (fake, _) in per_linear.items():
            trial[name] = fake.to(weights[name])
        outputs = forward_rows(fwd, module, trial, states, output=slot.output)
        accuracy = max(1e-6, 1.0 - relative_error(outputs, targets, states.shard.ranks))
        records.append({"accuracy": accuracy, "total_bits": sum(bits for _, bits in per_linear.values()),
                        **settings})
        if on_candidate:
            on_candidate()
    return records


def _estimate_slot(module: Module, slot: Slot, errors: dict[tuple[str, str], torch.Tensor], tokens: int,
                   sensitivity: Sensitivity, linear_errors, on_candidate) -> tuple[list[dict], list[float]]:
    linears = slot_linears(module, slot)
    signal = math.fsum(errors[(lin.name, SIGNAL)].sum().item() for lin in linears if (lin.name, SIGNAL) in errors)
    scale = sensitivity.scale(slot)
    records, kls = [], []
    for settings, per_linear in _candidates(module, slot, linear_errors):
        noise = math.fsum(errors.sum().item() for errors, _ in per_linear.values())
        kl = math.fsum(sensitivity.linear_scale(module, name) * sensitivity.predicted_kl(module, name, errors, tokens)
                       for name, (errors, _) in per_linear.items())
        accuracy = max(1e-6, 1.0 - math.sqrt(noise / signal)) if signal > 0 else 1e-6
        records.append({"accuracy": accuracy, "total_bits": sum(bits for _, bits in per_linear.values()),
                        **settings})
        kls.append(scale * kl)
        if on_candidate:
            on_candidate()
    return records, kls


def channel_errors(dw: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``diag(ΔW H ΔWᵀ)``: the squared output error of each channel summed over the tokens (the product
    in float32, the sums in float64)."""
    dw = dw.to(torch.float32)
    return ((dw @ h.to(dw)) * dw).sum(dim=1, dtype=torch.float64)


class _GroupRounding:
    """GPTQ's expected error for any setting of one linear, from the rounding of its unquantized rows.

    GPTQ's loss is ``Σ_i e_i² / U_ii²`` per output channel for the rounding errors ``e_i`` of the rows it
    quantizes (in act order, ``U`` the Cholesky factor of the prepared ``H⁻¹``); the rounding error of the
    unquantized row at its group's scales (searched with the same row weights) stands in for ``e_i``.
    Settings share many groups (same rows, same width), so each group is rounded once per linear."""

    def __init__(self, weight: torch.Tensor, prepared: PreparedHessian, search: str):
        self.rows = weight.T[prepared.perm].to(torch.float32)  # [in, out], act order
        self.row_weights = torch.diagonal(prepared.inv_upper).square().reciprocal()
        self.search = search
        self.groups: dict[tuple[int, int, int], torch.Tensor] = {}

    def expected_errors(self, qp: QParams) -> torch.Tensor:
        """``diag(ΔW H ΔWᵀ)`` expected of GPTQ with ``qp``, ``H`` as prepared (normalised, damped)."""
        total = torch.zeros(self.rows.shape[1], dtype=torch.float64, device=self.rows.device)
        start = 0
        for bits, count in qp.groups(self.rows.shape[0]):
            key = (start, count, bits)
            if key not in self.groups:
                self.groups[key] = self._group_errors(start, count, bits)
            total += self.groups[key]
            start += count
        return total

    def _group_errors(self, start: int, count: int, bits: int) -> torch.Tensor:
        x, w = self.rows[start:start + count], self.row_weights[start:start + count]
        found = search_scales(x, bits) if self.search == "exllamav2" else search_scales_hessian(x, bits, w)
        zero, maxq = 1 << (bits - 1), (1 << bits) - 1
        err = torch.div(x, found.divisor).round_().clamp_(-zero, maxq - zero).mul_(found.scale).sub_(x)
        return (err.square_() * w.unsqueeze(1)).sum(0, dtype=torch.float64)


def candidates_of(module: Module) -> int:
    """Number of table rows measured for ``module`` (for progress reporting)."""
    return sum(len(TABLES[s.table]) for s in module.slots)
