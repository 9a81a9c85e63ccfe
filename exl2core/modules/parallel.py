"""Parallel decoder block (Cohere): one input norm feeds attention and the MLP side by side,
``x + attn(norm(x)) + mlp(norm(x))``.

Because both branches read the same normed activation, q/k/v and gate/up share one Hessian (input
``attn_in``); the block is one module with two measured slots (``attn`` and ``mlp``), stored as
exllamav2's ``parallel_decoder`` record. As in exllamav2 (exl2-format §5.4), each slot's error is measured on
its own branch's output, residual excluded, which the forward reports under ``BRANCH_OUTPUTS``.
"""

from __future__ import annotations

import torch

from exl2core.modules.attention import attention_branch
from exl2core.modules.linear import Capture, apply_linear
from exl2core.modules.mlp import activation, feed_forward
from exl2core.modules.norm import norm_role
from exl2core.plan import ParallelModule

#: Capture names of the two branch outputs, by table: what each slot's error is measured on.
BRANCH_OUTPUTS = {"attn": "attn_branch", "mlp": "mlp_branch"}


def _each_input_once(capture: Capture | None) -> Capture | None:
    """A capture that forwards only the first report of each input name: both branches report the
    shared input, which must enter its Hessian once."""
    if capture is None:
        return None
    seen: set[str] = set()

    def once(name: str, x: torch.Tensor) -> None:
        if name not in seen:
            seen.add(name)
            capture(name, x)

    return once


def parallel_forward(module: ParallelModule, weights: dict[str, torch.Tensor], x: torch.Tensor,
                     capture: Capture | None = None) -> torch.Tensor:
    """``x + attn(norm(x)) + mlp(norm(x))`` for ``x`` of shape ``[B, T, hidden]``."""
    capture = _each_input_once(capture)
    h = norm_role(x, weights, "input_norm", module.norm, out_dtype=weights["q_proj"].dtype)
    attn = attention_branch(module, weights, h, capture)
    mlp = feed_forward(weights, h, activation(module.activation), module, capture)
    if capture is not None:
        capture(BRANCH_OUTPUTS["attn"], attn)
        capture(BRANCH_OUTPUTS["mlp"], mlp)
    return x + attn.to(x.dtype) + mlp.to(x.dtype)


def parallel_tail(module: ParallelModule, weights: dict[str, torch.Tensor], x: torch.Tensor,
                  inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """:func:`parallel_forward` from the inputs of o_proj and down_proj on, bit for bit."""
    attn = apply_linear(weights, "o_proj", inputs[module.linear("o_proj").input])
    mlp = apply_linear(weights, "down_proj", inputs[module.linear("down_proj").input])
    return x + attn.to(x.dtype) + mlp.to(x.dtype)
