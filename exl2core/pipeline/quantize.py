"""Quantization pass: every linear quantized with its strategy setting, packed, verified, saved.

Hidden states advance with the *quantized* block outputs, so each block's Hessians are collected
on inputs produced by the already-quantized earlier blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from exl2core.errors import Exl2Error
from exl2core.plan import Linear, Module
from exl2core.pipeline.hidden import HiddenStates
from exl2core.pipeline.job import save_tensors
from exl2core.pipeline.runner import calibration_report, forward_rows, prepare_hessians, relative_error
from exl2core.quant.gptq import Hessian, quantize_linear
from exl2core.quant.pack import dequantize
from exl2core.quant.qparams import HEAD_OPTIONS, QParams

RTN_NUMEL = 1e9
PPL_HEALTHY = 30.0


@dataclass
class ModuleResult:
    outputs: list[torch.Tensor]
    error: float | None = None
    perplexity: float | None = None
    notes: list[str] = field(default_factory=list)


def setting_for(module: Module, lin: Linear, strategy: dict, head_bits: int) -> QParams:
    if module.kind == "head":
        return HEAD_OPTIONS[head_bits]
    for slot in module.slots:
        if lin.role in slot.roles:
            return QParams.from_dict(strategy[slot.key][lin.role])
    raise Exl2Error(f"{module.key}: no strategy entry covers linear {lin.name}")


def tensor_file(out_dir: Path, lin: Linear) -> Path:
    return out_dir / f"{lin.key}.safetensors"


def quantize_module(fwd: Callable, module: Module, weights: dict[str, torch.Tensor], states: HiddenStates,
                    strategy: dict, head_bits: int, out_dir: Path,
                    ppl_ids: torch.Tensor | None = None, search: str = "hessian") -> ModuleResult:
    """Quantize ``module``'s linears in place of their weights and return its quantized outputs.

    ``ppl_ids`` (the head only) are the token ids of the rows used for the calibration perplexity;
    ``search`` is the scale search (``gptq.SCALE_SEARCHES``).
    """
    if not module.linears:
        return ModuleResult(forward_rows(fwd, module, weights, states))
    is_head = module.kind == "head"
    if is_head:
        hessians = head_hessians(module, states)
    else:
        hessians = {}
        targets = forward_rows(fwd, module, weights, states, hessians)
    prepared = prepare_hessians(module, hessians, states.device)
    notes = calibration_report(module, hessians)
    for lin in module.linears:
        qp = setting_for(module, lin, strategy, head_bits)
        rtn = lin.key == "lm_head" and lin.in_features * lin.out_features > RTN_NUMEL
        q = quantize_linear(weights[lin.name], prepared[lin.name], qp,
                            bias=weights.get(lin.name + ".bias"), rtn=rtn, search=search)
        packed = {f"{lin.key}.{suffix}": t for suffix, t in q.pack().items()}
        save_tensors(tensor_file(out_dir, lin), packed)
        rebuilt = dequantize({k[len(lin.key) + 1:]: v for k, v in packed.items()})
        # In fp16, the dtype of both: float copies of a large head would cost GBs here.
        diff = torch.sub(rebuilt.to(q.weight.device), q.weight).abs_().max().item()
        if diff > 0.05 or not math.isfinite(diff):
            raise Exl2Error(f"{lin.key}: packed tensors do not reproduce the quantized weight "
                            f"(max diff {diff:.4g}); this is a bug, please report it")
        weights[lin.name] = rebuilt[: lin.out_features].to(weights[lin.name].device, weights[lin.name].dtype)
    if is_head:
        ppl = NextTokenLoss(ppl_ids)
        if ppl_ids is not None:
            forward_rows(fwd, module, weights, states, rows=len(ppl_ids), reduce=ppl.add)
        return ModuleResult([], perplexity=ppl.perplexity() if ppl.count else None, notes=notes)
    outputs = forward_rows(fwd, module, weights, states)
    return ModuleResult(outputs, error=relative_error(outputs, targets), notes=notes)


def head_hessians(module: Module, states: HiddenStates) -> dict[str, Hessian]:
    """The head reads the module's input unchanged, so its Hessian needs no forward: computing the
    logits of every calibration row only to discard them is the costliest step of the whole pass."""
    (lin,) = module.linears
    hessian = Hessian(lin.in_features, states.device)
    with torch.inference_mode():
        for i in range(len(states)):
            hessian.add(states.row(i))
    return {lin.input: hessian}


class NextTokenLoss:
    """Accumulates next-token negative log-likelihood row by row (exllamav2's calibration reading)."""

    def __init__(self, ids: torch.Tensor | None):
        self.ids = ids
        self.nll = 0.0
        self.count = 0

    def add(self, row: int, logits: torch.Tensor) -> None:
        lp = torch.log_softmax(logits.squeeze(0)[:-1].float() + 1e-10, dim=-1)
        target = self.ids[row, 1:].to(lp.device).clamp(0, lp.shape[-1] - 1)
        self.nll -= lp.gather(-1, target.unsqueeze(-1)).sum().item()
        self.count += target.numel()

    def perplexity(self) -> float:
        return math.exp(self.nll / max(self.count, 1))


def perplexity_verdict(ppl: float) -> str:
    if ppl < PPL_HEALTHY:
        return "healthy"
    if ppl < 1000:
        return "warning: high calibration perplexity; the quantized model may be degraded"
    return "failure: calibration perplexity in the thousands, the quantized model is broken"
