"""The reference forward of every module kind, looked up by ``Module.kind``.

Each forward is ``f(module, weights, x, capture=None) -> y``: ``weights`` is the module's weight dict
(see ``SourceModel.module_weights``) in the dtype the caller chose, and ``capture(input_name, x)`` is
called once with the input of each group of linears sharing ``Linear.input`` (Hessian collection).
Kinds the core does not know are asked of the plugins (``exl2_module_forward``).
"""

from __future__ import annotations

from typing import Callable

import torch

from exl2core.errors import Exl2Error
from exl2core.modules.attention import attention_forward
from exl2core.modules.linear import Capture, apply_linear, capture_inputs
from exl2core.modules.mlp import mlp_forward
from exl2core.modules.moe import moe_forward
from exl2core.modules.norm import norm_role
from exl2core.modules.parallel import parallel_forward
from exl2core.plan import Module
from exl2core.plugins import plugin_manager

ModuleForward = Callable[..., torch.Tensor]


def embedding_forward(module: Module, weights: dict[str, torch.Tensor], ids: torch.Tensor,
                      capture: Capture | None = None) -> torch.Tensor:
    """Token ids ``[B, T]`` → hidden ``[B, T, H]``; out-of-range ids (negative, or past the table,
    as in noise rows and padded vocabularies) read row 0."""
    table = weights["embed"]
    ids = ids.to(table.device, torch.long)
    ids = ids.masked_fill((ids < 0) | (ids >= table.shape[0]), 0)
    h = torch.nn.functional.embedding(ids, table)
    scale = module.fields.get("scale", 1.0)
    if scale != 1.0:
        h = h * torch.tensor(scale, dtype=h.dtype, device=h.device)
    return h


def norm_forward(module: Module, weights: dict[str, torch.Tensor], x: torch.Tensor,
                 capture: Capture | None = None) -> torch.Tensor:
    """The final norm; the output keeps the weights' dtype (the head's input)."""
    return norm_role(x, weights, "weight", module.fields, out_dtype=weights["weight"].dtype)


def head_forward(module: Module, weights: dict[str, torch.Tensor], x: torch.Tensor,
                 capture: Capture | None = None) -> torch.Tensor:
    """Float32 logits ``[B, T, vocab]``: scaled, soft-capped, and cut to the unpadded vocabulary."""
    f = module.fields
    capture_inputs(module, ("lm_head",), x, capture)
    logits = apply_linear(weights, "lm_head", x).float()
    vocab = f.get("vocab_size")
    if vocab:
        logits = logits[..., :vocab]
    scale = f.get("logit_scale", 1.0)
    if scale != 1.0:
        logits = logits * scale
    softcap = f.get("softcap")
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


#: Forwards of the core kinds; moe and parallel register here when they exist.
FORWARDS: dict[str, ModuleForward] = {
    "embedding": embedding_forward,
    "attention": attention_forward,
    "mlp": mlp_forward,
    "moe": moe_forward,
    "norm": norm_forward,
    "head": head_forward,
    "parallel": parallel_forward,
}


def module_forward(module: Module) -> ModuleForward:
    """The forward of ``module``'s kind: a core one, else the one a plugin provides."""
    fn = FORWARDS.get(module.kind)
    if fn is not None:
        return fn
    fn = plugin_manager().hook.exl2_module_forward(module=module)
    if fn is None:
        raise Exl2Error(f"{module.key}: no forward for module kind '{module.kind}' "
                        "(neither the core nor an installed plugin provides one)")
    return fn
