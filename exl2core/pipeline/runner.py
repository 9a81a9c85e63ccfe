"""Running one module over every calibration row, optionally collecting the Hessians of its linears."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from exl2core.distributed import SINGLE, Ranks
from exl2core.errors import Exl2Error
from exl2core.modules.forward import ModuleTail, calibration_notes, module_forward
from exl2core.plan import Linear, ModelPlan, Module
from exl2core.pipeline.hidden import HiddenStates
from exl2core.quant.gptq import Hessian, HessianParts, PreparedHessian
from exl2core.quant.qparams import PERCDAMP

if TYPE_CHECKING:
    from exl2core.model.source import SourceModel


def embed_rows(source: SourceModel, plan: ModelPlan, ids: torch.Tensor, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """The first hidden states of token rows ``ids`` ``[N, T]``: the plan's embedding (read from ``source``
    in ``dtype`` and run on ``device``) of each row, ``N`` tensors ``[T, H]`` in host memory."""
    module = plan.modules[0]
    weights = source.module_weights(module, dtype, device)
    fwd = module_forward(module)
    with torch.inference_mode():
        return [fwd(module, weights, row.unsqueeze(0).to(device), None).squeeze(0).cpu() for row in ids]


def forward_rows(fwd: Callable, module: Module, weights: dict[str, torch.Tensor], states: HiddenStates,
                 hessians: dict[str, Hessian] | None = None, *, rows: int | None = None,
                 reduce: Callable[[int, torch.Tensor], None] | None = None,
                 output: str | None = None) -> list[torch.Tensor]:
    """Outputs of ``module`` for the rows of ``states`` among the first ``rows`` calibration rows (default
    all).

    With ``hessians``, every linear input is accumulated (over this rank's rows: :func:`reduce_hessians`
    joins the ranks'). With ``reduce``, each output is handed to ``reduce(row, y)`` (``row`` the
    calibration row's index) and not kept (the head's logits are too large to hold for every row). With
    ``output`` (a ``Slot.output``), that reported activation is returned instead of the module's output.
    """
    slot_outputs = {slot.output for slot in module.slots if slot.output}
    if output is not None and output not in slot_outputs:
        raise ValueError(f"{module.key} has no slot output {output!r}")
    reported: dict[str, torch.Tensor] = {}
    current = 0

    def capture(name: str, x: torch.Tensor) -> None:
        if name in slot_outputs:
            reported[name] = x
        elif hessians is not None:
            if name not in hessians:
                hessians[name] = Hessian(x.shape[-1], x.device)
            hessians[name].add(x, row=current)

    listen = hessians is not None or output is not None
    outputs = []
    with torch.inference_mode():
        for i in range(len(states) if rows is None else max(0, min(rows - states.first, len(states)))):
            current = states.first + i
            y = fwd(module, weights, states.row(i), capture if listen else None)
            if output is not None:
                if output not in reported:
                    raise Exl2Error(f"{module.key}: the forward did not report its slot output {output!r}")
                y = reported.pop(output)
            if not all_finite(y):
                raise Exl2Error(non_finite_origin(fwd, module, weights, states, i))
            if reduce is not None:
                reduce(states.first + i, y)
            else:
                outputs.append(y.to(states.rows[i].device))
    return outputs


def tail_rows(fwd: Callable, tail: ModuleTail, module: Module, weights: dict[str, torch.Tensor],
              states: HiddenStates, inputs: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """What :func:`forward_rows` gives, from each row's kept inputs to the module's later linears
    (``modules.forward``'s tails): the work before those linears is not done again. ``fwd`` only names
    where a non-finite output comes from."""
    outputs = []
    with torch.inference_mode():
        for i, kept in enumerate(inputs):
            x = states.row(i)
            y = tail(module, weights, x, {name: t.to(x.device) for name, t in kept.items()})
            if not all_finite(y):
                raise Exl2Error(non_finite_origin(fwd, module, weights, states, i))
            outputs.append(y.to(states.rows[i].device))
    return outputs


def all_finite(x: torch.Tensor) -> bool:
    """Whether every element of an activation is finite: one float32 sum, elementwise only if it overflowed."""
    return bool(torch.isfinite(x.sum(dtype=torch.float32))) or _all_finite_elements(x)


def _all_finite_elements(x: torch.Tensor) -> bool:
    """Elementwise check, for when a float32 sum overflowed (one reduction is the cheap first test)."""
    return bool(torch.isfinite(x).all())


def non_finite_origin(fwd: Callable, module: Module, weights: dict[str, torch.Tensor], states: HiddenStates,
                      row: int) -> str:
    """Why ``module``'s output for calibration ``row`` is not finite, naming the first place it happens:
    the module's input (then an earlier step wrote it), a source weight, or the first linear input
    within the module, else its output (the block overflows in this precision)."""
    where = f"{module.measurement_key}: non-finite activations in calibration row {states.first + row}"
    x = states.row(row)
    if not _all_finite_elements(x):
        return (f"{where}: its input hidden states are already non-finite (a damaged hidden-state "
                "checkpoint?); rerun with -nr to start over")
    for name, w in weights.items():
        if w.is_floating_point() and not _all_finite_elements(w):
            return f"{where}: weight {name!r} of this block holds NaN or infinite values"
    first: list[str] = []

    def watch(name: str, a: torch.Tensor) -> None:
        if not first and a.is_floating_point() and not _all_finite_elements(a):
            first.append(name)

    with torch.inference_mode():
        fwd(module, weights, x, watch)
    readers = ", ".join(lin.name for lin in module.linears if first and lin.input == first[0])
    at = f"first at the input of {readers or first[0]}" if first else "first in its output"
    return (f"{where}, {at} (the source model overflows in {x.dtype}; its weights are finite, so this "
            "block is where the activations blow up)")


def reduce_hessians(hessians: dict[str, Hessian], states: HiddenStates,
                    users: dict[str, frozenset[int]] | None = None) -> dict[str, Hessian]:
    """The Hessians over every rank's rows, the same on every rank, from each rank's over its ``states``
    (on one rank, ``hessians`` itself): every rank then quantizes on the very same sums. With ``users``,
    the Hessian of an input it lists reaches only those ranks (the ones quantizing its linears); the
    others reach every rank."""
    ranks = states.shard.ranks
    if ranks.world == 1:
        return hessians
    parts = {name: h.parts() for name, h in hessians.items()}
    listed = ranks.all_gather({name: (p.in_features, p.num_batches, p.asymmetric) for name, p in parts.items()})
    users = users or {}
    nodes = ranks.share({(ranks.rank, name, kind, node): t for name, p in parts.items()
                         for kind, tree in (("sums", p.sums), ("cross", p.cross)) for node, t in tree.items()},
                        to=lambda key: users.get(key[1]))

    def part(rank: int, name: str) -> HessianParts:
        tree = {kind: {key[3]: t for key, t in nodes.items() if key[:3] == (rank, name, kind)}
                for kind in ("sums", "cross")}
        return HessianParts(*listed[rank][name], tree["sums"], tree["cross"])

    names = dict.fromkeys(name for per_rank in listed for name in per_rank
                          if ranks.rank in users.get(name, (ranks.rank,)))
    return {name: Hessian.combined([part(r, name) for r in range(ranks.world) if name in listed[r]], states.device)
            for name in names}


def hessian_users(module: Module, owners: dict[str, int]) -> dict[str, frozenset[int]]:
    """The ranks that need each Hessian: those quantizing a linear of ``owners`` that prepares from it
    (the Hessian of its group's first linear's input, as :func:`prepare_hessians` takes it)."""
    users: dict[str, set[int]] = {}
    for group in module.hessian_groups():
        ranks = {owners[name] for name in group if name in owners}
        if ranks:
            users.setdefault(module.linear(group[0]).input, set()).update(ranks)
    return {name: frozenset(ranks) for name, ranks in users.items()}


def prepare_hessians(module: Module, hessians: dict[str, Hessian], device: torch.device | str,
                     names: set[str] | None = None, *, percdamp: float = PERCDAMP) -> dict[str, PreparedHessian]:
    """Prepared Hessian per linear name (of the groups holding one of ``names``, default all), damped by
    ``percdamp`` (``Hessian.prepare``): each group's owner prepares, the others reuse it. A linear whose
    input saw no calibration data (an expert no token was routed to) gets the identity."""
    prepared: dict[str, PreparedHessian] = {}
    for group in module.hessian_groups():
        if names is not None and not names.intersection(group):
            continue
        owner = module.linear(group[0])
        h = hessians.get(owner.input) or Hessian(owner.in_features, device)
        p = h.prepare(f"{module.key}.{owner.name}", percdamp=percdamp)
        for name in group:
            prepared[name] = p
    return prepared


def share_linears(linears: list[Linear], ranks: Ranks) -> dict[str, int]:
    """The rank that works on each linear: the largest first, each to the least loaded rank so far."""
    load = [0] * ranks.world
    owners: dict[str, int] = {}
    for lin in sorted(linears, key=lambda lin: -lin.in_features * lin.out_features):
        rank = min(range(ranks.world), key=load.__getitem__)
        owners[lin.name] = rank
        load[rank] += lin.in_features * lin.out_features
    return owners


def calibration_report(module: Module, hessians: dict[str, Hessian]) -> list[str]:
    """What ``module``'s kind has to say about how it was calibrated (tokens routed per MoE expert)."""
    return calibration_notes(module, hessians)


def relative_error(outputs: list[torch.Tensor], targets: list[torch.Tensor], ranks: Ranks = SINGLE) -> float:
    """Mean over rows of ‖y − y_ref‖_F / ‖y_ref‖_F, the error measure of the whole pipeline (over every
    rank's rows, summed in row order)."""
    errors = []
    for y, t in zip(outputs, targets):
        y = y.float()
        t = t.to(y.device).float()
        errors.append((torch.linalg.vector_norm(y - t) / torch.linalg.vector_norm(t).clamp_min(1e-12)).item())
    errors = [e for share in ranks.all_gather(errors) for e in share]
    total = 0.0
    for e in errors:
        total += e
    return total / max(len(errors), 1)
