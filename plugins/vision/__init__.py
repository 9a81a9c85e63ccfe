"""Vision-language models: the language model is quantized, the vision tower and projector are carried.
(The Gemma 3 VLM is the Gemma plugin's.)

Calibration is text only, so only the language model runs; the vision tower and the projector are
copied to the output unconverted (``plan.carry``) under the names exllamav2 reads (exl2-format §8.1, §9.4):

* LLaVA / Mistral 3 (Llama or Mistral language model): ``language_model.model.*``,
  ``language_model.lm_head``, ``vision_tower.*``, ``multi_modal_projector.*``. exllamav2 0.3.2 loads
  these only with a Pixtral vision tower; other towers (CLIP, SigLIP) are converted with a warning.
* Qwen2-VL / Qwen2.5-VL: a Qwen2 language model (q/k/v bias) under ``model.*`` and ``lm_head``, the
  vision tower and its merger under ``visual.*``. Its M-RoPE rotates three position streams (time,
  height, width); for text they are all equal and M-RoPE is ordinary RoPE. Calibration adds noise rows
  (5 measurement, 30 quantization), as exllamav2 does for these models.

Checkpoints come in either layout of ``exl2core.builders.multimodal``; the plan hook sees the
checkpoint's tensor names and reads the language model from the layout they show.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection
from dataclasses import replace
from functools import partial

from exl2core import hookimpl
from exl2core.builders.decoder import DecoderSpec, config_biases, dense_decoder_plan
from exl2core.builders.multimodal import carried_prefixes, is_nested, legacy_name, read_nested
from exl2core.errors import Exl2Error
from exl2core.model.config import ModelConfig
from exl2core.plan import ModelPlan


LLAVA = ("LlavaForConditionalGeneration", "Mistral3ForConditionalGeneration")
QWEN2_VL = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")

#: Calibration noise rows (measurement, quantization) exllamav2 adds for Qwen2-VL models (exl2-format §10.3).
QWEN2_VL_NOISE_ROWS = (5, 30)

#: exllamav2 prefixes of the carried parts (projector first, as exllamav2 writes them), per family.
CARRIED = {
    "llava": ("multi_modal_projector.", "vision_tower."),
    "qwen2_vl": ("visual.",),
}

PIXTRAL_WARNING = (
    "{arch} with a '{tower}' vision tower: exllamav2 0.3.2 loads LLaVA-style models only with a Pixtral "
    "tower; the language model is converted, but exllamav2 will not load the result as a vision model")


def family(architecture: str) -> str:
    """Which of the served model families an architecture belongs to."""
    if architecture in LLAVA:
        return "llava"
    if architecture in QWEN2_VL:
        return "qwen2_vl"
    raise Exl2Error(f"{architecture} is not a vision-language model the vision plugin serves")


def lm_prefix(architecture: str) -> str:
    """exllamav2's prefix of the language model: ``language_model.`` except for Qwen2-VL."""
    return "" if family(architecture) == "qwen2_vl" else "language_model."


def output_name(architecture: str, key: str) -> str:
    """exllamav2's name of a checkpoint tensor of either layout."""
    return legacy_name(key, lm_prefix(architecture))


def _llava_language(config: ModelConfig, architecture: str) -> ModelPlan:
    text_type = config.model_type
    if text_type not in ("llama", "mistral"):
        raise Exl2Error(f"{architecture}: language model type '{text_type}' is not supported "
                        "(exllamav2 reads Llama and Mistral language models here)")
    tower = (config.raw.get("vision_config") or {}).get("model_type", "?")
    if tower != "pixtral":
        warnings.warn(PIXTRAL_WARNING.format(arch=architecture, tower=tower), stacklevel=3)
    spec = DecoderSpec(lm_prefix=lm_prefix(architecture), **config_biases(config))
    return dense_decoder_plan(config, architecture, spec)


def _qwen2_vl_language(config: ModelConfig, architecture: str) -> ModelPlan:
    """Qwen2 with q/k/v bias; M-RoPE (legacy configs call it ``type: mrope``) as plain RoPE."""
    rope = config.rope if config.rope.kind != "mrope" else replace(config.rope, kind="default")
    spec = DecoderSpec(qkv_bias=True, layer_ropes=[rope] * config.num_layers)
    return dense_decoder_plan(config, architecture, spec, noise_rows=QWEN2_VL_NOISE_ROWS)


def vision_plan(config: ModelConfig, architecture: str, tensor_names: Collection[str] = ()) -> ModelPlan:
    """The plan of a served VLM; ``tensor_names`` (the checkpoint's) select the layout the language model
    is read from, legacy when they are not given."""
    kind = family(architecture)
    plan = (_llava_language if kind == "llava" else _qwen2_vl_language)(config, architecture)
    if is_nested(tensor_names):
        plan = read_nested(plan, lm_prefix(architecture))
    return replace(plan, carry=carried_prefixes(CARRIED[kind]), rename=partial(output_name, architecture))


@hookimpl
def exl2_architectures() -> list[str]:
    return [*LLAVA, *QWEN2_VL]


@hookimpl
def exl2_model_plan(config: ModelConfig, architecture: str, tensor_names: Collection[str]) -> ModelPlan | None:
    if architecture not in exl2_architectures():
        return None
    return vision_plan(config, architecture, tensor_names)
