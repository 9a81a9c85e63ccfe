"""The plugin contract between the conversion pipeline and architecture plugins.

A plugin is a module (or object) with functions named like the hooks below, decorated with
``exl2core.hookimpl``, and registered under the ``exl2core.architectures`` entry-point group. Everything
else a plugin decides goes into the plan it returns (``exl2core.plan``): module kinds and their
parameters, Hessian sharing, MoE routing, output names. A plugin with a module kind of its own binds it
to its forward with ``exl2core.modules.forward.register_kind``.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from exl2core.model.config import ModelConfig
    from exl2core.plan import ModelPlan

hookspec = pluggy.HookspecMarker("exl2core")
hookimpl = pluggy.HookimplMarker("exl2core")


@hookspec
def exl2_architectures() -> list[str]:
    """Return the ``architectures`` values of config.json (e.g. ``"LlamaForCausalLM"``) this plugin
    converts. A plugin may also list ``model_type`` values (``"llama"``) to be matched when the
    architecture name is unknown. No two installed plugins may claim one name."""


@hookspec(firstresult=True)
def exl2_model_plan(config: "ModelConfig", architecture: str,
                    tensor_names: Collection[str]) -> "ModelPlan | None":
    """Return the plan of a model whose ``architecture`` (one this plugin claims) is to be converted;
    ``tensor_names`` are the checkpoint's (for layouts that differ between checkpoints of one
    architecture). Only the claiming plugin is asked; None refuses the model."""


@hookspec
def exl2_config_defaults(raw: dict) -> "dict | None":
    """Return values for config.json keys that released checkpoints of your architectures leave out
    (e.g. Gemma 3's ``head_dim``), or None for configs that are not yours. They fill the language
    model's view (``text_config`` when present) and never override a key the file sets."""
