"""Hessians of a module's linear inputs for the quantization pass, optionally paired with the inputs the
unquantized model gives the same linears (asymmetric calibration, ``gptq.Hessian``).

The reference stream is the unquantized model's hidden states: each row runs through the module twice,
once with the reference weights on the reference row (its linear inputs are kept for that row only), once
with the current weights on the quantized row, whose inputs accumulate the Hessians and the cross terms.
A pass that only needs the inputs of the module's first linears stops each quantized row's forward once
it has them (``stop_after``): the rest of that forward would be discarded. A pass may also keep the
quantized rows' inputs to its linears (``keep_inputs``), from which the module's tail later gives its
outputs (``modules.forward``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from exl2core.errors import Exl2Error
from exl2core.pipeline.hidden import HiddenStates
from exl2core.plan import Module
from exl2core.quant.gptq import Hessian


#: ``(linear input name, calibration row) → per-token factors [T] or None`` (``TokenWeights.factors``).
TokenFactor = Callable[[str, int], "torch.Tensor | None"]


class _Captured(Exception):
    """Raised from the capture callback to end a forward whose remaining work nobody reads."""


@dataclass
class Collected:
    """What one pass over the rows gathered: Hessians by capture name, the module's outputs on the
    quantized rows (None for a pass stopped after its inputs), with a reference stream its outputs on the
    reference rows, and the reference and quantized rows' inputs kept for later (one dict per row)."""

    hessians: dict[str, Hessian]
    outputs: list[torch.Tensor] | None
    reference_outputs: list[torch.Tensor] | None
    reference_inputs: list[dict[str, torch.Tensor]] | None = None
    inputs: list[dict[str, torch.Tensor]] | None = None


def first_input(fwd: Callable, module: Module, weights: dict[str, torch.Tensor], states: HiddenStates) -> str:
    """The linear input the forward reports first (the one no linear of the module produces), found on
    one token of the first row."""
    inputs = {lin.input for lin in module.linears}
    order: list[str] = []
    with torch.inference_mode():
        fwd(module, weights, states.row(0)[:, :1], lambda name, x: order.append(name) if name in inputs else None)
    if not order:
        raise Exl2Error(f"{module.key}: the forward reported none of its linears' inputs")
    return order[0]


def collect(fwd: Callable, module: Module, weights: dict[str, torch.Tensor], states: HiddenStates, *,
            inputs: set[str] | None = None, reference: HiddenStates | None = None,
            reference_weights: dict[str, torch.Tensor] | None = None,
            paired: set[str] = frozenset(), keep: set[str] = frozenset(),
            reference_inputs: list[dict[str, torch.Tensor]] | None = None,
            stop_after: set[str] = frozenset(), token_factor: TokenFactor | None = None,
            keep_inputs: set[str] = frozenset(), products: torch.dtype | None = None) -> Collected:
    """Run ``module`` over every row, accumulating a Hessian per captured name (of the linear inputs, only
    ``inputs`` when given; other captures, such as an MoE block's routed-token counts, always). Names in
    ``paired`` get the cross term with the reference stream's input to the same linear: from
    ``reference_inputs`` (kept by an earlier pass) when given, else from running ``reference`` with
    ``reference_weights``, whose outputs are then returned, as are its inputs named in ``keep``. With
    ``stop_after``, each quantized row's forward ends once all those names are captured, and no outputs
    are returned. ``token_factor(name, row)`` gives the per-token factors a row's input (and its reference
    input) is scaled by before it is accumulated (``pipeline.token_weights``), or None. The quantized rows'
    inputs named in ``keep_inputs`` are returned unscaled. ``products`` is the Hessians' product dtype
    (``gptq.Hessian``)."""
    if paired and reference is None and reference_inputs is None:
        raise ValueError("paired Hessians need a reference stream")
    run_reference = reference is not None and reference_inputs is None
    reported = {slot.output for slot in module.slots if slot.output}
    hessians: dict[str, Hessian] = {}
    ref_inputs: dict[str, torch.Tensor] = {}
    own_inputs: dict[str, torch.Tensor] = {}
    pending: set[str] = set()
    current = 0

    linear_inputs = {lin.input for lin in module.linears}

    def wanted(name: str) -> bool:
        return name not in reported and (inputs is None or name in inputs or name not in linear_inputs)

    def keep_reference(name: str, x: torch.Tensor) -> None:
        if name in paired or name in keep:
            ref_inputs[name] = x

    def accumulate(name: str, x: torch.Tensor) -> None:
        if not wanted(name):
            return
        if name in keep_inputs:
            own_inputs[name] = x.to(states.rows[current - states.first].device)
        if name not in hessians:
            hessians[name] = Hessian(x.shape[-1], x.device, asymmetric=name in paired, products=products)
        ref = ref_inputs.get(name)
        ref = None if ref is None else ref.to(x.device)
        factor = None if token_factor is None else token_factor(name, current)
        if factor is not None and factor.numel() == x.shape[:-1].numel():
            factor = factor.to(x.device).view(*x.shape[:-1], 1)
            x, ref = x.float() * factor, None if ref is None else ref.float() * factor
        hessians[name].add(x, ref, row=current)
        if stop_after:
            pending.discard(name)
            if not pending:
                raise _Captured

    outputs = None if stop_after else []
    ref_outputs = [] if run_reference else None
    kept = [] if run_reference and keep else None
    own_kept = [] if keep_inputs else None
    with torch.inference_mode():
        for i in range(len(states)):
            current = states.first + i
            ref_inputs.clear()
            if reference_inputs is not None:
                ref_inputs.update(reference_inputs[i])
            elif run_reference:
                y_ref = fwd(module, reference_weights, reference.row(i), keep_reference)
                _check_finite(module, y_ref, current)
                ref_outputs.append(y_ref.to(reference.rows[i].device))
                if kept is not None:
                    kept.append({n: x.to(reference.rows[i].device) for n, x in ref_inputs.items() if n in keep})
            pending.update(stop_after)
            own_inputs.clear()
            try:
                y = fwd(module, weights, states.row(i), accumulate)
            except _Captured:
                y = None
            if own_kept is not None:
                own_kept.append(dict(own_inputs))
            if y is None:
                continue
            _check_finite(module, y, current)
            if outputs is not None:
                outputs.append(y.to(states.rows[i].device))
    return Collected(hessians, outputs, ref_outputs, kept, own_kept)


def _check_finite(module: Module, y: torch.Tensor, row: int) -> None:
    if not torch.isfinite(y.sum(dtype=torch.float32)):
        raise Exl2Error(f"{module.key}: non-finite activations in calibration row {row} "
                        "(the source model overflows in this precision)")
