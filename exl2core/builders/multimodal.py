"""The two checkpoint layouts of multimodal models, and exllamav2's names for them.

The legacy layout is exllamav2's naming, and what transformers' own ``save_pretrained`` still writes:
the language model under ``{lm_prefix}model.*`` and ``{lm_prefix}lm_head`` (``lm_prefix`` is
``language_model.`` for LLaVA-style models and Gemma 3, empty for Qwen2-VL), the other parts at the top
level. The nested one, of state dicts taken from the refactored transformers classes, keeps everything
under ``model.`` (``model.language_model.*``, ``model.vision_tower.*``, ``model.visual.*``,
``model.multi_modal_projector.*``) with the head as ``lm_head``. A plan is built for the legacy names
and, for a nested checkpoint, re-pointed at its sources with :func:`read_nested`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import replace

from exl2core.plan import ModelPlan, Module

#: Where the nested layout keeps the language model's decoder.
NESTED_LM = "model.language_model."

#: Nested-layout prefix → exllamav2 prefix of the parts that are not the language model.
NESTED_PARTS = {
    "model.visual.": "visual.",
    "model.vision_tower.": "vision_tower.",
    "model.multi_modal_projector.": "multi_modal_projector.",
}


def is_nested(tensor_names: Collection[str]) -> bool:
    """Whether a checkpoint with these tensor names uses the nested layout."""
    return any(k.startswith(NESTED_LM) for k in tensor_names)


def legacy_name(key: str, lm_prefix: str) -> str:
    """exllamav2's name of a checkpoint tensor of either layout."""
    if key.startswith(NESTED_LM):
        key = lm_prefix + "model." + key[len(NESTED_LM):]
    elif key.startswith("lm_head."):
        key = lm_prefix + key
    for nested, name in NESTED_PARTS.items():
        if key.startswith(nested):
            key = name + key[len(nested):]
    return key


def nested_source(name: str, lm_prefix: str) -> str:
    """The nested-layout key of a language-model tensor exllamav2 calls ``name``."""
    if name.startswith(lm_prefix + "model."):
        return NESTED_LM + name[len(lm_prefix + "model."):]
    if name.startswith(lm_prefix + "lm_head"):
        return name[len(lm_prefix):]
    return name


def _read_nested_module(module: Module, lm_prefix: str) -> Module:
    linears = tuple(replace(lin, source=nested_source(lin.source, lm_prefix)) for lin in module.linears)
    tensors = {role: nested_source(key, lm_prefix) for role, key in module.tensors.items()}
    return replace(module, linears=linears, tensors=tensors)


def read_nested(plan: ModelPlan, lm_prefix: str) -> ModelPlan:
    """``plan`` reading its language model from a nested-layout checkpoint (output names unchanged)."""
    return replace(plan, modules=tuple(_read_nested_module(m, lm_prefix) for m in plan.modules))


def carried_prefixes(parts: Sequence[str]) -> tuple[str, ...]:
    """Source prefixes of the carried ``parts`` (exllamav2 prefixes) in both layouts; only those
    present are copied."""
    nested_of = {name: nested for nested, name in NESTED_PARTS.items()}
    return tuple(p for name in parts for p in (name, nested_of[name]))
