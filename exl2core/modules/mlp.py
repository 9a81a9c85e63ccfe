"""Feed-forward sub-block: pre-norm, (gated) up projection, activation, down projection, optional
post-norm, residual add."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from exl2core.errors import Exl2Error
from exl2core.modules.linear import Capture, apply_linear, capture_inputs
from exl2core.modules.norm import norm_role
from exl2core.plan import MlpModule, Module

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}

#: Largest finite float16; exllamav2 clamps the down projection's input to it.
FP16_MAX = 65504.0


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise Exl2Error(f"unknown activation '{name}' (expected one of {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def feed_forward(weights: dict[str, torch.Tensor], h: torch.Tensor, act: Callable, module: Module,
                 capture: Capture | None) -> torch.Tensor:
    """``down(act(gate(h)) · up(h))`` (``down(act(up(h)))`` without a gate) for already-normed ``h``.

    The down projection's input is clamped to the float16 range in float16, as exllamav2 does, so one
    outlier does not turn into inf."""
    gate, up, down = "gate_proj", "up_proj", "down_proj"
    capture_inputs(module, (gate, up), h, capture)
    if gate in weights:
        inner = act(apply_linear(weights, gate, h)) * apply_linear(weights, up, h)
    else:
        inner = act(apply_linear(weights, up, h))
    if inner.dtype == torch.float16:
        inner = inner.clamp(-FP16_MAX, FP16_MAX)
    capture_inputs(module, (down,), inner, capture)
    return apply_linear(weights, down, inner)


def mlp_forward(module: MlpModule, weights: dict[str, torch.Tensor], x: torch.Tensor,
                capture: Capture | None = None) -> torch.Tensor:
    """``x + mlp(norm(x))`` for ``x`` of shape ``[B, T, hidden]``."""
    h = norm_role(x, weights, "input_norm", module.norm, out_dtype=weights["up_proj"].dtype)
    return _residual(module, weights, x, feed_forward(weights, h, activation(module.activation), module, capture))


def mlp_tail(module: MlpModule, weights: dict[str, torch.Tensor], x: torch.Tensor,
             inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """:func:`mlp_forward` from down_proj's input (``inputs[down_proj.input]``) on, bit for bit."""
    return _residual(module, weights, x, apply_linear(weights, "down_proj", inputs[module.linear("down_proj").input]))


def _residual(module: MlpModule, weights: dict[str, torch.Tensor], x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if "post_norm" in weights:
        out = norm_role(out, weights, "post_norm", module.norm, out_dtype=x.dtype)
    return x + out.to(x.dtype)
