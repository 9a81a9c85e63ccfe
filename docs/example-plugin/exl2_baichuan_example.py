"""Baichuan-7B for exl2core: an example of a third-party architecture plugin.

The first Baichuan (``BaiChuanForCausalLM``, Baichuan-7B, published with remote code) is Llama with q, k
and v fused in one tensor per layer, ``self_attn.W_pack`` (their rows stacked in that order). exllamav2 0.3.2
does not know the architecture and loads it as Llama, which is right once ``W_pack`` is written as the
``q_proj`` / ``k_proj`` / ``v_proj`` Llama reads: the plan splits it so; everything else has Llama's names.
"""

from __future__ import annotations

from exl2core import hookimpl
from exl2core.builders.decoder import DecoderSpec, dense_decoder_plan
from exl2core.errors import Exl2Error
from exl2core.model.config import ModelConfig
from exl2core.plan import ModelPlan

#: config.json ``architectures`` value. Its ``model_type`` (``baichuan``) is not claimed: Baichuan-13B and
#: Baichuan 2 share it, with ALiBi (the 13B models) or a normalised head, which this example does not handle.
ARCHITECTURES = ("BaiChuanForCausalLM",)


def baichuan_spec(config: ModelConfig) -> DecoderSpec:
    """Llama with q/k/v read from the rows of ``W_pack``."""
    act = config.get("hidden_act", default="silu")
    if act != "silu":
        raise Exl2Error(f"{config.architecture}: hidden_act '{act}' is not supported (Baichuan uses silu)")
    return DecoderSpec(fused_qkv="W_pack")


@hookimpl
def exl2_architectures() -> list[str]:
    return list(ARCHITECTURES)


@hookimpl
def exl2_model_plan(config: ModelConfig, architecture: str) -> ModelPlan:
    """Asked only for the names :func:`exl2_architectures` claims."""
    return dense_decoder_plan(config, architecture, baichuan_spec(config))
