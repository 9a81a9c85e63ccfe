"""Cohere (Command R) and Cohere2 (Command R7B): parallel decoder blocks.

Each layer has one LayerNorm (weight only) whose output feeds attention and the gated SiLU MLP side by
side; RoPE rotates interleaved channel pairs (GPT-J style); the head is tied to the embedding and its
logits are multiplied by ``logit_scale``. Command R+ adds per-head LayerNorms on q and k
(``use_qk_norm``). Cohere2 alternates sliding-window layers, which use RoPE, with full-attention
layers, which use no position embedding at all.
"""

from __future__ import annotations

from dataclasses import replace

from exl2core import hookimpl
from exl2core.model.config import ModelConfig
from exl2core.builders.decoder import DecoderSpec, layer_rope, layer_types
from exl2core.builders.parallel import parallel_decoder_plan
from exl2core.plan import ModelPlan


#: transformers' default when config.json has no ``logit_scale``.
DEFAULT_LOGIT_SCALE = 0.0625
#: Cohere2's default ``sliding_window_pattern``: every 4th layer is a full-attention layer.
DEFAULT_SLIDING_PATTERN = 4

COHERE = ("CohereForCausalLM", "cohere")
COHERE2 = ("Cohere2ForCausalLM", "cohere2")


def cohere_spec(config: ModelConfig) -> DecoderSpec:
    bias = bool(config.get("attention_bias", default=False))
    return DecoderSpec(norm="layer", rope_style="gptj", activation="silu", qkv_bias=bias, o_bias=bias,
                       qk_norm=bool(config.get("use_qk_norm", default=False)),
                       logit_scale=float(config.get("logit_scale", default=DEFAULT_LOGIT_SCALE)))


def cohere2_sliding(config: ModelConfig) -> list[bool]:
    """Which layers use the sliding window: ``layer_types`` when present, else every layer but each
    ``sliding_window_pattern``-th."""
    types = layer_types(config)
    if types is not None:
        return [t == "sliding_attention" for t in types]
    pattern = int(config.get("sliding_window_pattern", default=DEFAULT_SLIDING_PATTERN))
    return [(i + 1) % pattern != 0 for i in range(config.num_layers)]


def cohere_plan(config: ModelConfig, architecture: str) -> ModelPlan:
    spec = cohere_spec(config)
    if architecture not in COHERE2:
        return parallel_decoder_plan(config, architecture, spec)
    sliding = cohere2_sliding(config)
    window = config.get("sliding_window", "sliding_window_size")
    spec = replace(spec, sliding_windows=[int(window) if s and window else None for s in sliding],
                   layer_ropes=[layer_rope(config, i) if s else None for i, s in enumerate(sliding)])
    return parallel_decoder_plan(config, architecture, spec)


@hookimpl
def exl2_architectures() -> list[str]:
    return [*COHERE, *COHERE2]


@hookimpl
def exl2_model_plan(config: ModelConfig, architecture: str) -> ModelPlan | None:
    if architecture not in COHERE + COHERE2:
        return None
    return cohere_plan(config, architecture)
