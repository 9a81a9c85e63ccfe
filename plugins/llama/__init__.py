"""Llama-family architectures: Llama, Mistral, Qwen2, Qwen3 (dense), Phi-3, Orion, Index, Yi.

All are the plain pre-norm decoder (RMSNorm, NeoX RoPE, SiLU-gated MLP); they differ in which
projections carry a bias, and Qwen3 normalises every head of q and k (``self_attn.q_norm`` / ``k_norm``,
RMSNorm of width ``head_dim``, before RoPE), with a ``head_dim`` that config.json sets apart from
``hidden_size / heads``. Phi-3 (and Phi-4) stores q/k/v and gate/up fused, which the plan splits into
the separate linears exllamav2 reads. Orion (remote code) normalises with LayerNorms; Index (remote code)
is Llama whose head rows are scaled to unit norm (``norm_head``), which the plan quantizes so. The original Yi
(``YiForCausalLM``, remote code) is Llama with its norms named ``ln1`` / ``ln2``. Sliding windows come from the
config.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from exl2core import hookimpl
from exl2core.model.config import ModelConfig
from exl2core.builders.decoder import DecoderSpec, config_biases, dense_decoder_plan
from exl2core.errors import Exl2Error
from exl2core.plan import ModelPlan


def _llama(config: ModelConfig) -> DecoderSpec:
    """Biases only where config.json asks for them (``attention_bias``, ``mlp_bias``)."""
    return DecoderSpec(**config_biases(config))


def _qwen2(config: ModelConfig) -> DecoderSpec:
    """q/k/v always have a bias, o_proj never."""
    return DecoderSpec(qkv_bias=True)


def _qwen3(config: ModelConfig) -> DecoderSpec:
    """Llama plus q/k norms; biases only where config.json asks (exllamav2 0.3.2 reads the same keys)."""
    act = config.get("hidden_act", default="silu")
    if act != "silu":
        raise Exl2Error(f"{config.architecture}: hidden_act '{act}' is not supported (Qwen3 uses silu)")
    return DecoderSpec(qk_norm=True, **config_biases(config))


def _phi3(config: ModelConfig) -> DecoderSpec:
    """Llama with q/k/v in one tensor (``self_attn.qkv_proj``) and gate/up in another (``mlp.gate_up_proj``),
    split into the linears exllamav2 0.3.2 reads in their place (``q_proj`` … ``up_proj``)."""
    act = config.get("hidden_act", default="silu")
    if act != "silu":
        raise Exl2Error(f"{config.architecture}: hidden_act '{act}' is not supported (Phi-3 uses silu)")
    return DecoderSpec(fused_qkv="qkv_proj", fused_gate_up="gate_up_proj")


def _orion(config: ModelConfig) -> DecoderSpec:
    """Orion (remote code): Llama with LayerNorms (weight and bias) for its norms."""
    return DecoderSpec(norm="layer", norm_bias=True, **config_biases(config))


def _yi(config: ModelConfig) -> DecoderSpec:
    """The original Yi (remote code): Llama with the norms named ``ln1`` / ``ln2``, exllamav2 0.3.2's keys."""
    return DecoderSpec(attn_norm="ln1", mlp_norm="ln2", **config_biases(config))


#: architectures / model_type → the decoder it is.
ARCHITECTURES: dict[str, Callable[[ModelConfig], DecoderSpec]] = {
    "LlamaForCausalLM": _llama,
    "MistralForCausalLM": _llama,
    "Qwen2ForCausalLM": _qwen2,
    "Qwen3ForCausalLM": _qwen3,
    "Phi3ForCausalLM": _phi3,
    "OrionForCausalLM": _orion,
    "IndexForCausalLM": _llama,
    "YiForCausalLM": _yi,
    "llama": _llama,
    "mistral": _llama,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "phi3": _phi3,
    "orion": _orion,
    "index": _llama,
    "Yi": _yi,
}


@hookimpl
def exl2_architectures() -> list[str]:
    return list(ARCHITECTURES)


def _normalized_head(plan: ModelPlan) -> ModelPlan:
    """Index with ``norm_head``: the head's rows scaled to unit norm before use (and before quantization)."""
    if not plan.config.get("norm_head"):
        return plan
    head = plan.head
    lm_head = dataclasses.replace(head.linears[0], normalized=True)
    return dataclasses.replace(plan, modules=plan.modules[:-1] + (dataclasses.replace(head, linears=(lm_head,)),))


#: architectures / model_type → what the plan gains beyond the decoder.
PLAN_CHANGES: dict[str, Callable[[ModelPlan], ModelPlan]] = {"IndexForCausalLM": _normalized_head,
                                                             "index": _normalized_head}


@hookimpl
def exl2_model_plan(config: ModelConfig, architecture: str) -> ModelPlan | None:
    spec = ARCHITECTURES.get(architecture)
    if spec is None:
        return None
    plan = dense_decoder_plan(config, architecture, spec(config))
    return PLAN_CHANGES.get(architecture, lambda p: p)(plan)
