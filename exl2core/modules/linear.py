"""Applying a module's linears from its weight dict, reporting their inputs for Hessian collection."""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from exl2core.plan import Module

Capture = Callable[[str, torch.Tensor], None]

#: Observer of every linear output (``name, y``); set only by :func:`observe_linear_outputs`.
_output_observer: ContextVar[Capture | None] = ContextVar("linear_output_observer", default=None)


@contextmanager
def observe_linear_outputs(observer: Capture) -> Iterator[None]:
    """Call ``observer(name, y)`` with the output of every linear applied in this block.

    The sensitivity pass needs each linear's output gradient; observing here reaches every module
    kind's forward (plugins' too) without a second callback in the forward contract."""
    token = _output_observer.set(observer)
    try:
        yield
    finally:
        _output_observer.reset(token)


def capture_inputs(module: Module, names: tuple[str, ...], x: torch.Tensor, capture: Capture | None) -> None:
    """Report ``x`` once per distinct ``Linear.input`` among the linears ``names`` (those present).

    Linears sharing an input share one Hessian, so the activation must be counted once, not once per
    linear."""
    if capture is None:
        return
    present = {lin.name: lin.input for lin in module.linears}
    for input_name in dict.fromkeys(present[n] for n in names if n in present):
        capture(input_name, x)


def apply_linear(weights: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    """``x · Wᵀ + b`` in the weight's dtype (the bias is ``weights[name + ".bias"]`` when present)."""
    w = weights[name]
    y = F.linear(x.to(w.dtype), w, weights.get(name + ".bias"))
    observer = _output_observer.get()
    if observer is not None:
        observer(name, y)
    return y
