"""Measured KL of each slot's quantization error, to correct the Fisher prediction slot by slot.

The Fisher sensitivity (``pipeline.sensitivity``) predicts a slot's KL to second order, as if its error
were the only one in an unquantized model. Checked on SmolLM2-135M (one slot quantized at a time at
about 2.4 bpw, 512 tokens), the KL it really causes is 0.84–2.5× that prediction depending on the slot,
and in a fully quantized model the errors compound on top. This pass measures the truth once per slot at
one reference setting: every slot is quantized (GPTQ at the table row nearest ``REFERENCE_BPW``), and the
model's KL to the unquantized one is compared, on the same tokens, with the KL of the same model with one
slot left unquantized (leave one out, ``marginal``), or the KL of the unquantized model with only that
slot quantized is measured (``isolated``: no compounding, but no difference of two large KLs either, so
far less noise on few tokens). That KL divided by the Fisher prediction for the same weight error is the
slot's scale; the allocator multiplies every candidate's predicted KL by it.

``linear`` measures the isolated KL of each linear alone: within one SmolLM2 attention block the measured ÷
predicted ratio of ``k_proj`` and ``v_proj`` is up to 2.8× and 4.6× where ``q_proj`` and ``o_proj`` stay near
1.1 (the softmax the Fisher model linearises), so one scale per slot misprices the table rows that move bits
between them.

Each stream's KL through the vocabulary-wide head would be most of the pass's cost (SmolLM2: 105 of 166 s),
so by default it is estimated from vocabulary entries drawn from the unquantized distribution
(:func:`_kl_divergences`, ``--kl-samples``).

Streamed module by module like the other passes: the unquantized stream, the all-quantized stream
(``marginal``), and one stream per slot (per linear), branching at its module. The cost is one forward of
the rest of the model per stream over ``MARGINAL_TOKENS`` tokens. On several ranks the streams are dealt
out in turn and every rank runs the unquantized stream beside its own; a stream's arithmetic is the same
on any rank, so the scales do not depend on the rank count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch

from exl2core.distributed import Ranks
from exl2core.errors import Exl2Error
from exl2core.modules.forward import module_forward
from exl2core.plan import HeadModule, ModelPlan, Module, Slot
from exl2core.pipeline.hidden import HiddenStates
from exl2core.pipeline.measure import channel_errors, slot_linears
from exl2core.pipeline.runner import forward_rows, prepare_hessians
from exl2core.pipeline.sensitivity import HEAD_CHUNK, Sensitivity
from exl2core.quant.gptq import Hessian, quantize_linear
from exl2core.quant.qparams import TABLES, QParams, table_setting

#: How a predicted KL is weighted (``--sensitivity``): ``isolated`` and ``marginal`` scale each slot's Fisher
#: prediction by its measured KL, ``linear`` each linear's by its own (this module); ``fisher`` uses the Fisher
#: prediction alone.
SENSITIVITY_MODES = ("isolated", "linear", "marginal", "fisher")
#: The bits per weight of the reference setting each slot is quantized with.
REFERENCE_BPW = 3.0
#: Calibration tokens the pass reads at most.
MARGINAL_TOKENS = 1024
#: Slot scales are clamped to this range: a leave-one-out difference is noisy where a slot barely matters.
SCALE_RANGE = (0.25, 8.0)
#: Per-linear scales (``linear``) to this one: a single linear's KL can be far below its Fisher prediction
#: (Gemma-3-270M's middle down_proj: under 1/16, where its error sits on tokens the output ignores;
#: bench/RESULTS.md), and clamping that at ¼ cost the allocation what the per-linear scales gain.
LINEAR_SCALE_RANGE = (1 / 16, 16.0)


def marginal_rows(ids: torch.Tensor) -> torch.Tensor:
    """The first ``MARGINAL_TOKENS`` tokens of the sensitivity rows ``ids``, whole rows where possible."""
    length = min(ids.shape[1], MARGINAL_TOKENS)
    return ids[: max(1, MARGINAL_TOKENS // length), :length]


def reference_settings(slot: Slot, module: Module) -> dict[str, QParams]:
    """The slot's table row whose size is nearest ``REFERENCE_BPW``, per linear name."""
    linears = slot_linears(module, slot)
    numel = sum(lin.in_features * lin.out_features for lin in linears)

    def distance(row: int) -> float:
        bits = sum(table_setting(slot.table, row, lin.role).total_bits(lin.in_features, lin.out_features, lin.bias)
                   for lin in linears)
        return abs(bits / numel - REFERENCE_BPW)

    row = min(range(len(TABLES[slot.table])), key=distance)
    return {lin.name: table_setting(slot.table, row, lin.role) for lin in linears}


