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
#: Dtype float32 linears multiply in; set only by :func:`linear_products_in`.
_product_dtype: ContextVar[torch.dtype | None] = ContextVar("linear_product_dtype", default=None)


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


@contextmanager
def linear_products_in(dtype: torch.dtype | None) -> Iterator[None]:
    """Multiply float32 linears and attention in ``dtype`` (``None``: in float32) within this block.

    Operands are rounded to ``dtype`` for the product (the kernels accumulate in float32) and the result,
    rounded to ``dtype``, returns as float32, so norms, activations and the residual stream keep their
    precision. On CPUs with AMX or AVX512-BF16, bfloat16 linears run about 4× and attention about 2.4×
    faster than in float32, and a calibration forward is mostly these products."""
    token = _product_dtype.set(dtype)
    try:
        yield
    finally:
        _product_dtype.reset(token)


def product_dtype() -> torch.dtype | None:
    """The dtype :func:`linear_products_in` set for float32 products here, or None (float32)."""
    return _product_dtype.get()


def native_product_dtype(device: str) -> str:
    """``bfloat16`` on a CPU that multiplies it natively (AVX512-BF16 or AMX), else ``float32``.

    Elsewhere bfloat16 products are emulated and slower than float32 ones; on CUDA a job computes in
    float16 and the setting has no effect."""
    if torch.device(device).type == "cpu" and torch.cpu._is_avx512_bf16_supported():
        return "bfloat16"
    return "float32"


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
    """``x · Wᵀ + b`` in the weight's dtype (the bias is ``weights[name + ".bias"]`` when present); float32
    products in the dtype :func:`linear_products_in` sets."""
    w, b = weights[name], weights.get(name + ".bias")
    product = _product_dtype.get()
    if product is None or w.dtype != torch.float32:
        y = F.linear(x.to(w.dtype), w, b)
    else:
        y = F.linear(x.to(product), w.to(product), None if b is None else b.to(product)).float()
    observer = _output_observer.get()
    if observer is not None:
        observer(name, y)
    return y
