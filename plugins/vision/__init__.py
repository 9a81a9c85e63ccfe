"""Vision-language models: the language model is quantized, the vision tower and projector are carried.

Calibration is text only, so only the language model runs; the vision tower and the projector are
copied to the output unconverted (``plan.carry``) under the names exllamav2 reads (exl2-format §8.1, §9.4):

* LLaVA / Mistral 3 (Llama or Mistral language model): ``language_model.model.*``,
  ``language_model.lm_head``, ``vision_tower.*``, ``multi_modal_projector.*``. exllamav2 0.3.2 loads
  these only with a Pixtral vision tower; other towers (CLIP, SigLIP) are converted with a warning.
* Qwen2-VL / Qwen2.5-VL: a Qwen2 language model (q/k/v bias) under ``model.*`` and ``lm_head``, the
  vision tower and its merger under ``visual.*``. Its M-RoPE rotates three position streams (time,
  height, width); for text they are all equal and M-RoPE is ordinary RoPE. Calibration adds noise rows
  (5 measurement, 30 quantization), as exllamav2 does for these models.
* Gemma 3: the language model is the Gemma plugin's (:func:`exl2_gemma.gemma3_language_plan`); the
  SigLIP tower is ``vision_tower.vision_model.*``, the projector ``multi_modal_projector.*`` with
  ``mm_input_projection_weight`` renamed ``mm_input_projection.weight``.

Checkpoints come in two layouts. The legacy one is exllamav2's naming, and what transformers' own
``save_pretrained`` still writes (5.23; it does drop Gemma 3's ``vision_tower.vision_model.`` to
``vision_tower.``). The nested one, of state dicts taken from the refactored transformers classes,
keeps everything under ``model.`` (``model.language_model.*``, ``model.vision_tower.*``,
``model.visual.*``, ``model.multi_modal_projector.*``) with the head as ``lm_head``. :func:`output_name`
maps either to exllamav2's names, and :func:`vision_plan` reads the language model from the layout its
``keys`` show; the plan hook, which sees only config.json, assumes the legacy layout.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import replace

from exl2_gemma import LEGACY_LM_SOURCE, NESTED_LM_SOURCE, gemma3_language_plan
from exl2_llama import ARCHITECTURES as LLAMA_FAMILY

from exl2core import hookimpl
from exl2core.errors import Exl2Error
from exl2core.model.config import ModelConfig
from exl2core.modules.decoder import DecoderSpec, dense_decoder_plan
from exl2core.plan import Module, ModelPlan


LLAVA = ("LlavaForConditionalGeneration", "Mistral3ForConditionalGeneration")
QWEN2_VL = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
GEMMA3 = "Gemma3ForConditionalGeneration"

#: Calibration noise rows (measurement, quantization) exllamav2 adds for Qwen2-VL models (exl2-format §10.3).
QWEN2_VL_NOISE_ROWS = (5, 30)

#: Where the nested layout keeps the language model's decoder.
NESTED_LM = "model.language_model."

#: Nested-layout prefix → exllamav2 prefix of the parts that are not the language model.
NESTED_PARTS = {
    "model.visual.": "visual.",
    "model.vision_tower.": "vision_tower.",
    "model.multi_modal_projector.": "multi_modal_projector.",
}

#: exllamav2 prefixes of the carried parts (projector first, as exllamav2 writes them), per model.
CARRIED = {
    "llava": ("multi_modal_projector.", "vision_tower."),
    "qwen2_vl": ("visual.",),
    "gemma3": ("multi_modal_projector.", "vision_tower."),
}

#: Gemma 3 names exllamav2 reads differently from the checkpoints (exl2-format §8.1, §9.4).
GEMMA3_TOWER = "vision_tower.vision_model."
GEMMA3_PROJECTION = ("multi_modal_projector.mm_input_projection_weight",
                     "multi_modal_projector.mm_input_projection.weight")

PIXTRAL_WARNING = (
    "{arch} with a '{tower}' vision tower: exllamav2 0.3.2 loads LLaVA-style models only with a Pixtral "
    "tower; the language model is converted, but exllamav2 will not load the result as a vision model")


def family(architecture: str) -> str:
    """Which of the served model families an architecture belongs to."""
    if architecture in LLAVA:
        return "llava"
    if architecture in QWEN2_VL:
        return "qwen2_vl"
    if architecture == GEMMA3:
        return "gemma3"
    raise Exl2Error(f"{architecture} is not a vision-language model the vision plugin serves")


def lm_prefix(architecture: str) -> str:
    """exllamav2's prefix of the language model: ``language_model.`` except for Qwen2-VL."""
    return "" if family(architecture) == "qwen2_vl" else "language_model."