@dataclass(frozen=True)
class Marginals:
    """Per slot key (``linear``: per linear, keyed as ``Sensitivity.key``), for its error at the reference
    setting: the KL the Fisher sensitivity predicts, and the KL it adds to the otherwise quantized model
    (mean nats per token)."""

    predicted: dict[str, float]
    measured: dict[str, float]
    bounds: tuple[float, float] = SCALE_RANGE

    def scales(self) -> dict[str, float]:
        """Measured ÷ predicted per key, clamped to ``bounds``."""
        low, high = self.bounds
        return {key: min(high, max(low, self.measured[key] / kl)) if kl > 0 else 1.0
                for key, kl in self.predicted.items()}


def measure_marginals(plan: ModelPlan, weights_of: Callable[[Module], dict[str, torch.Tensor]], ids: torch.Tensor,
                      device: torch.device, sensitivity: Sensitivity, *, mode: str = "marginal",
                      samples: int = 0, seed: int = 0, ranks: Ranks | None = None,
                      on_module: Callable[[], None] | None = None) -> Marginals:
    """The marginals of every slot of ``plan`` on the token rows ``ids``, as ``mode`` (one of
    ``SENSITIVITY_MODES`` but ``fisher``) says; each KL from ``samples`` vocabulary entries drawn per token
    (seeded by ``seed``; 0: the whole vocabulary). Every rank of ``ranks`` calls this and gets all of them,
    having run its share of the streams. ``on_module`` is called once per module."""
    if mode not in SENSITIVITY_MODES or mode == "fisher":
        raise ValueError(f"no marginal-KL pass for sensitivity {mode!r}")
    ranks = ranks or Ranks()
    order, predicted, kls = ranks.agree(lambda: _rank_share(plan, weights_of, ids, device, sensitivity, mode,
                                                            samples, seed, ranks, on_module))
    predicted = {key: kl for share in ranks.all_gather(predicted) for key, kl in share.items()}
    kls = {key: kl for share in ranks.all_gather(kls) for key, kl in share.items()}
    isolated = mode != "marginal"
    return Marginals({key: predicted[key] for key in order},
                     {key: kls[key] if isolated else kls[""] - kls[key] for key in order},
                     LINEAR_SCALE_RANGE if mode == "linear" else SCALE_RANGE)


