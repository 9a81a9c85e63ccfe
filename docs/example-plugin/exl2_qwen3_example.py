"""Qwen3 (dense) for exl2core: an example of a third-party architecture plugin.

Qwen3 is Llama with one addition: after the q and k projections, every head is normalised by an
RMSNorm of width ``head_dim`` (``self_attn.q_norm``, ``self_attn.k_norm``) before RoPE. Its
``head_dim`` is set in config.json and is not ``hidden_size / num_attention_heads``; the core reads
it from there. exllamav2 0.3.2 recognises ``Qwen3ForCausalLM`` and reads those tensor names, so the
plan keeps the checkpoint's names and needs no optional hook.
"""

from __future__ import annotations

from exl2core.errors import Exl2Error
from exl2core.model.config import ModelConfig
from exl2core.modules.decoder import DecoderSpec, dense_decoder_plan
from exl2core.plan import ModelPlan
from exl2core import hookimpl

#: config.json ``architectures`` value, and the ``model_type`` matched when the architecture is unknown.
ARCHITECTURES = ("Qwen3ForCausalLM", "qwen3")


def qwen3_spec(config: ModelConfig) -> DecoderSpec:
    """Llama plus q/k norms; biases on all four attention projections only if config.json asks."""
    act = config.get("hidden_act", default="silu")
    if act != "silu":
        raise Exl2Error(f"{config.architecture}: hidden_act '{act}' is not supported (Qwen3 uses silu)")
    bias = bool(config.get("attention_bias", default=False))
    return DecoderSpec(qk_norm=True, qkv_bias=bias, o_bias=bias)


@hookimpl
def exl2_architectures() -> list[str]:
    return list(ARCHITECTURES)


@hookimpl
def exl2_model_plan(config: ModelConfig, architecture: str) -> ModelPlan | None:
    if architecture not in ARCHITECTURES:
        return None
    return dense_decoder_plan(config, architecture, qwen3_spec(config))