def is_nested(keys: Iterable[str]) -> bool:
    """Whether a checkpoint with these tensor names uses the nested layout."""
    return any(k.startswith(NESTED_LM) for k in keys)


def output_name(architecture: str, key: str) -> str:
    """exllamav2's name of a checkpoint tensor of either layout."""
    prefix = lm_prefix(architecture)
    if key.startswith(NESTED_LM):
        key = prefix + "model." + key[len(NESTED_LM):]
    elif key.startswith("lm_head."):
        key = prefix + key
    for nested, name in NESTED_PARTS.items():
        if key.startswith(nested):
            key = name + key[len(nested):]
    if family(architecture) == "gemma3":
        if key.startswith("vision_tower.") and not key.startswith(GEMMA3_TOWER):
            key = GEMMA3_TOWER + key[len("vision_tower."):]
        if key == GEMMA3_PROJECTION[0]:
            key = GEMMA3_PROJECTION[1]
    return key


def nested_source(architecture: str, name: str) -> str:
    """The nested-layout key of a language-model tensor exllamav2 calls ``name``."""
    prefix = lm_prefix(architecture)
    if name.startswith(prefix + "model."):
        return NESTED_LM + name[len(prefix + "model."):]
    if name.startswith(prefix + "lm_head"):
        return name[len(prefix):]
    return name


def _read_nested(architecture: str, module: Module) -> Module:
    linears = [replace(lin, source=nested_source(architecture, lin.source)) for lin in module.linears]
    tensors = {role: nested_source(architecture, key) for role, key in module.tensors.items()}
    return replace(module, linears=linears, tensors=tensors)


def carried_prefixes(architecture: str) -> list[str]:
    """Source prefixes of the carried parts, in both layouts (only those present are copied)."""
    nested_of = {name: nested for nested, name in NESTED_PARTS.items()}
    return [p for name in CARRIED[family(architecture)] for p in (name, nested_of[name])]


def _llava_language(config: ModelConfig, architecture: str) -> ModelPlan:
    text_type = config.model_type
    if text_type not in ("llama", "mistral"):
        raise Exl2Error(f"{architecture}: language model type '{text_type}' is not supported "
                        "(exllamav2 reads Llama and Mistral language models here)")
    tower = (config.raw.get("vision_config") or {}).get("model_type", "?")
    if tower != "pixtral":
        warnings.warn(PIXTRAL_WARNING.format(arch=architecture, tower=tower), stacklevel=3)
    spec = replace(LLAMA_FAMILY[text_type](config), lm_prefix=lm_prefix(architecture))
    return dense_decoder_plan(config, architecture, spec)


def _qwen2_vl_language(config: ModelConfig, architecture: str) -> ModelPlan:
    """Qwen2 with q/k/v bias; M-RoPE (legacy configs call it ``type: mrope``) as plain RoPE."""
    rope = config.rope if config.rope.kind != "mrope" else replace(config.rope, kind="default")
    spec = DecoderSpec(qkv_bias=True, layer_ropes=[rope] * config.num_layers)
    plan = dense_decoder_plan(config, architecture, spec)
    plan.noise_rows = QWEN2_VL_NOISE_ROWS
    return plan


def vision_plan(config: ModelConfig, architecture: str, keys: Iterable[str] = ()) -> ModelPlan:
    """The plan of a served VLM; ``keys`` (the checkpoint's tensor names) select the layout the language
    model is read from, legacy when they are not given."""
    nested = is_nested(keys)
    kind = family(architecture)
    if kind == "gemma3":
        plan = gemma3_language_plan(config, architecture, NESTED_LM_SOURCE if nested else LEGACY_LM_SOURCE)
    else:
        plan = (_llava_language if kind == "llava" else _qwen2_vl_language)(config, architecture)
        if nested:
            plan.modules = [_read_nested(architecture, m) for m in plan.modules]
    plan.carry = carried_prefixes(architecture)
    return plan


@hookimpl
def exl2_architectures() -> list[str]:
    return [*LLAVA, *QWEN2_VL, GEMMA3]


@hookimpl
def exl2_model_plan(config: ModelConfig, architecture: str) -> ModelPlan | None:
    if architecture not in exl2_architectures():
        return None
    return vision_plan(config, architecture, config.tensor_keys)


@hookimpl
def exl2_output_name(plan: ModelPlan, source_key: str) -> str | None:
    if plan.architecture not in exl2_architectures():
        return None
    return output_name(plan.architecture, source_key)
