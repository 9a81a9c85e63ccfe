"""The plugin contract between the conversion pipeline and architecture plugins.

A plugin is a module (or object) with functions named like the hooks below, decorated with
``exl2core.hookimpl``, and registered under the ``exl2core.architectures`` entry-point group. A
plugin needs only :func:`exl2_architectures` and :func:`exl2_model_plan`; the other hooks have
defaults in ``exl2core.defaults`` and are overridden only for quirks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    from exl2core.model.config import ModelConfig
    from exl2core.plan import Module, ModelPlan

hookspec = pluggy.HookspecMarker("exl2core")
hookimpl = pluggy.HookimplMarker("exl2core")


@hookspec
def exl2_architectures() -> list[str]:
    """Return the ``architectures`` values of config.json (e.g. ``"LlamaForCausalLM"``) this plugin
    converts. A plugin may also list ``model_type`` values (``"llama"``) to be matched when the
    architecture name is unknown."""


@hookspec(firstresult=True)
def exl2_model_plan(config: "ModelConfig", architecture: str) -> "ModelPlan | None":
    """Return the ordered module plan of a model, or None when ``architecture`` is not this
    plugin's. Modules come in execution order: embedding, decoder sub-blocks, final norm, head.
    Each module names its kind, its linears (with the activation each reads, which decides Hessian
    sharing), its unquantized tensors and the fields its forward needs."""


@hookspec(firstresult=True)
def exl2_hessian_groups(module: "Module") -> "list[list[str]] | None":
    """Return the linears of ``module`` grouped by shared Hessian (names; the first of each group
    owns the Hessian and fixes the act-order permutation the others reuse). The default groups by
    ``Linear.input``; override only when sharing must differ from what the inputs say."""


@hookspec(firstresult=True)
def exl2_output_name(plan: "ModelPlan", source_key: str) -> "str | None":
    """Return the output (exllamav2) name of an unquantized source tensor. The default is the
    identity; override for checkpoints whose names differ from what exllamav2 reads (e.g. the
    transformers-5 ``model.language_model.*`` layout of multimodal models)."""


@hookspec(firstresult=True)
def exl2_module_forward(module: "Module") -> "Callable | None":
    """Return the forward of a module kind the core does not know (see ``exl2core.plan.CORE_KINDS``)
    as ``f(module, weights, x, capture) -> y``; ``capture(input_name, tensor)`` must be called with
    the input of every linear, keyed by ``Linear.input``."""


@hookspec(firstresult=True)
def exl2_routing_weights(module: "Module", weights: dict, x: "object") -> "object | None":
    """Return ``[tokens, experts]`` routing weights for an MoE module whose router is not the
    standard softmax → top-k → renormalise; None uses the default."""


@hookspec
def exl2_calibration_report(module: "Module", hessians: dict) -> "list[str] | None":
    """Return lines worth showing the user about how ``module`` was calibrated (e.g. tokens routed to
    each MoE expert), given the ``{input name: Hessian}`` collected over the calibration rows. The
    pipeline prints them and keeps them in the job state."""


@hookspec
def exl2_config_defaults(raw: dict) -> "dict | None":
    """Return values for config.json keys that released checkpoints of your architectures leave out
    (e.g. Gemma 3's ``head_dim``), or None for configs that are not yours. They fill the language
    model's view (``text_config`` when present) and never override a key the file sets."""
