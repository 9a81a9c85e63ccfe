"""Gemma-family architectures: Gemma, Gemma 2, Gemma 3 (text-only, and the VLM).

What sets them apart from Llama (exl2-format §9.4–9.5): RMSNorm weights are stored as ``w − 1`` (offset 1),
embeddings are scaled by √hidden, the gated MLP uses GELU(tanh) and the head is the embedding. Gemma 2
adds a post-norm after each sub-block, logit soft-capping, an attention scale of
``query_pre_attn_scalar^−½``, sliding-window attention on every other layer and the fp32 residual stream
exllamav2 runs it with (Gemma's hidden states overflow float16). Gemma 3 adds q/k norms, a sliding
pattern of five local layers per global one and a separate RoPE for the local layers.

The Gemma 3 VLM (``Gemma3ForConditionalGeneration``): its language model is quantized, the SigLIP tower
and the projector are carried (``vision_tower.vision_model.*``, ``multi_modal_projector.*`` with
``mm_input_projection_weight`` renamed ``mm_input_projection.weight``), from checkpoints of either
layout of ``exl2core.builders.multimodal``. Text-only Gemma 3 (``Gemma3ForCausalLM``, e.g. Gemma-3-270M) is
written as that VLM without a vision tower, the one Gemma 3 layout exllamav2 0.3.2 recognises.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection

from exl2core import hookimpl
from exl2core.builders.decoder import DecoderSpec, dense_decoder_plan, layer_types
from exl2core.builders.multimodal import carried_prefixes, is_nested, legacy_name, read_nested
from exl2core.errors import Exl2Error
from exl2core.model.config import ModelConfig, RopeSpec
from exl2core.plan import ModelPlan


VLM_ARCHITECTURE = "Gemma3ForConditionalGeneration"
#: exllamav2's prefix of the VLM's language model (``language_model.model.layers.*``).
VLM_LM_PREFIX = "language_model."
#: exllamav2 prefixes of the VLM's carried parts, projector first as exllamav2 writes them.
VLM_CARRIED = ("multi_modal_projector.", "vision_tower.")
#: Names exllamav2 reads differently from the checkpoints (exl2-format §8.1, §9.4): the tower …
VLM_TOWER = "vision_tower.vision_model."
#: … and the projection weight.
VLM_PROJECTION = ("multi_modal_projector.mm_input_projection_weight",
                  "multi_modal_projector.mm_input_projection.weight")

#: Gemma 3 text settings that checkpoints leave to transformers' defaults (exllamav2 assumes the same).
GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262_208,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "sliding_window_pattern": 6,
}



def _sliding_types(config: ModelConfig, pattern: int) -> list[str]:
    """Per-layer ``sliding_attention`` / ``full_attention``: the config's ``layer_types``, else (older
    configs) every ``pattern``-th layer global, the others sliding, as transformers and exllamav2 do."""
    types = layer_types(config)
    if types is not None:
        return types
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(config.num_layers)]


def _sliding_windows(config: ModelConfig, types: list[str]) -> list[int | None]:
    window = config.get("sliding_window", "sliding_window_size")
    if not window:
        raise Exl2Error(f"{config.architecture}: config.json lacks 'sliding_window'")
    return [int(window) if t == "sliding_attention" else None for t in types]


def _soft_cap(config: ModelConfig, name: str) -> float | None:
    value = config.get(name)
    return float(value) if value else None


def _tied(config: ModelConfig) -> bool:
    """Gemma ties the head to the embedding unless config.json says otherwise (the key is often absent)."""
    return bool(config.get("tie_word_embeddings", default=True))


def _gemma_spec(config: ModelConfig, lm_prefix: str = "") -> DecoderSpec:
    """Gemma: Llama with the Gemma quirks; no sliding window even if config.json names one.

    The activation is GELU(tanh) whatever ``hidden_act`` says: early checkpoints say ``gelu`` but the
    model was trained with the approximation, which is what exllamav2 runs."""
    return DecoderSpec(lm_prefix=lm_prefix, norm_offset=1.0, activation="gelu_tanh",
                       embed_scale=config.hidden_size ** 0.5, tied_head=_tied(config),
                       sliding_windows=[None] * config.num_layers)


def _gemma2_spec(config: ModelConfig, lm_prefix: str = "", pattern: int = 2,
                 qk_norm: bool = False, layer_ropes: list[RopeSpec] | None = None) -> DecoderSpec:
    types = _sliding_types(config, pattern)
    scalar = float(config.get("query_pre_attn_scalar", default=config.head_dim))
    return dataclasses.replace(
        _gemma_spec(config, lm_prefix),
        attn_post_norm="post_attention_layernorm",
        mlp_norm="pre_feedforward_layernorm",
        mlp_post_norm="post_feedforward_layernorm",
        attn_scale=scalar ** -0.5,
        attn_softcap=_soft_cap(config, "attn_logit_softcapping"),
        final_softcap=_soft_cap(config, "final_logit_softcapping"),
        fp32_residual=True,
        sliding_windows=_sliding_windows(config, types),
        qk_norm=qk_norm,
        layer_ropes=layer_ropes,
    )


def _gemma3_ropes(config: ModelConfig, types: list[str]) -> list[RopeSpec]:
    """Per-layer RoPE: the config's per-type parameters (transformers-5 ``rope_parameters``), else the
    global RoPE (``rope_theta``, ``rope_scaling``) on full layers and plain RoPE of base
    ``rope_local_base_freq`` on sliding ones."""
    by_type = dict(config.rope_by_layer_type)
    by_type.setdefault("full_attention", config.rope)
    by_type.setdefault("sliding_attention", RopeSpec(
        theta=float(config.get("rope_local_base_freq", default=10_000.0)),
        partial_rotary_factor=config.rope.partial_rotary_factor))
    return [by_type[t] for t in types]


def gemma3_config(config: ModelConfig) -> ModelConfig:
    """``config`` with Gemma 3's defaults filled in where config.json leaves them out (the released VLM
    configs omit e.g. ``head_dim``, which is not ``hidden_size / heads`` for Gemma 3)."""
    raw = dict(config.raw)
    nested = isinstance(raw.get("text_config"), dict)
    text = dict(raw["text_config"] if nested else raw)
    missing = {k: v for k, v in GEMMA3_TEXT_DEFAULTS.items() if text.get(k) is None}
    if not missing:
        return config
    text.update(missing)
    return ModelConfig.from_dict({**raw, "text_config": text} if nested else text)


def _gemma3_spec(config: ModelConfig, lm_prefix: str = "") -> DecoderSpec:
    if config.get("use_bidirectional_attention"):
        raise Exl2Error(f"{config.architecture}: bidirectional Gemma 3 (an embedding model) is not a "
                        "causal language model and cannot be converted")
    pattern = int(config.get("sliding_window_pattern", "_sliding_window_pattern", default=6))
    types = _sliding_types(config, pattern)
    return _gemma2_spec(config, lm_prefix, pattern, qk_norm=True, layer_ropes=_gemma3_ropes(config, types))


def vlm_output_name(key: str) -> str:
    """exllamav2's name of a Gemma 3 VLM checkpoint tensor of either layout."""
    key = legacy_name(key, VLM_LM_PREFIX)
    if key.startswith("vision_tower.") and not key.startswith(VLM_TOWER):
        key = VLM_TOWER + key[len("vision_tower."):]
    return VLM_PROJECTION[1] if key == VLM_PROJECTION[0] else key


