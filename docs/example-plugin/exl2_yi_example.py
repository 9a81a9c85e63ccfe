"""Yi for exl2core: an example of a third-party architecture plugin.

The original Yi checkpoints (``YiForCausalLM``, published with remote code) are Llama with other names for
the two norms of each layer: ``ln1`` before attention and ``ln2`` before the MLP, where Llama has
``input_layernorm`` and ``post_attention_layernorm``. exllamav2 0.3.2 recognises ``YiForCausalLM`` and
reads those names, so the plan keeps the checkpoint's names.
"""

from __future__ import annotations

from exl2core import hookimpl
from exl2core.builders.decoder import DecoderSpec, config_biases, dense_decoder_plan
from exl2core.errors import Exl2Error
from exl2core.model.config import ModelConfig
from exl2core.plan import ModelPlan

#: config.json ``architectures`` value, and the ``model_type`` matched when the architecture is unknown.
ARCHITECTURES = ("YiForCausalLM", "Yi")


def yi_spec(config: ModelConfig) -> DecoderSpec:
    """Llama with the norms named ``ln1`` / ``ln2``; biases only where config.json asks."""
    act = config.get("hidden_act", default="silu")
    if act != "silu":
        raise Exl2Error(f"{config.architecture}: hidden_act '{act}' is not supported (Yi uses silu)")
    return DecoderSpec(attn_norm="ln1", mlp_norm="ln2", **config_biases(config))


@hookimpl
def exl2_architectures() -> list[str]:
    return list(ARCHITECTURES)


@hookimpl
def exl2_model_plan(config: ModelConfig, architecture: str) -> ModelPlan:
    """Asked only for the names :func:`exl2_architectures` claims."""
    return dense_decoder_plan(config, architecture, yi_spec(config))
