"""The one registry of module kinds: each ``Module`` subclass bound to its forward (and, optionally, what
it reports about its calibration). The core's kinds are registered here; a plugin registers its own
with :func:`register_kind` when it is imported.

Each forward is ``f(module, weights, x, capture=None) -> y``: ``weights`` is the module's weight dict
(see ``SourceModel.module_weights``) in the dtype the caller chose, and ``capture(input_name, x)`` is
called once with the input of each group of linears sharing ``Linear.input`` (Hessian collection).

A kind may also bind a tail, ``t(module, weights, x, inputs) -> y``: the forward's output for input ``x``
computed from the captured inputs of its later linears on (``inputs`` by ``Linear.input``: all but the
first input the forward reports), bit for bit what the forward gives. Once those linears are quantized
the quantization pass takes the block's outputs from it instead of running the whole forward again; a
kind without one is simply run again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from exl2core.errors import Exl2Error
from exl2core.modules.attention import attention_forward, attention_tail
from exl2core.modules.linear import Capture, apply_linear, capture_inputs
from exl2core.modules.mlp import mlp_forward, mlp_tail
from exl2core.modules.moe import moe_forward, moe_notes
from exl2core.modules.norm import norm_role
from exl2core.modules.parallel import parallel_forward, parallel_tail
from exl2core.plan import (AttentionModule, EmbeddingModule, HeadModule, MlpModule, Module, MoeModule, NormModule,
                           ParallelModule)

ModuleForward = Callable[..., torch.Tensor]
ModuleTail = Callable[[Module, dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]
#: ``notes(module, hessians) -> lines`` about how a module was calibrated, given ``{input name: Hessian}``.
CalibrationNotes = Callable[[Module, Mapping[str, object]], list[str]]


def embedding_forward(module: EmbeddingModule, weights: dict[str, torch.Tensor], ids: torch.Tensor,
                      capture: Capture | None = None) -> torch.Tensor:
    """Token ids ``[B, T]`` → hidden ``[B, T, H]``; out-of-range ids (negative, or past the table,
    as in noise rows and padded vocabularies) read row 0."""
    table = weights["embed"]
    ids = ids.to(table.device, torch.long)
    ids = ids.masked_fill((ids < 0) | (ids >= table.shape[0]), 0)
    h = torch.nn.functional.embedding(ids, table)
    if module.scale != 1.0:
        h = h * torch.tensor(module.scale, dtype=h.dtype, device=h.device)
    return h


def norm_forward(module: NormModule, weights: dict[str, torch.Tensor], x: torch.Tensor,
                 capture: Capture | None = None) -> torch.Tensor:
    """The final norm; the output keeps the weights' dtype (the head's input)."""
    return norm_role(x, weights, "weight", module.norm, out_dtype=weights["weight"].dtype)


def head_forward(module: HeadModule, weights: dict[str, torch.Tensor], x: torch.Tensor,
                 capture: Capture | None = None) -> torch.Tensor:
    """Float32 logits ``[B, T, vocab]``: scaled, soft-capped, and cut to the unpadded vocabulary."""
    capture_inputs(module, ("lm_head",), x, capture)
    logits = apply_linear(weights, "lm_head", x).float()
    if module.vocab_size:
        logits = logits[..., :module.vocab_size]
    if module.logit_scale != 1.0:
        logits = logits * module.logit_scale
    if module.softcap:
        logits = torch.tanh(logits / module.softcap) * module.softcap
    return logits


@dataclass(frozen=True)
class Kind:
    """What the pipeline needs of a module kind beyond its plan data."""

    forward: ModuleForward
    notes: CalibrationNotes | None = None
    tail: ModuleTail | None = None


KINDS: dict[type[Module], Kind] = {
    EmbeddingModule: Kind(embedding_forward),
    AttentionModule: Kind(attention_forward, tail=attention_tail),
    MlpModule: Kind(mlp_forward, tail=mlp_tail),
    MoeModule: Kind(moe_forward, moe_notes),
    ParallelModule: Kind(parallel_forward, tail=parallel_tail),
    NormModule: Kind(norm_forward),
    HeadModule: Kind(head_forward),
}


def register_kind(kind: type[Module], forward: ModuleForward, notes: CalibrationNotes | None = None,
                  tail: ModuleTail | None = None) -> None:
    """Bind a plugin's module kind (a subclass of :class:`Module`) to its forward (and optionally its
    calibration notes and tail); a kind is bound once."""
    bound = KINDS.get(kind)
    if bound is not None and bound != Kind(forward, notes, tail):
        raise Exl2Error(f"module kind {kind.__qualname__} already has a forward "
                        f"({bound.forward.__module__}.{bound.forward.__qualname__})")
    KINDS[kind] = Kind(forward, notes, tail)


def _kind_of(module: Module) -> Kind:
    for cls in type(module).__mro__:
        if cls in KINDS:
            return KINDS[cls]
    raise Exl2Error(f"{module.key}: no forward for module kind {type(module).__qualname__} "
                    "(its plugin must register_kind it)")


def module_forward(module: Module) -> ModuleForward:
    """The forward of ``module``'s kind (the nearest registered class of its type)."""
    return _kind_of(module).forward


def module_tail(module: Module) -> ModuleTail | None:
    """The tail of ``module``'s kind, or None when the kind binds none."""
    return _kind_of(module).tail


def calibration_notes(module: Module, hessians: Mapping[str, object]) -> list[str]:
    """Lines worth showing about how ``module`` was calibrated (e.g. tokens routed to each expert)."""
    notes = _kind_of(module).notes
    return notes(module, hessians) if notes else []