def gemma3_vlm_plan(config: ModelConfig, architecture: str, tensor_names: Collection[str] = ()) -> ModelPlan:
    """The Gemma 3 VLM: its language model named as exllamav2 reads it (``language_model.model.layers.*``,
    ``language_model.lm_head``), read from the layout ``tensor_names`` show, the tower and projector
    carried."""
    config = gemma3_config(config)
    plan = dense_decoder_plan(config, architecture, _gemma3_spec(config, VLM_LM_PREFIX),
                              carry=carried_prefixes(VLM_CARRIED), rename=vlm_output_name)
    return read_nested(plan, VLM_LM_PREFIX) if is_nested(tensor_names) else plan


def _text_source(name: str) -> str:
    """The text-only checkpoint's key of a tensor the VLM layout calls ``name``."""
    return name[len(VLM_LM_PREFIX):] if name.startswith(VLM_LM_PREFIX) else name


def as_vlm_config(raw: dict) -> dict:
    """A text-only Gemma 3 config.json as exllamav2 0.3.2 recognises it: ``Gemma3ForConditionalGeneration``
    with the language model's settings in ``text_config`` and no vision tower. The top level keeps every
    source key as well, since exllamav2 reads some only there (``sliding_window_pattern``,
    ``tie_word_embeddings``, the token ids)."""
    text = {k: v for k, v in raw.items() if k != "architectures"}
    text["model_type"] = "gemma3_text"
    return {**raw, "architectures": [VLM_ARCHITECTURE], "model_type": "gemma3", "text_config": text}