def _rank_share(plan: ModelPlan, weights_of: Callable[[Module], dict[str, torch.Tensor]], ids: torch.Tensor,
                device: torch.device, sensitivity: Sensitivity, mode: str, samples: int, seed: int, ranks: Ranks,
                on_module: Callable[[], None] | None) -> tuple[list[str], dict[str, float], dict[str, float]]:
    """This rank's part of :func:`measure_marginals`, with no collective (so that an error on one rank
    reaches the others): every stream key in order, and the predicted and measured KL of this rank's
    streams (the all-quantized stream as key ``""``)."""
    isolated, per_linear = mode != "marginal", mode == "linear"
    order: list[str] = []  # every stream key, in the order the streams branch off

    def mine(key: str) -> bool:
        """Whether this rank runs the stream of ``key`` (the all-quantized stream ``""``: rank 0)."""
        return (order.index(key) if key else 0) % ranks.world == ranks.rank

    modules = plan.modules
    last = max(i for i, m in enumerate(modules) if m.slots)
    fp: HiddenStates | None = None
    base: HiddenStates | None = None
    streams: dict[str, HiddenStates] = {}
    predicted: dict[str, float] = {}
    for i, module in enumerate(modules[: last + 1]):
        weights = weights_of(module)
        fwd = module_forward(module)
        if fp is None:
            with torch.inference_mode():
                rows = [fwd(module, weights, row.unsqueeze(0).to(device), None).squeeze(0) for row in ids]
            fp = base = HiddenStates(rows, device)
        elif not module.slots:
            fp = fp.replaced(forward_rows(fwd, module, weights, fp))
            base = fp if isolated else base.replaced(forward_rows(fwd, module, weights, base))
            streams = {k: s.replaced(forward_rows(fwd, module, weights, s)) for k, s in streams.items()}
        else:
            hessians: dict[str, Hessian] = {}
            fp_out = forward_rows(fwd, module, weights, fp, hessians)
            prepared = prepare_hessians(module, hessians, device)
            tokens = sum(o.numel() // o.shape[-1] for o in fp_out)
            quantized = dict(weights)
            units: dict[str, list[str]] = {}  # stream key → the linears it quantizes (isolated) or leaves out
            for slot in module.slots:
                kl = 0.0
                if per_linear:
                    order.extend(Sensitivity.key(module, lin.name) for lin in slot_linears(module, slot))
                else:
                    order.append(slot.key)
                for name, qp in reference_settings(slot, module).items():
                    if isolated and not mine(Sensitivity.key(module, name) if per_linear else slot.key):
                        continue
                    lin = module.linear(name)
                    q = quantize_linear(weights[name], prepared[name], qp, bias=weights.get(name + ".bias"))
                    quantized[name] = q.weight[: lin.out_features].to(weights[name])
                    linear_kl = 0.0
                    if lin.input in hessians:
                        errors = channel_errors(quantized[name].float() - weights[name].float(),
                                                hessians[lin.input].matrix)
                        linear_kl = sensitivity.predicted_kl(module, name, errors, tokens)
                    if per_linear:
                        key = Sensitivity.key(module, name)
                        predicted[key] = linear_kl
                        units[key] = [name]
                    kl += linear_kl
                if not per_linear and (mine(slot.key) or not isolated):
                    predicted[slot.key] = kl
                    units[slot.key] = [lin.name for lin in slot_linears(module, slot)]
            streams = {k: s.replaced(forward_rows(fwd, module, weights if isolated else quantized, s))
                       for k, s in streams.items()}
            for key, names in units.items():
                if not mine(key):
                    continue
                trial, source = (dict(weights), fp) if isolated else (dict(quantized), base)
                for name in names:
                    trial[name] = quantized[name] if isolated else weights[name]
                streams[key] = source.replaced(forward_rows(fwd, module, trial, source))
            fp = fp.replaced(fp_out)
            base = fp if isolated else base.replaced(forward_rows(fwd, module, quantized, base))
        del weights
        if on_module:
            on_module()
    compared = streams if isolated or not ranks.main else {"": base, **streams}
    kls = _kl_divergences(modules[last + 1:], weights_of, fp, compared, device, samples, seed)
    if on_module:
        for _ in modules[last + 1:]:
            on_module()
    return order, {key: predicted[key] for key in streams}, kls


def _kl_divergences(tail: list[Module], weights_of, fp: HiddenStates, streams: dict[str, HiddenStates],
                    device: torch.device, samples: int = 0, seed: int = 0) -> dict[str, float]:
    """Mean KL per token of each stream's next-token distribution from the unquantized stream's, through the
    token-wise tail (final norm, head) in chunks of ``HEAD_CHUNK`` tokens.

    With ``samples``, each token's KL is estimated from that many vocabulary entries ``v`` drawn from the
    unquantized distribution ``p`` (the same draws for every stream): with ``Δz = z_q − z_p`` the logits'
    change, ``KL(p ‖ q) = log E_p[exp Δz] − E_p[Δz]`` exactly, so each stream needs only the head's rows of
    the drawn entries (the estimate's bias is about −KL / ``samples``)."""
    *body, head = tail
    if not isinstance(head, HeadModule):
        raise ValueError("the plan has no head after its last measured block")
    weights = [weights_of(m) for m in tail]
    forwards = [module_forward(m) for m in tail]

    def head_input(x: torch.Tensor) -> torch.Tensor:
        for module, w, fwd in zip(body, weights, forwards):
            x = fwd(module, w, x, None)
        return x

    def logits(x: torch.Tensor, module: HeadModule = head, w: dict[str, torch.Tensor] = weights[-1]) -> torch.Tensor:
        return forwards[-1](module, w, head_input(x), None).float()

    generator = torch.Generator().manual_seed(seed)
    sums = dict.fromkeys(streams, 0.0)
    tokens = 0
    with torch.inference_mode():
        for r in range(len(fp)):
            row = fp.row(r)
            for t0 in range(0, row.shape[1], HEAD_CHUNK):
                ref = torch.log_softmax(logits(row[:, t0:t0 + HEAD_CHUNK]), dim=-1)
                tokens += ref.numel() // ref.shape[-1]
                if samples:
                    drawn = torch.multinomial(ref.exp().flatten(0, -2).cpu(), samples, replacement=True,
                                              generator=generator).to(ref.device)
                    entries, index = torch.unique(drawn, return_inverse=True)
                    rows_head, rows_weights = _head_rows(head, weights[-1], entries)
                    z_ref = ref.flatten(0, -2).gather(-1, drawn)  # log p: the logits up to a per-token constant
                for key, stream in streams.items():
                    x = stream.row(r)[:, t0:t0 + HEAD_CHUNK]
                    if samples:
                        dz = (logits(x, rows_head, rows_weights).flatten(0, -2).gather(-1, index) - z_ref).double()
                        kl = torch.logsumexp(dz, dim=-1) - math.log(samples) - dz.mean(dim=-1)
                        sums[key] += kl.sum().item()
                    else:
                        lp = torch.log_softmax(logits(x), dim=-1)
                        sums[key] += (ref.exp() * (ref - lp)).sum(dtype=torch.float64).item()
    if not all(math.isfinite(total) for total in sums.values()):
        raise Exl2Error("non-finite logits in the marginal-KL pass (a block overflows once quantized at the "
                        "reference setting); convert with --sensitivity fisher")
    return {key: total / max(tokens, 1) for key, total in sums.items()}


def _head_rows(head: HeadModule, weights: dict[str, torch.Tensor], entries: torch.Tensor
               ) -> tuple[HeadModule, dict[str, torch.Tensor]]:
    """The head cut to the vocabulary ``entries``: its forward gives their logits, in that order."""
    (lin,) = head.linears
    rows = dict(weights)
    rows[lin.name] = weights[lin.name][entries]
    if lin.name + ".bias" in weights:
        rows[lin.name + ".bias"] = weights[lin.name + ".bias"][entries]
    return replace(head, vocab_size=None), rows
