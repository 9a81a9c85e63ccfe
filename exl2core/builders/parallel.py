"""Plans of parallel-block decoders (Cohere): one input norm feeds attention and the MLP side by side.

Because both branches read the same normed activation, q/k/v and gate/up share one Hessian (input
:data:`SHARED_INPUT`); the block is one module with two measured slots (``attn`` and ``mlp``), stored as
exllamav2's ``parallel_decoder`` record, each slot measured on its own branch's output.
"""

from __future__ import annotations

from dataclasses import replace

from exl2core.builders.decoder import (ATTN_ROLES, DecoderSpec, attention_linears, attention_tensors, decoder_norm, decoder_plan,
                                       layer_attention, layer_key, mlp_linears, mlp_slot)
from exl2core.model.config import ModelConfig
from exl2core.modules.parallel import BRANCH_OUTPUTS
from exl2core.plan import ModelPlan, ParallelModule, Slot

#: The activation both branches read, hence the one Hessian q, k, v, gate and up share.
SHARED_INPUT = "attn_in"


def parallel_module(config: ModelConfig, spec: DecoderSpec, layer: int) -> ParallelModule:
    """Layer ``layer`` as one ``parallel`` module: the attention sub-block's linears, tensors and
    parameters, plus the MLP's linears with gate/up reading the attention's input. ``spec.attn_norm``
    names the shared norm; the MLP's own norms are not used."""
    key = layer_key(spec, layer)
    mlp = tuple(replace(lin, input=SHARED_INPUT) if lin.name in ("gate_proj", "up_proj") else lin
                for lin in mlp_linears(config, spec, layer))
    slots = (Slot(f"{key}.self_attn", "attn", ATTN_ROLES, BRANCH_OUTPUTS["attn"]),
             replace(mlp_slot(key, mlp), output=BRANCH_OUTPUTS["mlp"]))
    return ParallelModule(key=key, mode="parallel_decoder", layer=layer,
                          linears=attention_linears(config, spec, layer) + mlp,
                          tensors=attention_tensors(spec, layer), slots=slots, norm=decoder_norm(config, spec),
                          attention=layer_attention(config, spec, layer), activation=spec.activation)


def parallel_decoder_plan(config: ModelConfig, architecture: str, spec: DecoderSpec, **plan_fields) -> ModelPlan:
    """``embedding, parallel_i for each layer, final norm, head``."""
    return decoder_plan(config, architecture, spec, lambda c, s, layer: (parallel_module(c, s, layer),),
                        **plan_fields)