def _gemma3_text_plan(config: ModelConfig, architecture: str, tensor_names: Collection[str] = ()) -> ModelPlan:
    """Text-only Gemma 3, written in the VLM layout: exllamav2 0.3.2 does not know ``Gemma3ForCausalLM``
    (it would load it as Llama) but runs a ``Gemma3ForConditionalGeneration`` without a vision tower.
    The plan is the VLM's language model (output names ``language_model.model.*``,
    ``language_model.lm_head``) reading the text checkpoint's ``model.*``; the output config.json is
    :func:`as_vlm_config` of the source's. exl2core reads the output back with the VLM plan."""
    config = gemma3_config(config)
    plan = dense_decoder_plan(config, architecture, _gemma3_spec(config, VLM_LM_PREFIX),
                              rename=lambda key: VLM_LM_PREFIX + key, output_config=as_vlm_config)
    modules = tuple(dataclasses.replace(
        m, linears=tuple(dataclasses.replace(lin, source=_text_source(lin.source)) for lin in m.linears),
        tensors={role: _text_source(key) for role, key in m.tensors.items()}) for m in plan.modules)
    return dataclasses.replace(plan, modules=modules)


PlanBuilder = Callable[[ModelConfig, str, Collection[str]], ModelPlan]


def _plain(spec: Callable[[ModelConfig], DecoderSpec]) -> PlanBuilder:
    return lambda config, architecture, tensor_names: dense_decoder_plan(config, architecture, spec(config))


#: architectures / model_type → the plan builder.
ARCHITECTURES: dict[str, PlanBuilder] = {
    "GemmaForCausalLM": _plain(_gemma_spec),
    "Gemma2ForCausalLM": _plain(_gemma2_spec),
    "Gemma3ForCausalLM": _gemma3_text_plan,
    "gemma": _plain(_gemma_spec),
    "gemma2": _plain(_gemma2_spec),
    "gemma3_text": _gemma3_text_plan,
    VLM_ARCHITECTURE: gemma3_vlm_plan,
}


@hookimpl
def exl2_architectures() -> list[str]:
    return list(ARCHITECTURES)


@hookimpl
def exl2_model_plan(config: ModelConfig, architecture: str, tensor_names: Collection[str]) -> ModelPlan | None:
    build = ARCHITECTURES.get(architecture)
    return build(config, architecture, tensor_names) if build else None


@hookimpl
def exl2_config_defaults(raw: dict) -> dict | None:
    """Gemma 3 configs (text and VLM) leave :data:`GEMMA3_TEXT_DEFAULTS` to transformers' defaults."""
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
    if str(text.get("model_type", raw.get("model_type", ""))).startswith("gemma3"):
        return GEMMA3_TEXT_DEFAULTS
    return None
