"""GLM-4 (``Glm4ForCausalLM``: GLM-4-9B-0414, GLM-4-32B-0414, GLM-Z1).

Llama with a post-norm after each sub-block (``post_self_attn_layernorm`` after attention,
``post_mlp_layernorm`` after the MLP; ``post_attention_layernorm`` is the MLP's input norm), GPT-J
(interleaved) RoPE on the first ``partial_rotary_factor`` of each head, a bias on q/k/v (``attention_bias``)
but never on o_proj, and gate/up fused in ``mlp.gate_up_proj``, which the plan splits into the
``gate_proj`` / ``up_proj`` linears exllamav2 0.3.2 reads in its place (exl2-format §9.4).
"""

from __future__ import annotations

from exl2core import hookimpl
from exl2core.builders.decoder import DecoderSpec, dense_decoder_plan
from exl2core.errors import Exl2Error
from exl2core.model.config import ModelConfig
from exl2core.plan import ModelPlan

ARCHITECTURES = ("Glm4ForCausalLM", "glm4")


def glm4_spec(config: ModelConfig) -> DecoderSpec:
    act = config.get("hidden_act", default="silu")
    if act != "silu":
        raise Exl2Error(f"{config.architecture}: hidden_act '{act}' is not supported (GLM-4 uses silu)")
    return DecoderSpec(qkv_bias=bool(config.get("attention_bias", default=True)), rope_style="gptj",
                       attn_post_norm="post_self_attn_layernorm", mlp_norm="post_attention_layernorm",
                       mlp_post_norm="post_mlp_layernorm", fused_gate_up="gate_up_proj")


@hookimpl
def exl2_architectures() -> list[str]:
    return list(ARCHITECTURES)


@hookimpl
def exl2_model_plan(config: ModelConfig, architecture: str) -> ModelPlan:
    return dense_decoder_plan(config, architecture, glm4_spec(config))
