"""Parallel decoder block (Cohere): one input norm feeds attention and the MLP side by side,
``x + attn(norm(x)) + mlp(norm(x))``.

Because both branches read the same normed activation, q/k/v and gate/up share one Hessian (input
``attn_in``); the block is one module with two measured slots (``attn`` and ``mlp``), stored as
exllamav2's ``parallel_decoder`` record. As in exllamav2 (exl2-format §5.4), each slot's error is measured on
its own branch's output, residual excluded, which the forward reports under ``BRANCH_OUTPUTS``.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from exl2core.model.config import ModelConfig
from exl2core.modules.attention import attention_branch
from exl2core.modules.decoder import (DecoderSpec, attention_module, embedding_module, final_norm_module,
                                      head_module, mlp_module)
from exl2core.modules.linear import Capture
from exl2core.modules.mlp import activation, feed_forward
from exl2core.modules.norm import norm_role
from exl2core.plan import Module, ModelPlan

#: The activation both branches read, hence the one Hessian q, k, v, gate and up share.
SHARED_INPUT = "attn_in"
#: Capture names of the two branch outputs, by table: what each slot's error is measured on.
BRANCH_OUTPUTS = {"attn": "attn_branch", "mlp": "mlp_branch"}


def parallel_module(config: ModelConfig, spec: DecoderSpec, layer: int) -> Module:
    """Layer ``layer`` as one ``parallel`` module: the attention sub-block's linears, tensors and fields,
    plus the MLP's linears with gate/up reading the attention's input. ``spec.attn_norm`` names the
    shared norm; the MLP's own norms are not used."""
    attn = attention_module(config, spec, layer)
    mlp = mlp_module(config, spec, layer)
    mlp_linears = [replace(lin, input=SHARED_INPUT) if lin.name in ("gate_proj", "up_proj") else lin
                   for lin in mlp.linears]
    return Module(kind="parallel", key=attn.key, mode="parallel_decoder",
                  linears=attn.linears + mlp_linears, tensors=dict(attn.tensors),
                  fields={**attn.fields, "activation": spec.activation},
                  slots=[replace(slot, output=BRANCH_OUTPUTS[slot.table]) for slot in attn.slots + mlp.slots])


def parallel_decoder_plan(config: ModelConfig, architecture: str, spec: DecoderSpec) -> ModelPlan:
    """``embedding, parallel_i for each layer, final norm, head``."""
    modules = [embedding_module(config, spec)]
    modules += [parallel_module(config, spec, layer) for layer in range(config.num_layers)]
    modules += [final_norm_module(config, spec), head_module(config, spec)]
    return ModelPlan(architecture=architecture, config=config, modules=modules, lm_prefix=spec.lm_prefix,
                     fp32_residual=spec.fp32_residual)


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


def parallel_forward(module: Module, weights: dict[str, torch.Tensor], x: torch.Tensor,
                     capture: Capture | None = None) -> torch.Tensor:
    """``x + attn(norm(x)) + mlp(norm(x))`` for ``x`` of shape ``[B, T, hidden]``."""
    f = module.fields
    capture = _each_input_once(capture)
    h = norm_role(x, weights, "input_norm", f, out_dtype=weights["q_proj"].dtype)
    attn = attention_branch(module, weights, h, capture)
    mlp = feed_forward(weights, h, activation(f.get("activation", "silu")), module, capture)
    if capture is not None:
        capture(BRANCH_OUTPUTS["attn"], attn)
        capture(BRANCH_OUTPUTS["mlp"], mlp)
    return x + attn.to(x.dtype) + mlp.to(x.dtype)
