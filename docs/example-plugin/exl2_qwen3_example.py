"""Qwen3 (dense) for exl2core: an example of a third-party architecture plugin.

Qwen3 is Llama with one addition: after the q and k projections, every head is normalised by an
RMSNorm of width ``head_dim`` (``self_attn.q_norm``, ``self_attn.k_norm``) before RoPE. Its
``head_dim`` is set in config.json and is not ``hidden_size / num_attention_heads``; the core reads
it from there. exllamav2 0.3.2 recognises ``Qwen3ForCausalLM`` and reads those tensor names, so the
plan keeps the checkpoint's names.
"""

from __future__ import annotations

from exl2core import hookimpl
from exl2core.builders.decoder import DecoderSpec, config_biases, dense_decoder_plan
from exl2core.errors import Exl2Error
from exl2core.model.config import ModelConfig
from exl2core.plan import ModelPlan

#: config.json ``architectures`` value, and the ``model_type`` matched when the architecture is unknown.
ARCHITECTURES = ("Qwen3ForCausalLM", "qwen3")


def qwen3_spec(config: ModelConfig) -> DecoderSpec:
    """Llama plus q/k norms; biases only where config.json asks (``attention_bias``, ``mlp_bias``)."""
    act = config.get("hidden_act", default="silu")
    if act != "silu":
        raise Exl2Error(f"{config.architecture}: hidden_act '{act}' is not supported (Qwen3 uses silu)")
    return DecoderSpec(qk_norm=True, **config_biases(config))


@hookimpl
def exl2_architectures() -> list[str]:
    return list(ARCHITECTURES)


@hookimpl
def exl2_model_plan(config: ModelConfig, architecture: str) -> ModelPlan:
    """Asked only for the names :func:`exl2_architectures` claims."""
    return dense_decoder_plan(config, architecture, qwen3_spec(config))
