"""The BigCode family: Starcoder2 (``Starcoder2ForCausalLM``).

Starcoder2 is the pre-norm decoder with LayerNorm (weight and bias), a bias on every projection, NeoX
RoPE and an ungated GELU(tanh) MLP whose projections the checkpoint calls ``mlp.c_fc`` and ``mlp.c_proj``;
the head is tied to the embedding unless config.json says otherwise. exllamav2 0.3.2 reads those names,
expects every bias, and reads the norm epsilon as ``layer_norm_epsilon`` (Starcoder2's config.json says
``norm_epsilon``), which the output config.json gains.
"""

from __future__ import annotations

import dataclasses

from exl2core import hookimpl
from exl2core.builders.decoder import DecoderSpec, dense_decoder_plan
from exl2core.errors import Exl2Error
from exl2core.model.config import ModelConfig
from exl2core.plan import ModelPlan

ARCHITECTURES = ("Starcoder2ForCausalLM", "starcoder2")
#: The activations Starcoder2 checkpoints name; exllamav2 runs GELU with the tanh approximation.
GELU_TANH = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")


def starcoder2_epsilon(config: ModelConfig) -> float:
    return float(config.get("norm_epsilon", "layer_norm_epsilon", default=1e-5))


def starcoder2_output_config(raw: dict) -> dict:
    """config.json with ``layer_norm_epsilon``, the key exllamav2 0.3.2 reads Starcoder2's epsilon from."""
    out = dict(raw)
    out.setdefault("layer_norm_epsilon", raw.get("norm_epsilon", 1e-5))
    return out


def starcoder2_plan(config: ModelConfig, architecture: str) -> ModelPlan:
    act = config.get("hidden_act", default="gelu_pytorch_tanh")
    if act not in GELU_TANH:
        raise Exl2Error(f"{config.architecture}: hidden_act '{act}' is not supported (exllamav2 runs "
                        "Starcoder2 with GELU, tanh approximation)")
    if not config.get("use_bias", default=True):
        raise Exl2Error(f"{config.architecture}: use_bias = false is not supported (exllamav2 0.3.2 expects "
                        "a bias on every projection of Starcoder2)")
    config = dataclasses.replace(config, norm_eps=starcoder2_epsilon(config))
    spec = DecoderSpec(norm="layer", norm_bias=True, activation="gelu_tanh", gated_mlp=False, qkv_bias=True,
                       o_bias=True, mlp_bias=True, linear_names={"up_proj": "c_fc", "down_proj": "c_proj"},
                       tied_head=bool(config.get("tie_word_embeddings", default=True)))
    return dense_decoder_plan(config, architecture, spec, output_config=starcoder2_output_config)


@hookimpl
def exl2_architectures() -> list[str]:
    return list(ARCHITECTURES)


@hookimpl
def exl2_model_plan(config: ModelConfig, architecture: str) -> ModelPlan:
    return starcoder2_plan(config, architecture)
